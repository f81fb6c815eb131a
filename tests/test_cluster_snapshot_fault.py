"""A connector whose snapshot fails with an error that is not the feed's own (a third-party
connector's bug, a driver's exception): on a cluster the reading node answered nothing, the
task died with "Task exception was never retrieved", and the asking node's subscriber waited
30 s for a `snapshot_failed`. Now the reader answers at once, and logs the error once. And an
answer lost with the asking node's pub/sub connection is asked for again."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from typing import Any

import pytest

from connectors.base import RoomAddress, Snapshot
from connectors.memory import MemoryConnector
from tests.support import redis as redis_support
from tests.support.cluster import cluster_config, memory, reader_and_other
from tests.support.redis import RedisTarget
from tests.support.server import feed_client

redis_target = redis_support.redis_target
private_redis = redis_support.private_redis

pytestmark = pytest.mark.timeout(60)


class BrokenSnapshots(MemoryConnector):
    """A third-party connector (its `type` is this import path) whose snapshots fail."""

    async def snapshot(
        self, address: RoomAddress, where: Callable[[Mapping[str, Any]], bool], limit: int
    ) -> Snapshot:
        raise RuntimeError("the driver broke")


async def test_a_snapshot_failing_on_the_reader_is_answered_at_once(
    redis_target: RedisTarget, caplog: pytest.LogCaptureFixture
) -> None:
    config = cluster_config(redis_target.url, redis_target.prefix).replace(
        'type = "memory"', f'type = "{__name__}:BrokenSnapshots"'
    )
    caplog.set_level(logging.ERROR, logger="feed.engine")
    async with AsyncExitStack() as stack:
        _, other = await reader_and_other(stack, config)
        async with feed_client(other.url) as client:
            started = time.monotonic()
            ack = await asyncio.wait_for(client.subscribe("mem:public.orders", snapshot=True), 20)
            took = time.monotonic() - started
    assert ack["ok"] is False and ack["error"]["code"] == "snapshot_failed", ack
    assert took < 10, f"answered after {took:.1f}s"
    assert any("snapshot of" in r.getMessage() for r in caplog.records), caplog.records


class HeldSnapshots(MemoryConnector):
    """The memory connector, whose first snapshot waits for the test to let it go."""

    asked: asyncio.Event
    release: asyncio.Event
    calls = 0

    async def snapshot(
        self, address: RoomAddress, where: Callable[[Mapping[str, Any]], bool], limit: int
    ) -> Snapshot:
        HeldSnapshots.calls += 1
        if HeldSnapshots.calls == 1:
            HeldSnapshots.asked.set()
            await asyncio.wait_for(HeldSnapshots.release.wait(), 20)
        return await super().snapshot(address, where, limit)


async def test_an_answer_lost_with_the_asking_nodes_pubsub_connection_is_asked_again(
    private_redis: RedisTarget,
) -> None:
    """The reader's answer comes to the asking node's inbox over its pub/sub connection. Cut
    (Redis's output buffer limit, a network blip) while the reader took the snapshot, the node
    reconnected in 0.2 s, but the answer was published in between, to nobody: the node waited
    30 s for it and answered `snapshot_failed` (its client had given up at 10 s). Now the node
    asks again once it is back."""
    t = private_redis
    HeldSnapshots.asked, HeldSnapshots.release = asyncio.Event(), asyncio.Event()
    HeldSnapshots.calls = 0
    config = cluster_config(t.url, t.prefix).replace(
        'type = "memory"', f'type = "{__name__}:HeldSnapshots"'
    )
    async with AsyncExitStack() as stack:
        reader, other = await reader_and_other(stack, config)
        for i in range(3):
            memory(reader).write("public.orders", "insert", {"id": i})
        async with feed_client(other.url) as client:
            asking = asyncio.ensure_future(client.subscribe("mem:public.orders", snapshot=True))
            await asyncio.wait_for(HeldSnapshots.asked.wait(), 10)
            assert await t.kill_pubsub("") >= 1
            HeldSnapshots.release.set()  # answered while the asking node reconnects
            ack = await asyncio.wait_for(asking, 20)
    assert ack["ok"] is True, ack
    assert sorted(row["id"] for row in ack["snapshot"]) == [0, 1, 2], ack
    assert HeldSnapshots.calls == 2
