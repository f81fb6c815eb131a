"""A large snapshot asked of the reading node by another node of a cluster.

The reader used to publish the whole answer (every row) as one pub/sub message to the asking
node's inbox. Redis holds a pub/sub message in the subscriber's output buffer, and cuts the
subscriber once that buffer passes `client-output-buffer-limit pubsub` (32 MB by default: a
`snapshot_limit` of 1,000 Redis keys of 32 KB each, or 100,000 small hashes, is more). The asking
node lost its one pub/sub connection (every room it relays), the answer never came, the client
retried after 30 s and cut it again, forever. Now an answer past a few hundred KB is left in a
key that expires, and only its name is published.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import pytest
from dbfeed_client import FeedClient

from tests.support import redis as redis_support
from tests.support.cluster import cluster_config, memory, reader_and_other
from tests.support.redis import RedisTarget
from tests.support.waiting import wait_until

private_redis = redis_support.private_redis

pytestmark = pytest.mark.timeout(60)

ROWS = 120
BLOB = "x" * 10_000  # 120 rows of 10 KB: a 1.2 MB answer, over the 1 MB limit set below


async def test_a_snapshot_larger_than_the_pubsub_output_limit_reaches_the_other_node(
    private_redis: RedisTarget,
) -> None:
    t = private_redis
    await t.admin.config_set("client-output-buffer-limit", "pubsub 1mb 0 0")
    config = cluster_config(t.url, t.prefix).replace(
        "[server]\n", "[server]\nsnapshot_limit = 5000\n"
    )
    async with AsyncExitStack() as stack:
        reader, other = await reader_and_other(stack, config)
        for i in range(ROWS):
            memory(reader).write("public.orders", "insert", {"id": i, "blob": BLOB})
        # Routed before any node follows the room: else the reader may publish them to it while
        # the other node subscribes, 1.2 MB of live changes past the 1 MB limit set above, which
        # cuts that node's pub/sub connection (and its first snapshot request with it).
        await asyncio.wait_for(memory(reader).routed(), 10)
        async with FeedClient(other.url) as client:
            sub = client.subscribe("mem:public.orders", snapshot=True)
            await asyncio.wait_for(sub.ready(), 20)
            rows = sub.rows
            assert rows is not None
            await wait_until(lambda: len(rows) == ROWS, 10, "the whole snapshot")
            assert all(row["blob"] == BLOB for row in rows.values())
            # The asking node kept its pub/sub connection: live changes still come through.
            memory(reader).write("public.orders", "insert", {"id": ROWS, "blob": "new"})
            await wait_until(lambda: str(ROWS) in rows, 10, "a change after the snapshot")
            assert sub.state == "live", sub.state
        # An answer left in Redis expires: taken and removed when the asking node read it, and
        # with a TTL when it did not (a request asked again: under load the asking node's pub/sub
        # connection was once cut by the test's 1 MB limit anyway, and the first answer stayed).
        pattern = f"{t.prefix.rstrip(':')}:answer:*"
        left = [key async for key in t.admin.scan_iter(match=pattern)]
        expiring = [await t.admin.pttl(key) > 0 for key in left]
        assert all(expiring), left
