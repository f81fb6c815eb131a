"""Redis keyspace flags changed under a running feed (issue 17): announced, never silent.

Each test has a Redis server of its own, because it changes the server's notify-keyspace-events.
"""

from __future__ import annotations

from typing import Any

import pytest

from connectors.redis import RedisConnector
from feed.core.change import Change, Gap
from feed.options import Options
from tests.support import redis as redis_support
from tests.support.redis import RedisTarget
from tests.support.server import feed_client, running_feed
from tests.test_capture_watch import eventually, next_status, ready, wait_ready
from tests.test_redis import take_until

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

CHECK = 0.3
FLAGS = "notify-keyspace-events"


private_redis = redis_support.private_redis


def connector(target: RedisTarget, **extra: Any) -> RedisConnector:
    table = target.config(capture_check_interval=CHECK, **extra)
    return RedisConnector("cache", Options(table, "connectors[0]"))


async def flags(t: RedisTarget) -> str:
    value = (await t.admin.config_get(FLAGS))[FLAGS]
    return value.decode() if isinstance(value, bytes) else str(value)


async def test_flags_cleared_are_announced_until_set_again(private_redis: RedisTarget) -> None:
    t = private_redis
    await t.admin.config_set(FLAGS, "Kg$lshzxet")
    config = f"""
[[connectors]]
name = "cache"
type = "redis"
url = "{t.url}"
patterns = ["{t.key("*")}"]
configure = false
health_check_interval = 0.5
capture_check_interval = {CHECK}
"""
    room = f"cache:{t.key('*')}"
    async with running_feed(config) as feed, feed_client(feed.url) as client:
        await wait_ready(feed.url, 200)
        assert (await client.subscribe(room))["ok"]
        await t.admin.set(t.key("a"), "1")
        assert (await client.next_change())["key"] == t.key("a")
        await t.admin.config_set(FLAGS, "")
        await t.admin.set(t.key("lost"), "1")  # Redis publishes nothing for this one
        gap = await client.next_gap()
        assert gap["room"] == room and "notify-keyspace-events" in gap["reason"]
        down = await next_status(client, "down", connector="cache")
        assert "CONFIG SET notify-keyspace-events 'Kg$lshzxet'" in down["detail"]
        assert await ready(feed.url) == 503
        await t.admin.config_set(FLAGS, "Kg$lshzxet")
        closing = await client.next_gap()
        assert "again" in closing["reason"]
        await next_status(client, "up", connector="cache")
        await wait_ready(feed.url, 200)
        await t.admin.set(t.key("b"), "1")
        assert (await client.next_change())["key"] == t.key("b")
        assert client.changes.empty()


async def test_configure_true_reapplies_the_flags_and_still_announces(
    private_redis: RedisTarget,
) -> None:
    t = private_redis
    source = connector(t, configure=True)
    async with source:
        stream = aiter(source.changes())
        await t.admin.config_set(FLAGS, "")
        items = await take_until(stream, lambda item: isinstance(item, Gap), timeout=10)
        assert "re-applied" in items[-1].reason
        assert set("Kg$lshzxet") <= set(await flags(t))
        assert source.capture_faults == {"keyspace_flags": 1}
        await eventually(lambda: _state(source), "up", "the connector back up")
        await t.admin.set(t.key("b"), "1")
        later = await take_until(stream, lambda item: isinstance(item, Change), timeout=10)
        assert later[-1].key == t.key("b")


async def _state(source: RedisConnector) -> str:
    return source.status.state.value


async def test_a_flush_is_announced_with_a_gap(private_redis: RedisTarget) -> None:
    """FLUSHDB, FLUSHALL and SWAPDB remove keys without a keyspace event: the feed reads their
    counts in INFO commandstats with the flags, and a count that grew is a gap (a client with a
    snapshot reloads it). Before, the keys were gone and nothing said so."""
    t = private_redis
    source = connector(t, configure=True)
    async with source:
        stream = aiter(source.changes())
        await t.admin.set(t.key("a"), "1")
        first = await take_until(stream, lambda item: isinstance(item, Change), timeout=10)
        assert [item.key for item in first] == [t.key("a")]
        for flush in ("FLUSHDB", "FLUSHALL", "SWAPDB 0 1"):
            await t.admin.execute_command(*flush.split())  # type: ignore[no-untyped-call]
            await t.admin.set(t.key("b"), "1")  # an event after it: the gap comes, in any order
            items = await take_until(stream, lambda item: isinstance(item, Gap), timeout=10)
            assert "FLUSHDB, FLUSHALL or SWAPDB ran" in items[-1].reason, items
        assert source.capture_faults.get("flush") == 3
