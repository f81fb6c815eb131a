"""A large snapshot asked of the reading node by another node of a cluster.

The reader used to publish the whole answer (every row) as one pub/sub message to the asking
node's inbox. Redis holds a pub/sub message in the subscriber's output buffer, and cuts the
subscriber once that buffer passes `client-output-buffer-limit pubsub` (32 MB by default: a
`snapshot_limit` of 1,000 Redis keys of 32 KB each, or 100,000 small hashes, is more). The asking
node lost its one pub/sub connection (every room it relays), the answer never came, the client
retried after 30 s and cut it again, forever. Now an answer past a few hundred KB is left in a
key that expires, and only its name is published.

The live changes behind such a snapshot are bounded too: one script call of the reader publishes
each room's run of its batch as one message, held whole in every subscriber's output buffer until
the call ends, so a batch stops at feed.engine.batch.MAX_BATCH_BYTES. These tests lower the
limit to 1 MB and check in Redis's log that it cut nobody: a cut the node recovered from (it
reconnects and fills from the history) would otherwise pass unseen.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import pytest
from dbfeed_client import FeedClient

from tests.support import redis as redis_support
from tests.support.cluster import cluster_config, memory, reader_and_other, subscribed
from tests.support.redis import RedisTarget
from tests.support.server import FeedClient as RawClient
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
        # Published before any node follows the room: the snapshot is what this test sends, not
        # these as live changes. `routed` alone is not that: the reader's first script call was
        # still under way (it opens its connection and loads the script) when the other node
        # subscribed, 4 runs in 15 on an idle machine, and then the room's 120 changes went to
        # it as one 1.2 MB message, past the 1 MB limit set above, before MAX_BATCH_BYTES.
        await asyncio.wait_for(memory(reader).routed(), 10)
        batcher = reader.engine._batchers["mem"]
        await wait_until(lambda: batcher.published >= ROWS, 10, "the rows published")
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
    assert await t.output_buffer_cuts() == []


async def test_a_burst_of_large_changes_does_not_cut_a_node_that_follows_the_room(
    private_redis: RedisTarget,
) -> None:
    """120 changes of 10 KB written at once: one batch, which the reader published to the room
    as one 1.2 MB message, and Redis cut the other node, whose client follows the room, however
    fast it read (it then filled the changes in from the history, or announced a gap when the
    history no longer held them). Under the default 32 MB limit, 256 rows of 128 KB did the
    same, on every such batch."""
    t = private_redis
    await t.admin.config_set("client-output-buffer-limit", "pubsub 1mb 0 0")
    config = cluster_config(t.url, t.prefix, history=500)
    async with AsyncExitStack() as stack:
        reader, other = await reader_and_other(stack, config)
        client = await RawClient().connect(other.url)
        stack.push_async_callback(client.close)
        await subscribed(client, "mem:public.orders")
        for i in range(ROWS):
            memory(reader).write("public.orders", "insert", {"id": i, "blob": BLOB})
        got = [await client.next_change(10) for _ in range(ROWS)]
        assert [c["seq"] for c in got] == list(range(1, ROWS + 1))
        assert all(c["after"]["blob"] == BLOB for c in got)
        assert client.gaps.empty(), client.gaps.get_nowait()
    assert await t.output_buffer_cuts() == []
