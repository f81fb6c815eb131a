"""A connector whose snapshot fails with an error that is not the feed's own (a third-party
connector's bug, a driver's exception): on a cluster the reading node answered nothing, the
task died with "Task exception was never retrieved", and the asking node's subscriber waited
30 s for a `snapshot_failed`. Now the reader answers at once, and logs the error once."""

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
from tests.support.cluster import cluster_config, reader_and_other
from tests.support.redis import RedisTarget
from tests.support.server import feed_client

redis_target = redis_support.redis_target

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
