"""A snapshot whose rows reflect a change that, in commit order, comes after one they do not.

Postgres writes a commit's record, then makes the transaction visible: a snapshot taken in
between sees a transaction as still running whose commit the stream already has before that of
one it sees committed (9 snapshots in 200 under four synchronous-commit writers, logical mode).
The catch-up then sends the first change and leaves out the second, so the numbers a client gets
have a hole after its first change, which the client libraries took for lost changes: a reload
("changes a..b never arrived"), a fresh snapshot, with nothing missing. The ack now says up to
which number holes may be (`snapshot_upto`), and the clients allow them there, and only there.

The source here is the memory connector with that one Postgres trait, so the order is certain;
the server, the transport and the client library are the real ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from dbfeed_client import FeedClient

from connectors.base import RoomAddress, Snapshot
from connectors.memory import MemoryConnector
from tests.support.server import running_feed
from tests.test_client_python import Log

CONFIG = (
    '[[connectors]]\nname = "mem"\ntype = "tests.test_snapshot_holes:RunningAtSnapshot"\n'
    'targets = ["public.orders"]\n'
)


class RunningAtSnapshot(MemoryConnector):
    """A snapshot taken while a write to row 1 is committing: the stream has it first, then a
    write to row 2 that the rows reflect; the rows do not reflect the write to row 1."""

    async def snapshot(
        self, address: RoomAddress, where: Callable[[Mapping[str, Any]], bool], limit: int
    ) -> Snapshot:
        table = self._tables[address.target]
        row_1 = dict(table["1"])
        running = self.write(address.target, "update", {**row_1, "status": "running"})
        seen = self.write(address.target, "update", {**table["2"], "status": "seen"})
        await self.routed()
        rows = {**{key: dict(row) for key, row in table.items()}, "1": row_1}

        def covers(change: Any) -> bool:
            position = change.position
            return (
                position is not None and position <= seen.position and position != running.position
            )

        return Snapshot(rows=list(rows.values()), covers=covers, keys=list(rows))


async def test_a_change_the_rows_reflect_after_one_they_do_not_is_no_lost_change() -> None:
    async with running_feed(CONFIG) as server:
        source = server.hub.connectors["mem"]
        assert isinstance(source, RunningAtSnapshot)
        for key in (1, 2, 3):
            source.write("public.orders", "insert", {"id": key, "status": "new"})
        async with (
            FeedClient(server.url) as feed,
            feed.subscribe("mem:public.orders", snapshot=True) as sub,
        ):
            log = Log(sub)
            assert sub.rows is not None
            assert {k: r["status"] for k, r in sub.rows.items()} == {
                "1": "new",
                "2": "seen",
                "3": "new",
            }
            source.write("public.orders", "update", {"id": 3, "status": "later"})
            await log.until(
                lambda: any(c["key"] == 3 for c in log.changes) or "reload" in log.names,
                "the change after the snapshot",
            )
            assert "reload" not in log.names, log.states
            assert [(c["key"], c["after"]["status"]) for c in log.changes] == [
                (1, "running"),
                (3, "later"),
            ]
            assert {k: r["status"] for k, r in sub.rows.items()} == {
                "1": "running",
                "2": "seen",
                "3": "later",
            }
