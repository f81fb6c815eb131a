"""Redis keyspace mode on edge cases users hit, through the real server and the Python client
library keeping rows (`snapshot=True`): what the client's rows hold must be what Redis holds.

Each test has a Redis server of its own where it changes the server's settings.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from dbfeed_client import FeedClient

from connectors.redis import RedisConnector
from feed.core.change import Change
from feed.errors import SourceMisconfigured
from feed.options import Options
from tests.support import redis as redis_support
from tests.support.redis import RedisTarget, text
from tests.support.server import RunningFeed, running_feed
from tests.test_redis_value_gap import Watch

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]
WAIT = 15.0

private_redis = redis_support.private_redis


def config(t: RedisTarget, extra: str = "") -> str:
    return f"""
[[connectors]]
name = "cache"
type = "redis"
url = "{t.url}"
patterns = ["{t.key("*")}"]
configure = true
fetch_values = true
health_check_interval = 0.5
capture_check_interval = 0.3
{extra}
"""


class Rows(Watch):
    """One subscription with `snapshot=True` (test_redis_value_gap's Watch), and a marker wait."""

    async def settled(self, t: RedisTarget) -> None:
        """Write a marker key and wait for it: every change before it has arrived."""
        marker, value = t.key("marker"), str(time.time_ns())
        await t.admin.set(marker, value)
        await self.until(
            lambda: any(
                c["key"] == marker and (c.get("after") or {}).get("value") == value
                for c in self.changes
            ),
            "the marker never arrived",
        )


@asynccontextmanager
async def rows_of(feed: RunningFeed, room: str) -> AsyncIterator[Rows]:
    async with FeedClient(feed.url) as client, client.subscribe(room, snapshot=True) as sub:
        yield Rows(sub)


async def wait_up(feed: RunningFeed) -> None:
    async with asyncio.timeout(WAIT):
        while feed.hub.connectors["cache"].status.state.value != "up":  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def test_key_miss_events_are_not_changes(private_redis: RedisTarget) -> None:
    """`m` (key-miss) events, set by another user of the server, are not changes: passed on,
    a GET of a missing watched key gave clients keeping rows a `{"key"}` stub for a key Redis
    does not hold, and the feed's own value read of that key (TYPE) was itself a miss, so one
    GET set off a keymiss, read, keymiss, ... loop that never stopped."""
    t = private_redis
    await t.admin.config_set("notify-keyspace-events", "KEAm")
    async with running_feed(config(t)) as feed:
        await wait_up(feed)
        async with rows_of(feed, f"cache:{t.key('*')}") as rows:
            await t.admin.get(t.key("missing"))
            await rows.settled(t)
            misses = int((await t.admin.info("stats"))["keyspace_misses"])
            await rows.settled(t)  # a round trip through the feed: a loop would add misses
            again = int((await t.admin.info("stats"))["keyspace_misses"])
            assert [c["op"] for c in rows.changes if c["key"] == t.key("missing")] == []
            assert t.key("missing") not in (rows.sub.rows or {})
            assert again - misses <= 1, f"the feed's own reads keep missing: {again - misses}"


async def test_a_user_refused_the_keyspace_channels_is_told_which_rule_to_add(
    private_redis: RedisTarget,
) -> None:
    """Redis (6.2 and 7) compares a PSUBSCRIBE pattern with a user's channel rules literally, so a
    user given `&__keyspace@3__:*` (what the docs used to say) may not subscribe to
    `__keyspace@3__:orders:*`, and Redis's refusal names no channel: the line now gives the
    exact `ACL SETUSER` to run."""
    t = private_redis
    await t.admin.config_set("notify-keyspace-events", "KEA")
    await t.admin.acl_setuser(
        "orders", enabled=True, passwords=["+pw"], keys=["*"], channels=["__keyspace@3__:*"],
        commands=["+@all"], reset_channels=True,
    )  # fmt: skip
    assert t.server is not None
    url = t.server.url(3).replace("redis://", "redis://orders:pw@")
    source = RedisConnector(
        "ord", Options({"url": url, "patterns": ["orders:*", "a?b*"]}, "connectors[0]")
    )
    with pytest.raises(SourceMisconfigured) as refused:
        await source.check()
    line = str(refused.value)
    assert "permission denied" in line and "password" not in line
    assert "run ACL SETUSER orders '&__keyspace@3__:orders:*' '&__keyspace@3__:a?b*'" in line
    await t.admin.acl_setuser(
        "orders",
        enabled=True,
        passwords=["+pw"],
        keys=["*"],
        commands=["+@all"],
        channels=["__keyspace@3__:orders:*", "__keyspace@3__:a?b*"],
        reset_channels=True,
    )
    assert "keyspace mode" in await source.check()


redis_target = redis_support.redis_target


async def test_text_cut_to_max_value_bytes_stays_text(redis_target: RedisTarget) -> None:
    """A UTF-8 value longer than `max_value_bytes` was cut at that byte, often inside a
    character: the cut value was no longer UTF-8 and went out base64 (`value_base64`), so
    the same text key arrived as text or as base64 depending on where the cut fell. The cut
    now backs off to the character's start; binary values are cut as before."""
    t = redis_target
    euros, big, binary = t.key("text"), t.key("list"), t.key("binary")
    async with running_feed(config(t, "max_value_bytes = 1000")) as feed:
        await wait_up(feed)
        async with rows_of(feed, f"cache:{t.key('*')}") as rows:
            await t.admin.set(euros, "€" * 400)  # 1,200 bytes: 1,000 is inside the 334th
            await t.admin.rpush(big, "aa😀" * 300)  # an element cut alone: 1,000 bytes
            await t.admin.set(binary, b"\xe2\x82" * 600)
            await rows.settled(t)
            snapshot = await asyncio.wait_for(_fresh_rows(feed, t), WAIT)
    for where in (rows.sub.rows or {}, snapshot):
        assert where[euros]["value"] == "€" * 333 and where[euros]["truncated"] is True
        assert "value_base64" not in where[euros]
        assert where[big]["value"] == ["aa😀" * 166 + "aa"] and "value_base64" not in where[big]
        assert where[binary]["value_base64"] is True and where[binary]["length"] == 1200


async def _fresh_rows(feed: RunningFeed, t: RedisTarget) -> dict[str, Any]:
    async with rows_of(feed, f"cache:{t.key('*')}") as rows:
        return dict(rows.sub.rows or {})


def streams_config(t: RedisTarget) -> str:
    return f"""
[[connectors]]
name = "ev"
type = "redis"
url = "{t.url}"
mode = "streams"
patterns = ["{t.key("a")}", "{t.key("b")}"]
offsets_key = "{t.key("offsets")}"
start = "latest"
health_check_interval = 0.2
"""


async def test_stream_positions_lost_while_running_are_saved_whole_again(
    redis_target: RedisTarget,
) -> None:
    """`offsets_key` evicted (an `allkeys-*` maxmemory policy), deleted or expired while the
    feed runs: the next save wrote only the streams that had moved since, so the others were
    missing at the next start, taken for new streams, and `start = "latest"` skipped what was
    written to them while the feed was stopped, with no gap. Every save now writes them all."""
    t = redis_target
    a, b, offsets = t.key("a"), t.key("b"), t.key("offsets")
    await t.admin.xadd(a, {"n": "0"})
    await t.admin.xadd(b, {"n": "0"})

    async def saved() -> dict[str, str]:
        return {text(k): text(v) for k, v in (await t.admin.hgetall(offsets)).items()}

    async def until_saved(stream: str, entry: bytes | str) -> None:
        async with asyncio.timeout(WAIT):
            while (await saved()).get(stream) != text(entry):  # noqa: ASYNC110
                await asyncio.sleep(0.05)

    async with running_feed(streams_config(t)) as feed:
        async with asyncio.timeout(WAIT):
            while feed.hub.connectors["ev"].status.state.value != "up":  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        await until_saved(b, await t.admin.xadd(b, {"n": "1"}))
        await t.admin.delete(offsets)  # as an eviction would
        await until_saved(a, await t.admin.xadd(a, {"n": "1"}))
        assert b in await saved(), "the save after the loss left stream b out"
    unseen = await t.admin.xadd(b, {"n": "written while the feed was stopped"})
    table = t.config(mode="streams", patterns=[a, b], offsets_key=offsets, start="latest")
    async with RedisConnector("ev", Options(table, "connectors[0]")) as source:
        changes = aiter(source.changes())
        await t.admin.xadd(b, {"n": "later"})
        first = await asyncio.wait_for(anext(changes), WAIT)
    assert isinstance(first, Change) and first.key == text(unseen), first


@pytest.mark.parametrize("kind", ["stream", "hash", "set"])
async def test_a_big_value_is_read_without_holding_redis(
    private_redis: RedisTarget, kind: str
) -> None:
    """The value script copied up to `max_value_items` whole elements into the script to keep
    the few `max_value_bytes` allows: one XREVRANGE COUNT 1000 for a stream's tail, HGETALL or
    SMEMBERS for a hash or set. With `fetch_values`, every change to a stream of 1,000 entries
    of 600 fields held Redis for about 140 ms (every client of the server waiting), to a hash
    of 1,000 fields of 40 KB about 60 ms. It now reads in growing windows (XREVRANGE ranges,
    HSCAN, SSCAN) and stops at the budget: 1 to 3 ms here. Timed by Redis itself."""
    t = private_redis
    key = t.key(kind)
    pipe = t.admin.pipeline(transaction=False)
    for i in range(1000):
        if kind == "stream":
            pipe.xadd(key, {f"field{j}": "v" * 10 for j in range(600)})
        elif kind == "hash":
            pipe.hset(key, f"field{i}", "v" * 40_000)
        else:
            pipe.sadd(key, f"{i:04}" + "v" * 40_000)
    await pipe.execute()
    async with running_feed(config(t)) as feed:
        await wait_up(feed)
        async with rows_of(feed, f"cache:{t.key('*')}") as rows:
            await t.admin.config_resetstat()
            if kind == "stream":
                await t.admin.xadd(key, {"field0": "last"})
            elif kind == "hash":
                await t.admin.hset(key, "last", "1")
            else:
                await t.admin.sadd(key, "last")
            await rows.until(
                lambda: any(c["key"] == key and c["after"] for c in rows.changes),
                "the change never arrived",
            )
    row = (rows.sub.rows or {})[key]
    assert row["truncated"] is True and row["length"] == 1001
    assert 0 < len(row["value"]) < 1001
    stats = (await t.admin.info("commandstats"))["cmdstat_evalsha"]
    assert stats["calls"] >= 1 and stats["usec_per_call"] < 15_000, stats
