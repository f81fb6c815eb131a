"""dbfeed_client: unsubscribing while a reload's snapshot is being retried.

A subscription with a snapshot reloads on a gap. When the new snapshot fails (`snapshot_failed`:
a source slow or briefly down; seen under load with Redis), the server takes the client out of
the room and the library asks again after a backoff. An application that unsubscribed in that
window got `FeedError: not_subscribed` from `unsubscribe()`, for a room it had never been told
it left: under the probe's churn, a dozen times in 25 s. Leaving a room the server already took
us out of is done, not an error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from dbfeed_client import FeedClient

from connectors.base import RoomAddress, Snapshot
from connectors.memory import MemoryConnector
from feed.errors import SourceUnavailable
from tests.support.server import running_feed
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)
WAIT = 15.0


class FlakySnapshots(MemoryConnector):
    """A memory connector whose snapshots fail while `failing` is set."""

    failing = False

    async def snapshot(
        self, address: RoomAddress, where: Callable[[Mapping[str, Any]], bool], limit: int
    ) -> Snapshot:
        if self.failing:
            raise SourceUnavailable("the source is busy")
        return await super().snapshot(address, where, limit)


CONFIG = f"""
[[connectors]]
name = "mem"
type = "{__name__}:FlakySnapshots"
targets = ["public.orders"]
"""


async def test_unsubscribe_while_a_reload_snapshot_is_retried() -> None:
    async with running_feed(CONFIG) as feed:
        source = feed.hub.connectors["mem"]
        assert isinstance(source, FlakySnapshots)
        source.write("public.orders", "insert", {"id": 1, "status": "new"})
        async with FeedClient(feed.url) as client:
            sub = client.subscribe("mem:public.orders", snapshot=True)
            await asyncio.wait_for(sub.ready(), WAIT)
            assert sub.rows == {"1": {"id": 1, "status": "new"}}
            source.failing = True
            source.announce_gap("the source restarted")
            # The reload's snapshot failed, and the library waits to ask again.
            await wait_until(lambda: sub._retries >= 1, WAIT, "a failed reload snapshot")
            await asyncio.wait_for(sub.unsubscribe(), WAIT)  # raised not_subscribed
            # The connection is still usable: the room can be followed again.
            source.failing = False
            again = client.subscribe("mem:public.orders", snapshot=True)
            await asyncio.wait_for(again.ready(), WAIT)
            assert again.rows == {"1": {"id": 1, "status": "new"}}
