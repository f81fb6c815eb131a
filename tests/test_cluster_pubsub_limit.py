"""A node that Redis cuts for passing `client-output-buffer-limit pubsub`.

Redis closes a subscriber whose output buffer passes the limit (32 MB, or 8 MB for a minute, by
default): a node that stops reading for a while (a long pause, a starved CPU) while its rooms
receive more than that, or one change larger than a limit set below 1 MiB (a larger change is
published as a reference: tests/test_cluster_large_change.py). Everything in that
buffer is dropped with the connection. The node must then say so or make up for it, room by
room: it reconnects, and delivers what it missed from each room's history, or sends a `gap` when
the history no longer holds it; never a silent hole. These tests make the cut happen for real
(a change larger than a lowered limit) and check, in Redis's log, that it did.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest

from tests.support import redis as redis_support
from tests.support.cluster import cluster_config, memory, reader_and_other, subscribed
from tests.support.redis import RedisTarget
from tests.support.server import FeedClient

private_redis = redis_support.private_redis

pytestmark = pytest.mark.timeout(60)

LIMIT = "pubsub 64kb 0 0"
BIG = "x" * 100_000  # one change past the limit: its message cuts whoever follows the room


async def test_a_node_cut_by_the_output_buffer_limit_delivers_what_it_missed_from_history(
    private_redis: RedisTarget,
) -> None:
    t = private_redis
    await t.admin.config_set("client-output-buffer-limit", LIMIT)
    config = cluster_config(t.url, t.prefix, history=500)
    async with AsyncExitStack() as stack:
        reader, other = await reader_and_other(stack, config)
        client = await FeedClient().connect(other.url)
        stack.push_async_callback(client.close)
        await subscribed(client, "mem:public.orders")
        memory(reader).write("public.orders", "insert", {"id": 1, "blob": "a"})
        memory(reader).write("public.orders", "insert", {"id": 2, "blob": BIG})
        memory(reader).write("public.orders", "insert", {"id": 3, "blob": "c"})
        got = await client.take(3, 20)
        assert [c["seq"] for c in got] == [1, 2, 3]
        assert [c["key"] for c in got] == [1, 2, 3]
        assert got[1]["after"]["blob"] == BIG
        memory(reader).write("public.orders", "insert", {"id": 4, "blob": "d"})
        after = await client.next_change(10)
        assert (after["seq"], after["key"]) == (4, 4)
        assert client.gaps.empty(), client.gaps.get_nowait()
    assert len(await t.output_buffer_cuts()) >= 1, "Redis cut nobody: the test tests nothing"


async def test_a_node_cut_after_the_history_moved_on_sends_a_gap(
    private_redis: RedisTarget,
) -> None:
    t = private_redis
    await t.admin.config_set("client-output-buffer-limit", LIMIT)
    # One entry per stream node, so that `XADD MAXLEN ~` trims to `history` exactly.
    await t.admin.config_set("stream-node-max-entries", 1)
    config = cluster_config(t.url, t.prefix, history=2)
    async with AsyncExitStack() as stack:
        reader, other = await reader_and_other(stack, config)
        client = await FeedClient().connect(other.url)
        stack.push_async_callback(client.close)
        await subscribed(client, "mem:public.orders")
        memory(reader).write("public.orders", "insert", {"id": 1, "blob": BIG})
        for i in range(2, 6):
            memory(reader).write("public.orders", "insert", {"id": i, "blob": "small"})
        gap = await client.next_gap(20)
        assert gap["room"] == "mem:public.orders"
        assert gap["seq"] == 5, gap
        # Whatever came before the gap came in order; the gap covers the rest.
        seen = []
        while not client.changes.empty():
            seen.append(client.changes.get_nowait()["seq"])
        assert seen == list(range(1, len(seen) + 1)), seen
        memory(reader).write("public.orders", "insert", {"id": 6, "blob": "after"})
        after = await client.next_change(10)
        assert (after["seq"], after["key"]) == (6, 6)
    assert len(await t.output_buffer_cuts()) >= 1, "Redis cut nobody: the test tests nothing"
