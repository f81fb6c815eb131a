"""A room's epoch as the nodes see it, between `feed serve` processes on Postgres and Redis.

A room's numbering lives in Redis (its meta: epoch and seq) and every node mirrors it. When
Redis loses a room's meta, or the reader drops a row or filter room nobody refreshed, the next
numbering is a new epoch, and the same seqs then name other changes. These tests pause a
follower node (SIGSTOP: a long GC pause, a frozen VM) across such a change of epoch and check
what its clients get when it runs again: a `gap` carrying the new epoch, at once, and a resume
against the old epoch answered `recovered: false`; never a change of the new epoch delivered
under the old one's numbers, nor a `recovered: true` over changes nobody numbered.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.support import postgres as pg_support
from tests.support import redis as redis_support
from tests.support.cluster import (
    FeedNode,
    cluster_config,
    memory,
    reader_and_other,
    reading_node,
    running_cluster,
    subscribed,
    write_postgres_config,
)
from tests.support.postgres import PgDatabase
from tests.support.redis import RedisTarget, open_private_redis
from tests.support.server import FeedClient

pg_server = pg_support.pg_server
pg = pg_support.pg

redis_target = redis_support.redis_target

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]

ROOM = "main:public.orders"
BIG = "x" * 2_000_000  # past the 1 MiB a publish call sends: it goes as a reference


class Recorder(FeedClient):
    """A client that also keeps what it got in arrival order: changes and gaps together."""

    def __init__(self) -> None:
        super().__init__(websocket_extra_options={"max_msg_size": 0})
        self.events: list[tuple[str, tuple[Any, Any]]] = []

    async def _on_change(self, data: dict[str, Any]) -> None:
        self.events.append(("change", (data["seq"], data["key"])))
        await super()._on_change(data)

    async def _on_changes(self, batch: list[dict[str, Any]]) -> None:
        self.events += [("change", (data["seq"], data["key"])) for data in batch]
        await super()._on_changes(batch)

    async def _on_gap(self, data: dict[str, Any]) -> None:
        self.events.append(("gap", (data["seq"], data["epoch"])))
        await super()._on_gap(data)


@contextlib.asynccontextmanager
async def client_of_url(url: str) -> AsyncIterator[Recorder]:
    client = Recorder()
    await client.connect(url)
    try:
        yield client
    finally:
        await client.close()


def client_of(node: FeedNode) -> contextlib.AbstractAsyncContextManager[Recorder]:
    return client_of_url(node.url)


@contextlib.asynccontextmanager
async def paused(node: FeedNode) -> AsyncIterator[None]:
    assert node.process is not None
    node.process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        node.process.send_signal(signal.SIGCONT)


async def until_hget(t: RedisTarget, key: str, field: str, check: Any, timeout: float) -> None:
    """Poll Redis (the state a test waits for is there, not an event) until `check` holds."""
    async with asyncio.timeout(timeout):
        while not check(await t.admin.hget(key, field)):  # noqa: ASYNC110
            await asyncio.sleep(0.05)


def drained(queue: asyncio.Queue[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out


async def orders(db: PgDatabase) -> None:
    await db.conn.execute("CREATE TABLE public.orders (id int PRIMARY KEY, blob text)")


@pytest.mark.postgres
async def test_a_large_change_read_after_its_epoch_ended_is_a_gap_not_another_change(
    pg: PgDatabase, tmp_path: Path
) -> None:
    """A large change goes as a reference (`ref`, its seqs and epoch) and each node reads it
    from the room's history. A node paused meanwhile reads it late: if Redis lost the room's
    meta in between and a new epoch's changes reached the same seq, the history holds another
    change under that seq. The node must not deliver it as the large change: its clients get a
    `gap` with the new epoch (they reload), and the changes after it as usual."""
    await orders(pg)
    async with open_private_redis() as t:
        config = write_postgres_config(
            tmp_path / "feed.toml", pg.url, t.url, t.prefix.rstrip(":"), lease=5.0
        )
        meta = f"{t.prefix}room:{ROOM}:meta"
        async with running_cluster(config, count=2) as nodes:
            reader = await reading_node(nodes)
            other = next(n for n in nodes if n is not reader)
            async with client_of(other) as client:
                ack = await client.subscribe(ROOM)
                assert ack["ok"], ack
                old = ack["epoch"]
                async with paused(other):
                    await pg.conn.execute("INSERT INTO orders VALUES (1, $1)", BIG)
                    await until_hget(t, meta, "seq", lambda v: v == b"1", 20)
                    await t.admin.delete(meta)  # lost: evicted, say
                    await pg.conn.execute("INSERT INTO orders VALUES (2, 'small')")
                    await until_hget(t, meta, "seq", lambda v: v == b"1", 20)
                raw = await t.admin.hget(meta, "epoch")
                new = raw.decode() if isinstance(raw, bytes) else ""
                assert new and new != old
                await pg.conn.execute("INSERT INTO orders VALUES (3, 'after')")
                while (await client.next_change(20))["key"] != 3:
                    pass
                shown = client.events
                assert shown == [("gap", (1, new)), ("change", (2, 3))], shown


@pytest.mark.postgres
async def test_a_paused_node_hears_of_a_dropped_rooms_new_epoch_at_once(
    pg: PgDatabase, tmp_path: Path
) -> None:
    """A filter room whose only node stops refreshing it (paused past `filter_room_grace` plus
    three refresh periods) is dropped by the reader, numbering and history, and a change made
    then is numbered in no epoch of it. When the node runs again its clients must hear of it at
    once (a `gap` in the room's new epoch), not at the room's next change, hours later maybe;
    and a client resuming there against the old epoch must be told `recovered: false`."""
    await orders(pg)
    async with open_private_redis() as t:
        config = write_postgres_config(
            tmp_path / "feed.toml", pg.url, t.url, t.prefix.rstrip(":"), lease=2.0
        )
        async with running_cluster(config, count=2) as nodes:
            reader = await reading_node(nodes)
            other = next(n for n in nodes if n is not reader)
            async with client_of(other) as client, client_of(other) as late:
                ack = await client.subscribe(ROOM, filter="blob=eq.x")
                assert ack["ok"], ack
                room, old = ack["room"], ack["epoch"]
                meta = f"{t.prefix}room:{room}:meta"
                target_meta = f"{t.prefix}room:{ROOM}:meta"
                live = f"{t.prefix}live:main"
                await pg.conn.execute("INSERT INTO orders VALUES (1, 'x')")
                first = await client.next_change(20)
                assert (first["seq"], first["key"]) == (1, 1)
                async with paused(other):
                    # The reader drops the room: its meta goes with its registration.
                    async with asyncio.timeout(30):
                        while await t.admin.exists(meta):  # noqa: ASYNC110
                            await asyncio.sleep(0.05)
                    await pg.conn.execute("INSERT INTO orders VALUES (2, 'x')")  # unnumbered
                    await until_hget(t, target_meta, "seq", lambda v: v == b"2", 20)
                resumed = time.monotonic()
                async with asyncio.timeout(20):  # the node refreshed: the room is routed again
                    while await t.admin.zscore(live, room) is None:  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
                seen: dict[str, Any] = {}
                try:
                    gap = await client.next_gap(5)
                    seen["gap"] = (gap["seq"], gap["epoch"] != old)
                    seen["gap_within_s"] = time.monotonic() - resumed < 5
                except TimeoutError:
                    seen["gap"] = None
                again = await late.subscribe(room, since=1, epoch=old)
                assert again["ok"], again
                seen["resume"] = (again["recovered"], again["epoch"] != old)
                await pg.conn.execute("INSERT INTO orders VALUES (3, 'x')")
                third = await client.next_change(20)
                seen["next"] = (third["seq"], third["key"])
                seen["late_gaps"] = [(g["seq"], g["epoch"] != old) for g in drained(client.gaps)]
                assert seen == {
                    "gap": (0, True),
                    "gap_within_s": True,
                    "resume": (False, True),
                    "next": (1, 3),
                    "late_gaps": [],
                }, seen


async def test_a_room_registered_in_a_new_epoch_tells_the_nodes_in_the_old_one(
    redis_target: RedisTarget,
) -> None:
    """Redis lost a room's numbering (evicted, say) while it was quiet; a client of another
    node subscribes, and its registration begins a new epoch. A node whose clients are in the
    old epoch hears of it then (its clients get a `gap` in the new epoch, and a resume there
    against the old one is `recovered: false`), not at the room's next change."""
    room = "mem:public.orders"
    async with AsyncExitStack() as stack:
        reader, other = await reader_and_other(
            stack, cluster_config(redis_target.url, redis_target.prefix)
        )
        client = await stack.enter_async_context(client_of_url(other.url))
        old = (await subscribed(client, room))["epoch"]
        memory(reader).write("public.orders", "insert", {"id": 1})
        assert (await client.next_change())["seq"] == 1
        engine = reader.engine
        await redis_target.admin.delete(engine.meta_key(room), engine.stream_key(room))
        near = await stack.enter_async_context(client_of_url(reader.url))
        new = (await subscribed(near, room))["epoch"]
        assert new != old
        gap = await client.next_gap(10)
        assert (gap["seq"], gap["epoch"]) == (0, new), gap
        late = await stack.enter_async_context(client_of_url(other.url))
        again = await subscribed(late, room, since=1, epoch=old)
        assert (again["recovered"], again["epoch"], again["seq"]) == (False, new, 0), again
        memory(reader).write("public.orders", "insert", {"id": 2})
        for each in (client, near, late):
            change = await each.next_change()
            assert (change["seq"], change["key"]) == (1, 2)
        assert client.events == [("change", (1, 1)), ("gap", (0, new)), ("change", (1, 2))]


async def test_a_node_watching_a_room_again_in_a_new_epoch_does_not_skip_its_changes(
    redis_target: RedisTarget,
) -> None:
    """A node that lost its connection to Redis watches its rooms again (`ready` cleared, as
    `_down` does); a subscribe may come first, and its registration then finds a new epoch
    (Redis restarted empty). The node took the new epoch with the old seq: the new epoch's
    changes up to that seq were dropped as already delivered, and its clients never heard of
    the new epoch. They get a `gap` in it, then every change."""
    room = "mem:public.orders"
    async with AsyncExitStack() as stack:
        reader, other = await reader_and_other(
            stack, cluster_config(redis_target.url, redis_target.prefix)
        )
        client = await stack.enter_async_context(client_of_url(other.url))
        old = (await subscribed(client, room))["epoch"]
        for i in range(1, 4):
            memory(reader).write("public.orders", "insert", {"id": i})
        assert [c["seq"] for c in await client.take(3)] == [1, 2, 3]
        engine = reader.engine
        await redis_target.admin.delete(engine.meta_key(room), engine.stream_key(room))
        other.engine._mirrors[room].ready = False  # as `_down` leaves it, until `_recover`
        second = await stack.enter_async_context(client_of_url(other.url))
        ack = await subscribed(second, room)
        assert ack["epoch"] != old and ack["seq"] == 0, ack
        gap = await client.next_gap(10)
        assert (gap["seq"], gap["epoch"]) == (0, ack["epoch"]), gap
        memory(reader).write("public.orders", "insert", {"id": 4})
        for each in (client, second):
            change = await each.next_change(10)
            assert (change["seq"], change["key"]) == (1, 4)
