"""The cluster format: which messages and records a build writes to, and reads from, Redis.

During a rolling upgrade nodes of two builds share one Redis, and a roll is safe only where the
older build reads what the newer one writes (docs/operations.md, "Builds that differ"). So each
build carries one number, raised whenever what it writes changes in a way an older build would
misread; the way Kafka's brokers carry an inter-broker protocol version. A reader announces it
with its connector's shared status (once per status, not per change), every node with its name
(`<prefix>:nodes`); a node that finds a connector's reader writing a newer format than it reads
shows that connector down on itself, saying what to do, and a reader that finds nodes of an
older format following says so once.

History (add a line, and a point to docs/operations.md, whenever it is raised):

1. Builds up to 2026-12-07: runs `<first>\\n<epoch>\\n<payloads>`, `gap\\n<seq>\\n<body>`; they
   announce no format (a status without one is format 1).
2. Builds from 2026-12-07 on: `ref\\n<first>\\n<last>\\n<epoch>`, a room's run over 1 MiB to be
   read from the room's history (feed.engine.publisher.PUBLISHED_BYTES); `epoch\\n<seq>\\n<epoch>`
   when a registration begins a room's numbering again, `drop\\n<epoch>` when the reader drops
   it (feed.engine.scripts), so that nodes in the old epoch tell their clients at once.
"""

from __future__ import annotations

import logging
import os

CLUSTER_FORMAT = 2
"""The cluster format this build writes, and the newest it reads (the history above)."""

HEADS: dict[int, frozenset[bytes]] = {
    1: frozenset({b"gap"}),
    2: frozenset({b"gap", b"ref", b"epoch", b"drop"}),
}
"""Per format, the heads of a room's messages besides a run's first seq (digits)."""

TEST_KNOB = "FEED_TEST_CLUSTER_FORMAT"
"""For tests only: a lower format this node announces and reads, as a node of an older build
would (it reads only that format's heads, `HEADS`). What it writes does not change."""

log = logging.getLogger("feed.engine.redis")


def cluster_format() -> int:
    """The format this node reads and announces: CLUSTER_FORMAT, or the test knob's lower one."""
    text = os.environ.get(TEST_KNOB)
    if not text:
        return CLUSTER_FORMAT
    if not text.isdigit() or not 1 <= int(text) <= CLUSTER_FORMAT:
        log.warning("%s=%r ignored: a number from 1 to %d", TEST_KNOB, text, CLUSTER_FORMAT)
        return CLUSTER_FORMAT
    return int(text)


def announced(value: object) -> int:
    """The format a status or a node's entry announces: none (an older build) is 1."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1


def reader_ahead(reader: str, theirs: int, ours: int) -> str:
    """What a node shows for a connector whose reader writes a format newer than it reads."""
    return (
        f"the reader {reader} writes cluster format {theirs}, this build reads up to {ours}:"
        " finish the rolling upgrade"
    )
