"""Three `feed serve` processes on one Redis, Postgres as the source, under a steady write load.

What the cluster promises, checked the way a user would notice it: every client (on different
nodes, resuming on another node when its own goes away) ends with exactly the rows committed,
seqs contiguous from its first, no duplicate, and no gap or failed resume, across a kill -9 of
the reading node, a restart of every node, and a restart of Redis (with its append-only file:
Redis kept the history, so nothing needs a reload; without one: every client is told, never a
silent hole).
"""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

import pytest

from tests.support import postgres as pg_support
from tests.support import redis as redis_support
from tests.support.cluster import (
    FeedNode,
    LoadBalancer,
    Tally,
    haproxy_binary,
    reading_node,
    running_cluster,
    tallies_on,
    write_postgres_config,
)
from tests.support.postgres import PgDatabase
from tests.support.proxy import CuttableProxy
from tests.support.redis import RedisTarget, open_private_redis
from tests.support.waiting import wait_until

pg_server = pg_support.pg_server
pg = pg_support.pg

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(240)]

ROOM = "main:public.orders"


redis_target = redis_support.redis_target


class Writer:
    """Commits one row per transaction at a steady pace; `committed` is what the source holds."""

    def __init__(self, db: PgDatabase, interval: float = 0.01) -> None:
        self.db = db
        self.interval = interval
        self.committed: list[int] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Writer:
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        conn = await self.db.connect()
        try:
            n = len(self.committed)
            while True:
                n += 1
                await conn.execute("INSERT INTO orders (id, status) VALUES ($1, 'new')", n)
                self.committed.append(n)
                await asyncio.sleep(self.interval)
        finally:
            await conn.close()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await self._task
            self._task = None

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(30):
            while len(self.committed) < count:  # noqa: ASYNC110 - the writer's own pace
                await asyncio.sleep(0.01)


def check(tally: Tally, committed: list[int]) -> None:
    """What a user would notice: every committed row once, in order, nothing to reload."""
    assert tally.duplicates == 0, f"{tally.name}: {tally.duplicates} duplicates"
    assert tally.disorder == [], f"{tally.name}: seq jumps {tally.disorder[:5]}"
    assert tally.gaps == [], f"{tally.name}: gaps {tally.gaps[:3]}"
    assert all(r["recovered"] is True for r in tally.resumes), tally.resumes
    first = committed.index(tally.keys[0])
    assert tally.keys == committed[first:], f"{tally.name}: rows differ from the committed ones"


async def all_delivered(tallies: list[Tally], committed: list[int], *, resumed: bool) -> None:
    """Each client gets every row committed since it joined, and had to resume or never did."""
    for tally in tallies:
        await tally.wait_for(len(committed) - committed.index(tally.keys[0]), timeout=60)
        check(tally, committed)
        if resumed:
            assert tally.resumes, f"{tally.name} never had to resume"
        else:
            assert tally.resumes == [], "the clients' connections should have survived"


async def orders(db: PgDatabase) -> None:
    await db.conn.execute("CREATE TABLE public.orders (id int PRIMARY KEY, status text)")


async def test_kill_the_reader_then_restart_every_node_under_load(
    pg: PgDatabase, redis_target: RedisTarget, tmp_path: Path
) -> None:
    await orders(pg)
    prefix = redis_target.prefix.rstrip(":")
    config = write_postgres_config(tmp_path / "feed.toml", pg.url, redis_target.url, prefix)
    async with running_cluster(config) as nodes:
        reader = await reading_node(nodes)
        # One client per node, the reader's own included (it must resume elsewhere).
        async with tallies_on(ROOM, nodes) as tallies:
            async with Writer(pg) as writer:
                await writer.wait_for(100)
                reader.kill()  # kill -9 under load
                assert reader.process is not None
                await reader.process.wait()
                reader.process = None
                started = asyncio.get_running_loop().time()
                new_reader = await reading_node(nodes)
                took_over = asyncio.get_running_loop().time() - started
                assert new_reader is not reader
                assert took_over < 2.0 + 8.0  # the lease, plus the connector's start on a busy box
                await writer.wait_for(len(writer.committed) + 100)
                await reader.start()  # the killed node comes back as a standby
                await reader.wait_ready()
                # Restart every node (SIGTERM, then start again on the same ports).
                for node in nodes:
                    assert await node.stop() == 0, "".join(node.log[-30:])
                await writer.wait_for(len(writer.committed) + 50)
                await asyncio.gather(*(n.start() for n in nodes))
                await reading_node(nodes)
                await writer.wait_for(len(writer.committed) + 100)
            committed = writer.committed
            await all_delivered(tallies, committed, resumed=True)


async def test_a_rolling_restart_under_load_loses_nothing(
    pg: PgDatabase, redis_target: RedisTarget, tmp_path: Path
) -> None:
    """The upgrade procedure of docs/operations.md: nodes stopped with SIGTERM and started
    again one at a time, each ready before the next goes, the reader included, under writes.
    Clients follow the room across them: every row once, in order, nothing to reload."""
    await orders(pg)
    prefix = redis_target.prefix.rstrip(":")
    config = write_postgres_config(tmp_path / "feed.toml", pg.url, redis_target.url, prefix)
    async with running_cluster(config) as nodes:
        reader = await reading_node(nodes)
        async with tallies_on(ROOM, nodes) as tallies:
            async with Writer(pg) as writer:
                await writer.wait_for(50)
                # The reader last, as the docs say (and once more first, to see it handed over).
                order = [reader, *[n for n in nodes if n is not reader], reader]
                for node in order:
                    assert await node.stop() == 0, "".join(node.log[-30:])
                    await writer.wait_for(len(writer.committed) + 30)
                    await node.start()
                    await node.wait_ready()
                    await reading_node(nodes)
                    await writer.wait_for(len(writer.committed) + 30)
            committed = writer.committed
            await all_delivered(tallies, committed, resumed=True)


async def test_redis_restart_with_persistence_loses_nothing(pg: PgDatabase, tmp_path: Path) -> None:
    await orders(pg)
    async with open_private_redis("--appendonly", "yes", "--appendfsync", "always") as target:
        assert target.server is not None
        config = write_postgres_config(tmp_path / "feed.toml", pg.url, target.url, "restart")
        async with running_cluster(config, 2) as nodes:
            await reading_node(nodes)
            async with tallies_on(ROOM, nodes) as tallies:
                async with Writer(pg) as writer:
                    await writer.wait_for(50)
                    await asyncio.to_thread(target.server.stop)
                    for node in nodes:  # every node shows it; clients stay connected
                        body = await node.wait_ready(503, timeout=15)
                        assert body["cluster"]["redis"] == "down" or any(
                            c["state"] == "down" for c in body["connectors"].values()
                        )
                    await writer.wait_for(len(writer.committed) + 50)
                    await asyncio.to_thread(target.server.start)
                    for node in nodes:
                        await node.wait_ready(200, timeout=30)
                    await writer.wait_for(len(writer.committed) + 50)
                committed = writer.committed
                await all_delivered(tallies, committed, resumed=False)


def silent_holes(tally: Tally) -> list[str]:
    """Every place where a client's seqs jump (or start over) with nothing to tell it: no
    `gap` and no resume answering `recovered: false` since its previous change."""
    holes = []
    last: int | None = None
    told = False
    for kind, body in tally.events:
        if kind == "gap" or (kind == "resume" and body.get("recovered") is not True):
            told = True
        elif kind == "change":
            if last is not None and body["seq"] != last + 1 and not told:
                holes.append(f"{tally.name}: seq {last} -> {body['seq']} without a gap")
            last, told = body["seq"], False
    return holes


def told_of_loss(tally: Tally) -> bool:
    """The client got a `gap`, or a resume answering `recovered: false`."""
    return bool(tally.gaps) or any(r.get("recovered") is False for r in tally.resumes)


async def test_redis_restart_without_persistence_is_a_gap_never_a_silent_hole(
    pg: PgDatabase, tmp_path: Path
) -> None:
    """Redis comes back empty under three nodes and a write load: the rooms' history and
    numbering are gone, so every client is told (`gap`, or `recovered: false` on a resume), its
    seqs never jump without that, and everything committed once Redis is back arrives, in order."""
    await orders(pg)
    async with open_private_redis() as target:  # no RDB, no append-only file
        assert target.server is not None
        config = write_postgres_config(tmp_path / "feed.toml", pg.url, target.url, "empty")
        async with running_cluster(config, 3) as nodes:
            await reading_node(nodes)
            async with tallies_on(ROOM, nodes) as tallies:
                async with Writer(pg) as writer:
                    await writer.wait_for(50)
                    for tally in tallies:
                        await tally.wait_for(10)
                    await asyncio.to_thread(target.server.stop)
                    for node in nodes:  # every node shows it
                        body = await node.wait_ready(503, timeout=15)
                        assert body["cluster"]["redis"] == "down" or any(
                            c["state"] == "down" for c in body["connectors"].values()
                        )
                    await writer.wait_for(len(writer.committed) + 50)
                    await asyncio.to_thread(target.server.start)  # empty
                    for node in nodes:
                        await node.wait_ready(200, timeout=30)
                    for tally in tallies:  # told before the rest is checked
                        await wait_until(
                            functools.partial(told_of_loss, tally),
                            30,
                            f"{tally.name} told of the lost history",
                        )
                    back = len(writer.committed)
                    await writer.wait_for(back + 50)
                committed = writer.committed
                after = committed[back:]
                for tally in tallies:
                    async with asyncio.timeout(60):
                        while not set(after) <= set(tally.keys):
                            tally._progress.clear()
                            await tally._progress.wait()
                    assert silent_holes(tally) == []
                    mine = [k for k in tally.keys if k in set(after)]
                    assert mine == after, f"{tally.name}: rows after the restart differ"
                    assert all(k in set(committed) for k in tally.keys)


@pytest.mark.skipif(haproxy_binary() is None, reason="haproxy missing: apt-get install haproxy")
async def test_through_the_load_balancer_websocket_and_long_polling_clients_resume(
    pg: PgDatabase, redis_target: RedisTarget, tmp_path: Path
) -> None:
    await orders(pg)
    prefix = redis_target.prefix.rstrip(":")
    config = write_postgres_config(tmp_path / "feed.toml", pg.url, redis_target.url, prefix)
    async with running_cluster(config) as nodes:
        balancer = await LoadBalancer(tmp_path, [(n.name, n.port) for n in nodes]).start()
        tallies: list[Tally] = []
        try:
            await reading_node(nodes)
            for transports in (("websocket",), ("polling",)):
                tally = Tally(ROOM, lambda: [balancer.url], name=f"via-lb-{transports[0]}")
                tally.transports = transports
                tallies.append(await tally.start())
            async with Writer(pg) as writer:
                await writer.wait_for(60)
                # The clients all come from 127.0.0.1, so the balancer keeps them on one node:
                # kill -9 that node (whether or not it reads the connector).
                busy = []
                for node in nodes:
                    if await _metric(node, "feed_clients") >= 2:
                        busy.append(node)
                assert len(busy) == 1, "the balancer should keep one address on one node"
                busy[0].kill()
                assert busy[0].process is not None
                await busy[0].process.wait()
                busy[0].process = None
                await writer.wait_for(len(writer.committed) + 100)
            committed = writer.committed
            await all_delivered(tallies, committed, resumed=True)
        finally:
            for tally in tallies:
                await tally.close()
            await balancer.stop()


async def _metric(node: FeedNode, name: str) -> float:
    import aiohttp

    async with aiohttp.ClientSession() as http, http.get(f"{node.url}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def test_a_long_polling_client_whose_poll_answer_is_cut_mid_body_resumes(
    pg: PgDatabase, redis_target: RedisTarget, tmp_path: Path
) -> None:
    """What a node killed behind HAProxy can do to a long-polling client: the answer to its
    poll arrives with its headers and half its body, then the connection drops. python-engineio
    then loses its read loop without a disconnect; the Tally notices (as dbfeed_client does),
    resumes on another node, and still has to get every committed row once."""
    await orders(pg)
    prefix = redis_target.prefix.rstrip(":")
    config = write_postgres_config(tmp_path / "feed.toml", pg.url, redis_target.url, prefix)
    async with running_cluster(config) as nodes:
        proxy = CuttableProxy(nodes[0].port)
        await proxy.start()
        urls = [f"http://127.0.0.1:{proxy.port}", nodes[1].url, nodes[2].url]
        tally = Tally(ROOM, lambda: urls, name="cut-poll")
        tally.transports = ("polling",)
        try:
            await reading_node(nodes)
            await tally.start()
            async with Writer(pg) as writer:
                await tally.wait_for(30)
                proxy.truncate_marker = b'["change'
                await writer.wait_for(len(writer.committed) + 100)
            assert proxy.truncate_marker is None, "a poll answer was cut"
            await all_delivered([tally], writer.committed, resumed=True)
            assert tally.wedges == 1, tally.errors
        finally:
            await tally.close()
            await proxy.close()


CLOCK_BEHIND = """
import time

_real = time.time
time.time = lambda: _real() - 60.0  # this process's wall clock, a minute behind the others'
"""


async def test_rooms_followed_on_a_node_whose_clock_is_behind_get_every_change(
    pg: PgDatabase, redis_target: RedisTarget, tmp_path: Path
) -> None:
    """A node whose wall clock is a minute behind the reader's (NTP failing on one machine):
    the filter and row rooms only its clients follow must still get every change. The registry
    compared expiries each node wrote by its own clock with the reader's clock, so the reader
    took that node's rooms for long expired and dropped them again and again: their clients
    silently missed changes (no gap, seqs contiguous), while target rooms were fine."""
    await orders(pg)
    await pg.conn.execute("INSERT INTO orders VALUES (0, 'row')")
    prefix = redis_target.prefix.rstrip(":")
    config = write_postgres_config(tmp_path / "feed.toml", pg.url, redis_target.url, prefix)
    skewed = tmp_path / "clock"
    skewed.mkdir()
    (skewed / "sitecustomize.py").write_text(CLOCK_BEHIND)
    first = FeedNode("node0", config)
    behind = FeedNode("behind", config, env={"PYTHONPATH": str(skewed)})
    try:
        await first.start()
        await reading_node([first])  # the reader keeps the right time
        await behind.start()
        await behind.wait_ready()
        urls = [behind.url]
        tallies = [
            await Tally(room, lambda: urls, name=room).start()
            for room in ("main:public.orders?status=eq.paid", "main:public.orders:0")
        ]
        try:
            conn = await pg.connect()
            try:
                for n in range(1, 121):  # about 6 s: many of the reader's registry reads
                    async with conn.transaction():
                        await conn.execute("INSERT INTO orders VALUES ($1, 'paid')", n)
                        await conn.execute("UPDATE orders SET status = $1 WHERE id = 0", f"r{n}")
                    await asyncio.sleep(0.05)
            finally:
                await conn.close()
            for tally in tallies:
                await tally.wait_for(120)
                assert tally.gaps == [] and tally.duplicates == 0 and tally.disorder == []
            assert tallies[0].keys == list(range(1, 121))
            assert tallies[1].keys == [0] * 120
        finally:
            for tally in tallies:
                await tally.close()
    finally:
        await behind.stop()
        await first.stop()
