"""The reader's batches on the loop `feed serve` runs on (uvloop): spaced by `publish_interval`,
without the loop spinning while it waits.

The end-to-end behaviour (a lone change at once, a steady stream a few changes per script call,
against a real Redis) is tests/test_cluster.py's; this file holds what only the loop shows. The
publish callable here stands for the script call: it records the batch and yields to the loop for
about a Redis round trip.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest

from feed.core.change import Change
from feed.engine.batch import MAX_BATCH, MAX_BATCH_BYTES, Batcher

uvloop = pytest.importorskip("uvloop")


def change(i: int, blob: str = "") -> Change:
    row = {"id": i, "blob": blob}
    ts = dt.datetime.now(dt.UTC)
    return Change(str(i), "main", "memory", "public.orders", "insert", i, None, row, ts)


class CountingLoop(uvloop.Loop):  # type: ignore[misc,name-defined]
    """uvloop, counting the timers armed (asyncio.sleep arms one per call too)."""

    armed = 0

    def call_later(self, delay: float, callback: Any, *args: Any, context: Any = None) -> Any:
        CountingLoop.armed += 1
        return super().call_later(delay, callback, *args, context=context)


def test_a_steady_stream_waits_for_the_interval_without_spinning() -> None:
    """uvloop's timers count whole milliseconds and fire up to one early: a batcher that checked
    the interval again when its timer fired re-armed it for the fraction left, round after round
    (7,500 timers for 79 publishes of 200 changes 1 ms apart, three times the CPU)."""
    batches: list[list[int]] = []
    count = 200

    async def publish(batch: list[Change]) -> None:
        batches.append([c.key for c in batch])
        await asyncio.sleep(0.0003)

    async def main() -> None:
        batcher = Batcher("main", publish, lambda error: None, 0.005)
        for i in range(count):
            await batcher.add(change(i))
            batcher.idle()  # the stream would wait for its next change
            await asyncio.sleep(0.001)
        await batcher.drain()
        assert batcher.published == count

    CountingLoop.armed = 0
    loop = CountingLoop()
    try:
        loop.run_until_complete(asyncio.wait_for(main(), 30))
    finally:
        loop.close()
    assert [c for batch in batches for c in batch] == list(range(count))
    assert len(batches) <= count / 3, f"{len(batches)} publish calls for {count} changes"
    # The test's own sleeps (one per change, one per publish), and about one timer per batch.
    own = count + len(batches)
    assert CountingLoop.armed - own <= len(batches) + 2, (
        f"{CountingLoop.armed - own} timers armed for {len(batches)} batches"
    )


def test_a_script_call_carries_a_bounded_number_of_bytes() -> None:
    """A room's run of a batch is one pub/sub message, and what one script call publishes sits
    whole in each subscriber's output buffer: 256 changes of 128 KB were one 32 MB message, and
    Redis (`client-output-buffer-limit pubsub 32mb` by default) cut every node that followed the
    room. A batch stops at MAX_BATCH_BYTES; a change larger on its own still goes, alone."""
    batches: list[list[Change]] = []

    async def publish(batch: list[Change]) -> None:
        batches.append(batch)

    blob = "x" * 10_000
    big = "y" * (MAX_BATCH_BYTES + 1)

    async def main() -> None:
        batcher = Batcher("main", publish, lambda error: None)
        written = [change(i, blob) for i in range(120)]
        written[50] = change(50, big)
        written += [change(i) for i in range(120, 120 + 2 * MAX_BATCH)]
        for c in written:
            await batcher.add(c)
        await batcher.drain()
        assert [c for batch in batches for c in batch] == written

    asyncio.run(asyncio.wait_for(main(), 30))
    for batch in batches:
        size = sum(len(c.wire_tail or b"") for c in batch)
        assert len(batch) <= MAX_BATCH
        assert size <= MAX_BATCH_BYTES or len(batch) == 1, (len(batch), size)
    assert [len(b) for b in batches if b[0].after and b[0].after["blob"] == "y" * len(big)] == [1]
    assert max(len(b) for b in batches) == MAX_BATCH  # small changes still go 256 at a time
