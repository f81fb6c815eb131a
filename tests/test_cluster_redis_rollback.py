"""A cluster's Redis that comes back with older data than it had (an RDB restore, a failover to
a replica that lagged): found by `python -m bench.chaos --faults redis_stale` (seed 11).

The room's epoch is in the restored data, so it is unchanged, but its numbering went back: the
changes committed after the restart were numbered again from the saved `seq`, and a client that
had seen the later numbers dropped them as repeats, stayed `live`, and its rows stayed wrong for
good (no gap, no `recovered: false`, no reload; here rows 1..10 of 15, seq 10, after 30 s). The
promise is "loses nothing, or says so": the client must end with the table's rows, by a replay
or by a reload it was told to make. Now the node that finds the numbering below what it
delivered begins it again in a new epoch, with a `gap` (feed.engine.delivery, scripts.REGISTER).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from dbfeed_client import FeedClient

from feed.engine import scripts
from tests.support import postgres as pg_support
from tests.support import redis as redis_support
from tests.support.cluster import reading_node, running_cluster, write_postgres_config
from tests.support.postgres import PgDatabase
from tests.support.redis import RedisTarget, open_private_redis
from tests.support.waiting import wait_until

pg_server = pg_support.pg_server
pg = pg_support.pg
redis_target = redis_support.redis_target

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(120)]


async def insert(pg: PgDatabase, ids: range) -> None:
    for i in ids:
        await pg.conn.execute("INSERT INTO orders (id, status) VALUES ($1, 'new')", i)


async def test_a_redis_back_with_older_data_is_told_never_a_quiet_hole(
    pg: PgDatabase, tmp_path: Path
) -> None:
    await pg.conn.execute("CREATE TABLE public.orders (id int PRIMARY KEY, status text)")
    async with open_private_redis() as target:
        server = target.server
        assert server is not None
        config = write_postgres_config(tmp_path / "feed.toml", pg.url, target.url, "rollback")
        async with running_cluster(config, 1) as nodes:
            await reading_node(nodes)
            async with FeedClient(nodes[0].url) as feed:
                sub = feed.subscribe("main:public.orders", snapshot=True)
                states: list[str] = []
                sub.on("state", lambda state, info: states.append(state))
                await sub.ready()
                await insert(pg, range(1, 6))
                await wait_until(lambda: len(sub.rows or {}) == 5, what="rows 1..5")
                await target.admin.save()  # what Redis will come back with
                await insert(pg, range(6, 11))
                await wait_until(lambda: len(sub.rows or {}) == 10, what="rows 1..10")
                assert server.proc is not None
                server.proc.kill()  # kill -9: nothing saved since
                await asyncio.to_thread(server.stop)
                await asyncio.to_thread(server.start)  # back with rows 1..5's numbering
                await nodes[0].wait_ready(200, timeout=30)
                await insert(pg, range(11, 16))
                want = {str(i) for i in range(1, 16)}
                # Replayed, or reloaded after being told: either way every row, within 30 s.
                try:
                    await wait_until(lambda: set(sub.rows or {}) == want, 30, "rows 1..15")
                except AssertionError:
                    held = sorted(sub.rows or {}, key=int)
                    raise AssertionError(f"rows {held}, states {states}, seq {sub.seq}") from None


async def test_the_scripts_begin_a_numbering_again_that_went_back_below_what_was_given_out(
    redis_target: RedisTarget,
) -> None:
    """The two scripts' side, step by step: REGISTER told of a seq this node delivered in the
    room's epoch, above the room's seq, begins a new epoch; PUBLISH told of a later number than
    any change Redis holds (`seen`) drops every registered room's numbering, saying so on its
    channel, and numbers the batch in a new epoch. Told of what Redis holds, neither does."""
    admin = redis_target.admin
    p = redis_target.prefix.rstrip(":")
    fence, seen, live, registry = f"{p}:fence:mem", f"{p}:seen:mem", f"{p}:live:mem", f"{p}:reg"
    await admin.set(fence, "1:t")
    room, other = "mem:public.orders", "mem:public.orders?id=eq.1"

    def keys(name: str) -> list[str]:
        return [f"{p}:room:{name}:meta", f"{p}:room:{name}:history"]

    async def register(name: str, *delivered: Any) -> list[Any]:
        return list(
            await admin.eval(
                scripts.REGISTER,
                4,
                registry,
                live,
                *keys(name),
                name,
                '{"name":"x"}',
                10_000,
                f"e{len(delivered)}{name[-1]}",
                86_400_000,
                f"{p}:control",
                f"{p}:room:{name}:live",
                *delivered,
            )
        )

    async def publish(change: str, number: int, acked: Any) -> list[Any]:
        return list(
            await admin.eval(
                scripts.PUBLISH,
                5,
                fence,
                seen,
                live,
                *keys(room),
                "1:t",
                50,
                f"p{change}",
                86_400_000,
                1,
                100,
                1,
                1,
                1_000_000,
                750,
                "0",
                f"{p}:room:",
                acked,
                f"{p}:room:{room}:live",
                change,
                number,
                1,
                1,
                '{"x":1}',
            )
        )

    await register(room)
    await register(other)
    for n in range(1, 4):
        assert await publish(f"c{n}", n, n - 1 if n > 1 else "") == [n]
    epoch = await admin.hget(keys(room)[0], "epoch")
    assert isinstance(epoch, bytes)
    # Told of what Redis holds: nothing moves.
    assert (await register(room, 3, epoch.decode()))[:2] == [epoch, b"3"]
    assert await publish("c4", 4, 3) == [4]
    # A seq delivered above the room's: a new epoch, from 0.
    new = await register(room, 9, epoch.decode())
    assert new[0] != epoch and new[1] == b"0"
    # A number later than any change Redis holds: every room begins again, and is told.
    pubsub = admin.pubsub()
    await pubsub.subscribe(f"{p}:room:{other}:live")
    await pubsub.get_message(timeout=1)  # the subscribe's confirmation
    assert await publish("c5", 5, 9) == [1]
    assert await admin.hget(keys(room)[0], "epoch") == b"pc5"
    assert not await admin.exists(keys(other)[0])
    notice = await pubsub.get_message(timeout=5)
    assert notice is not None and notice["data"].startswith(b"drop\n"), notice
    await pubsub.aclose()  # type: ignore[no-untyped-call]
