"""A change larger than Redis's pub/sub output buffer limit, between `feed serve` processes.

Redis closes a subscriber whose output buffer passes `client-output-buffer-limit pubsub` (32 MB,
or 8 MB for a minute, by default), and a Postgres row can be tens of MB of jsonb or text. If the
reader published such a change on the room's channel, Redis would cut every node that follows
the room: each one's clients would see the connector go down and up again, and a snapshot
answer on its way to it would be lost. A room's run that large is published as a reference
instead, and each node reads it from the room's history, where the same script wrote it; when
the history no longer holds it, the node's clients get a `gap`, never a hole. These tests run
two real `feed serve` processes on Postgres and a Redis of their own with a 1 MB limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
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
    routes,
    running_cluster,
    subscribed,
    write_postgres_config,
)
from tests.support.postgres import PgDatabase
from tests.support.redis import RedisTarget, open_private_redis
from tests.support.server import FeedClient
from tests.support.waiting import wait_until

pg_server = pg_support.pg_server
pg = pg_support.pg

private_redis = redis_support.private_redis

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]

ROOM = "main:public.orders"
LIMIT = "pubsub 1mb 512kb 60"
BIG = "x" * 2_000_000  # twice the limit: one message of it would cut its subscriber at once


@contextlib.asynccontextmanager
async def limited_redis() -> AsyncIterator[RedisTarget]:
    """A Redis of the test's own whose pub/sub output buffer limit is 1 MB."""
    async with open_private_redis() as target:
        await target.admin.config_set("client-output-buffer-limit", LIMIT)
        yield target


@contextlib.asynccontextmanager
async def client_on(node: FeedNode) -> AsyncIterator[FeedClient]:
    """A client of `node` following the room; it takes messages of any size, as the Python
    client does (aiohttp closes a websocket on a message over 4 MiB unless told otherwise)."""
    client = FeedClient(websocket_extra_options={"max_msg_size": 0})
    await client.connect(node.url)
    try:
        ack = await client.subscribe(ROOM)
        assert ack["ok"], ack
        yield client
    finally:
        await client.close()


def drained(queue: asyncio.Queue[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out


async def orders(db: PgDatabase) -> None:
    await db.conn.execute("CREATE TABLE public.orders (id int PRIMARY KEY, blob text)")


@pytest.mark.postgres
async def test_a_change_past_the_pubsub_limit_reaches_every_node_without_a_cut(
    pg: PgDatabase, tmp_path: Path
) -> None:
    await orders(pg)
    async with (
        limited_redis() as t,
        running_cluster(
            write_postgres_config(
                tmp_path / "feed.toml", pg.url, t.url, t.prefix.rstrip(":"), lease=5.0
            ),
            count=2,
        ) as nodes,
    ):
        reader = await reading_node(nodes)
        other = next(n for n in nodes if n is not reader)
        async with client_on(other) as far, client_on(reader) as near:
            blobs = {i: BIG if i % 3 == 2 else f"small {i}" for i in range(1, 10)}
            for i, blob in blobs.items():
                await pg.conn.execute("INSERT INTO orders VALUES ($1, $2)", i, blob)
            for client in (far, near):
                got = await client.take(len(blobs), 30)
                assert [c["seq"] for c in got] == list(range(1, 10))
                assert [c["key"] for c in got] == list(blobs)
                assert [c["after"]["blob"] for c in got] == list(blobs.values())
                assert drained(client.gaps) == []
                # The connector never looked down: the nodes kept their Redis connection.
                assert [s["state"] for s in drained(client.statuses)] == []
            await pg.conn.execute("INSERT INTO orders VALUES (10, 'after')")
            for client in (far, near):
                after = await client.next_change(10)
                assert (after["seq"], after["key"]) == (10, 10)
                assert client.changes.empty(), "a change came twice"
        assert await t.output_buffer_cuts() == [], "Redis cut a node's pub/sub connection"


@pytest.mark.postgres
async def test_a_large_change_the_history_no_longer_holds_is_a_gap_not_a_hole(
    pg: PgDatabase, tmp_path: Path
) -> None:
    """The node reads a large change from the room's history when its reference arrives; one
    that stopped reading meanwhile (SIGSTOP here: a long pause) may find it trimmed away by the
    changes after it. Its clients are told so with a `gap` at the large change's seq, and get
    the changes after it as usual."""
    await orders(pg)
    async with limited_redis() as t:
        # One entry per stream node, so that `XADD MAXLEN ~` trims to `history` exactly.
        await t.admin.config_set("stream-node-max-entries", 1)
        config = write_postgres_config(
            tmp_path / "feed.toml", pg.url, t.url, t.prefix.rstrip(":"), lease=5.0, history=2
        )
        async with running_cluster(config, count=2) as nodes:
            reader = await reading_node(nodes)
            other = next(n for n in nodes if n is not reader)
            assert other.process is not None
            meta = f"{t.prefix}room:{ROOM}:meta"
            async with client_on(other) as client:
                other.process.send_signal(signal.SIGSTOP)
                try:
                    await pg.conn.execute("INSERT INTO orders VALUES (1, $1)", BIG)
                    for i in range(2, 5):
                        await pg.conn.execute("INSERT INTO orders VALUES ($1, 'small')", i)
                    async with asyncio.timeout(20):  # the reader published all four
                        while await t.admin.hget(meta, "seq") != b"4":  # noqa: ASYNC110
                            await asyncio.sleep(0.05)
                finally:
                    other.process.send_signal(signal.SIGCONT)
                gap = await client.next_gap(20)
                assert (gap["room"], gap["seq"]) == (ROOM, 1), gap
                got = await client.take(3, 20)
                assert [(c["seq"], c["key"]) for c in got] == [(2, 2), (3, 3), (4, 4)]
                assert drained(client.gaps) == []
                assert [s["state"] for s in drained(client.statuses)] == []
        assert await t.output_buffer_cuts() == [], "Redis cut a node's pub/sub connection"


async def test_one_call_publishes_at_most_a_mebibyte_whatever_the_rooms(
    private_redis: RedisTarget,
) -> None:
    """A change of 400 KB is below the size that goes by reference, but it matches three rooms
    one node follows: 1.2 MB in that node's output buffer at once, past a 1 MB limit. The call
    publishes runs until its budget (1 MiB) would be passed and the rest by reference."""
    t = private_redis
    await t.admin.config_set("client-output-buffer-limit", "pubsub 1mb 0 0")
    filters = ["status=eq.paid", "kind=eq.a"]
    async with AsyncExitStack() as stack:
        reader, other = await reader_and_other(stack, cluster_config(t.url, t.prefix))
        client = FeedClient(websocket_extra_options={"max_msg_size": 0})
        await client.connect(other.url)
        stack.push_async_callback(client.close)
        await subscribed(client, "mem:public.orders")
        rooms = ["mem:public.orders", *(f"mem:public.orders?{f}" for f in filters)]
        for f in filters:
            await subscribed(client, "mem:public.orders", filter=f)

        def routed() -> bool:
            return all(routes(reader.engine, room) for room in rooms[1:])

        await wait_until(routed, 10, "the reader to route the filter rooms")
        blob = "y" * 400_000
        memory(reader).write(
            "public.orders", "insert", {"id": 1, "status": "paid", "kind": "a", "blob": blob}
        )
        memory(reader).write(
            "public.orders", "insert", {"id": 2, "status": "paid", "kind": "a", "blob": "z"}
        )
        got = await client.take(6, 20)
        by_room: dict[str, list[tuple[int, Any]]] = {}
        for change in got:
            by_room.setdefault(change["room"], []).append((change["seq"], change["key"]))
        assert by_room == {room: [(1, 1), (2, 2)] for room in rooms}
        assert all(len(c["after"]["blob"]) == len(blob) for c in got if c["key"] == 1)
        assert client.gaps.empty(), client.gaps.get_nowait()
        assert client.statuses.empty(), client.statuses.get_nowait()
    assert await t.output_buffer_cuts() == [], "Redis cut a node's pub/sub connection"
