"""A network partition that closes nothing: a node, or a client, cut off by a blackhole.

Packets dropped, no RST and no FIN: every socket stays open and nothing answers
(tests/support/proxy.py's `Blackhole` between each node and Redis). The kill -9, SIGSTOP and
restart cases are in tests/test_cluster.py and tests/test_cluster_processes.py; here the part of
the cluster that is cut off is still alive and still believes what it believed before.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from urllib.parse import urlsplit, urlunsplit

import pytest
from redis.asyncio import Redis

from tests.support import redis as redis_support
from tests.support.cluster import cluster_config, memory, reader_of, subscribed
from tests.support.proxy import Blackhole
from tests.support.redis import RedisTarget
from tests.support.server import RunningFeed, feed_client, running_feed

redis_target = redis_support.redis_target

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]


def through(url: str, port: int) -> str:
    """`url` with its host and port replaced by the proxy's."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


async def nodes_behind_blackholes(
    stack: AsyncExitStack, target: RedisTarget, count: int, lease: float
) -> tuple[list[RunningFeed], list[Blackhole]]:
    """`count` nodes, each reaching the cluster's Redis through a blackhole of its own."""
    port = urlsplit(target.url).port or 6379
    nodes, holes = [], []
    for i in range(count):
        hole = await stack.enter_async_context(Blackhole(port))
        config = cluster_config(through(target.url, hole.port), target.prefix, lease=lease)
        config = config.replace("[cluster]\n", f'[cluster]\nnode = "cut{i}"\n')
        nodes.append(await stack.enter_async_context(running_feed(config)))
        holes.append(hole)
    return nodes, holes


async def test_a_reader_cut_off_from_redis_stops_reading_before_another_node_takes_over(
    redis_target: RedisTarget,
) -> None:
    """The reader's renewals go unanswered (nothing closed): it must end its reading before its
    lease can run out in Redis, so that no two nodes read the connector at once. It used to wait
    for the renewal's own answer timeout and a third of the lease more, and read on for about
    0.7 s (lease 2) to 7 s (lease 10) after another node had taken the connector over."""
    async with AsyncExitStack() as stack:
        nodes, holes = await nodes_behind_blackholes(stack, redis_target, 2, lease=2.0)
        reader = await reader_of(nodes)
        other = next(n for n in nodes if n is not reader)
        holes[nodes.index(reader)].blackhole()
        cut = time.monotonic()
        stopped = taken = None
        async with asyncio.timeout(15):
            while stopped is None or taken is None:
                now = time.monotonic() - cut
                if stopped is None and "mem" not in reader.engine._leases:
                    stopped = now
                if taken is None and "mem" in other.engine._leases:
                    taken = now
                await asyncio.sleep(0.005)
        assert stopped < taken, (
            f"the old reader read on until {stopped:.2f} s, taken at {taken:.2f}"
        )
        assert taken < 2.0 + 0.5, f"another node took it over only after {taken:.2f} s"


async def renewed(admin: Redis, key: str) -> None:
    """Until the lease at `key` was just renewed (its time left jumps back up)."""
    last = await admin.pttl(key)
    async with asyncio.timeout(15):
        while True:
            await asyncio.sleep(0.01)
            now = await admin.pttl(key)
            if now > last + 200:
                return
            last = now


async def test_a_reader_whose_publication_goes_unanswered_tells_its_clients_why_at_once(
    redis_target: RedisTarget,
) -> None:
    """The reader is cut off from Redis while it publishes: its publication is given up after
    the answer timeout (5 s at lease 10), and its clients must then be told the connector is
    down, and why, at once. The reading's end used to wait for the lease's release, sent into
    the same partition, for another answer timeout: its clients read "stopped" for 5 s more,
    then only the node's own loss of Redis (10 s after the cut)."""
    async with AsyncExitStack() as stack:
        nodes, holes = await nodes_behind_blackholes(stack, redis_target, 2, lease=10.0)
        reader = await reader_of(nodes)
        client = await stack.enter_async_context(feed_client(reader.url))
        await subscribed(client, "mem:public.orders")
        # Cut just after a renewal, so the lease's own deadline (8.3 s on) comes after the
        # publication's answer timeout: that is what ends the reading here.
        await renewed(redis_target.admin, reader.engine.lease_key("mem"))
        holes[nodes.index(reader)].blackhole()
        cut = time.monotonic()
        memory(reader).write("public.orders", "insert", {"id": 1, "status": "new"})
        async with asyncio.timeout(20):
            while (status := await client.statuses.get())["state"] != "down":
                pass
        took = time.monotonic() - cut
        assert "cannot publish" in status["detail"], status
        assert took < 5 + 1 + 1, f"told after {took:.1f} s"
        await holes[nodes.index(reader)].heal()
