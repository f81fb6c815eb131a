"""A filtered Redis snapshot counts toward `snapshot_limit` only the rows the room keeps.

Before, the keyspace snapshot stopped after `snapshot_limit + 1` keys matching the pattern and
filtered those: a room of 5 matching keys among 3,000 got at most the ones it happened to meet
and `snapshot_truncated: true`, which also told a tenant that other tenants' keys passed the
limit. A real Redis, the real server, a real Socket.IO client.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from feed.security.auth import hash_token
from tests.support import redis as redis_support
from tests.support.redis import RedisTarget
from tests.support.server import RunningFeed, feed_client, running_feed

pytestmark = [pytest.mark.redis, pytest.mark.timeout(90)]
WAIT = 15.0

redis_target = redis_support.redis_target


def config(t: RedisTarget, server: str = "", connector: str = "") -> str:
    return f"""
[server]
{server}

[[connectors]]
name = "cache"
type = "redis"
url = "{t.url}"
patterns = ["{t.key("user:*")}"]
configure = true
fetch_values = true
health_check_interval = 0.5
{connector}
"""


async def wait_up(feed: RunningFeed, connector: str = "cache") -> None:
    async with asyncio.timeout(WAIT):
        while feed.hub.connectors[connector].status.state.value != "up":  # noqa: ASYNC110
            await asyncio.sleep(0.02)


PRO = {7, 1100, 1999, 2500, 2998}


@pytest.fixture
async def pro_users(redis_target: RedisTarget) -> RedisTarget:
    """3,000 hashes `user:<n>`, those numbered in PRO with plan pro, the others free."""
    t = redis_target
    pipe = t.admin.pipeline(transaction=False)
    for n in range(3000):
        pipe.hset(t.key(f"user:{n}"), mapping={"plan": "pro" if n in PRO else "free"})
    await pipe.execute()
    return t


async def pro_snapshot(t: RedisTarget, server: str, connector: str = "") -> dict[str, Any]:
    """The snapshot a client subscribing to `user:*` filtered to plan pro gets, from a feed of
    `config(t, server, connector)`."""
    async with running_feed(config(t, server, connector)) as feed:
        await wait_up(feed)
        async with feed_client(feed.url) as client:
            ack: dict[str, Any] = await client.subscribe(
                f"cache:{t.key('user:*')}", filter="value.plan=eq.pro", snapshot=True
            )
    assert ack["ok"], ack
    return ack


async def test_a_filter_room_gets_its_rows_among_more_keys_than_the_limit(
    pro_users: RedisTarget,
) -> None:
    t = pro_users
    ack = await pro_snapshot(t, "snapshot_limit = 1000")
    assert sorted(ack["snapshot_keys"]) == sorted(t.key(f"user:{n}") for n in PRO)
    assert ack["snapshot_truncated"] is False


async def test_kept_rows_past_the_limit_are_cut(pro_users: RedisTarget) -> None:
    t = pro_users
    ack = await pro_snapshot(t, "snapshot_limit = 3")
    assert len(ack["snapshot"]) == 3
    assert {row["value"]["plan"] for row in ack["snapshot"]} == {"pro"}
    assert set(ack["snapshot_keys"]) < {t.key(f"user:{n}") for n in PRO}
    assert ack["snapshot_truncated"] is True


async def test_exactly_the_limit_of_kept_rows_is_whole(pro_users: RedisTarget) -> None:
    ack = await pro_snapshot(pro_users, "snapshot_limit = 5")
    assert len(ack["snapshot"]) == 5
    assert ack["snapshot_truncated"] is False


async def test_a_scan_stopped_at_its_limit_says_truncated(pro_users: RedisTarget) -> None:
    """`snapshot_scan_limit` still bounds the keys examined, and a snapshot cut there says so
    even with fewer rows than `snapshot_limit`."""
    ack = await pro_snapshot(pro_users, "snapshot_limit = 1000", "snapshot_scan_limit = 1000")
    assert len(ack["snapshot"]) < len(PRO)
    assert ack["snapshot_truncated"] is True


async def test_a_tenants_snapshot_does_not_count_other_tenants_keys(
    redis_target: RedisTarget,
) -> None:
    """The forced row filter (docs/security.md) is the room's filter too: 3,000 of another
    tenant's keys neither cut acme's 5 rows nor say `snapshot_truncated` (a bit about them)."""
    t = redis_target
    pipe = t.admin.pipeline(transaction=False)
    for n in range(3000):
        tenant = "acme" if n in PRO else "globex"
        pipe.hset(t.key(f"user:{n}"), mapping={"tenant": tenant})
    await pipe.execute()
    tenants = f"""
[auth]
mode = "token"

[[auth.tokens]]
name = "acme-svc"
sha256 = "{hash_token("acme-token-0002")}"
roles = ["tenant"]
claims = {{ tenant = "acme" }}

[[auth.rules]]
roles = ["tenant"]
allow = ["cache:*"]
row_filter = "value.tenant=eq.{{tenant}}"
"""
    async with running_feed(config(t, "snapshot_limit = 1000") + tenants) as feed:
        await wait_up(feed)
        async with feed_client(feed.url, auth={"token": "acme-token-0002"}) as acme:
            ack = await acme.subscribe(f"cache:{t.key('user:*')}", snapshot=True)
    assert ack["ok"], ack
    assert sorted(ack["snapshot_keys"]) == sorted(t.key(f"user:{n}") for n in PRO)
    assert ack["snapshot_truncated"] is False


def streams_config(t: RedisTarget, limit: int, connector: str = "") -> str:
    return f"""
[server]
snapshot_limit = {limit}

[[connectors]]
name = "events"
type = "redis"
url = "{t.url}"
mode = "streams"
patterns = ["{t.key("orders")}"]
start = "earliest"
offsets_key = "{t.key("offsets")}"
health_check_interval = 0.5
{connector}
"""


async def orders(t: RedisTarget, total: int, pro: set[int]) -> None:
    """`total` entries in the stream `orders`, field `n` numbering them; those in `pro` with
    plan pro, the others free. Written before the feed starts: it reads from the start."""
    pipe = t.admin.pipeline(transaction=False)
    for n in range(total):
        pipe.xadd(t.key("orders"), {"n": str(n), "plan": "pro" if n in pro else "free"})
    await pipe.execute()


async def streams_snapshot(t: RedisTarget, config: str) -> dict[str, Any]:
    async with running_feed(config) as feed:
        await wait_up(feed, "events")
        async with feed_client(feed.url) as client:
            return await client.subscribe(
                f"events:{t.key('orders')}", filter="plan=eq.pro", snapshot=True
            )


@pytest.mark.parametrize("key_field", [False, True], ids=["entries", "key_field"])
async def test_a_filtered_stream_snapshot_counts_only_the_rows_it_keeps(
    redis_target: RedisTarget, key_field: bool
) -> None:
    """Streams mode read the newest `snapshot_limit` + 1 entries (with `key_field`: cut the
    current rows at the limit) before the filter, so the older pro entries were missing."""
    t = redis_target
    await orders(t, 3000, PRO)
    extra = 'key_field = "n"' if key_field else ""
    ack = await streams_snapshot(t, streams_config(t, 1000, extra))
    assert ack["ok"], ack
    assert sorted(int(row["n"]) for row in ack["snapshot"]) == sorted(PRO)
    assert ack["snapshot_truncated"] is False
    cut = await streams_snapshot(t, streams_config(t, 3, extra))
    assert [int(row["n"]) for row in cut["snapshot"]] == sorted(PRO)[-3:]  # the newest, in order
    assert cut["snapshot_truncated"] is True


async def test_a_stream_snapshot_stopped_at_the_scan_limit_says_truncated(
    redis_target: RedisTarget,
) -> None:
    t = redis_target
    await orders(t, 3000, PRO)
    ack = await streams_snapshot(t, streams_config(t, 1000, "snapshot_scan_limit = 1200"))
    assert ack["ok"], ack
    assert sorted(int(row["n"]) for row in ack["snapshot"]) == [1999, 2500, 2998]
    assert ack["snapshot_truncated"] is True
