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

import pytest
from dbfeed_client import FeedClient

from tests.support import postgres as pg_support
from tests.support.cluster import reading_node, running_cluster, write_postgres_config
from tests.support.postgres import PgDatabase
from tests.support.redis import open_private_redis
from tests.support.waiting import wait_until

pg_server = pg_support.pg_server
pg = pg_support.pg

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
