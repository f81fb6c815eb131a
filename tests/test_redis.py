"""The Redis connector against a real Redis (embedded, or FEED_TEST_REDIS_URL).

Each test works under its own key prefix, so the same tests can run on a shared server.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from connectors.base import RoomAddress
from connectors.redis import RedisConnector
from feed.core.change import Change, Gap
from feed.options import Options
from tests.support import redis as redis_support
from tests.support.redis import RedisTarget, text

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


redis_target = redis_support.redis_target


def connector(target: RedisTarget, **extra: Any) -> RedisConnector:
    return RedisConnector("cache", Options(target.config(**extra), "connectors[0]"))


async def take(stream: AsyncIterator[Change | Gap], count: int, timeout: float = 5.0) -> list[Any]:
    items: list[Any] = []
    async with asyncio.timeout(timeout):
        while len(items) < count:
            items.append(await anext(stream))
    return items


async def take_until(
    stream: AsyncIterator[Change | Gap],
    done: Callable[[Change | Gap], bool],
    timeout: float = 10.0,
) -> list[Any]:
    items: list[Any] = []
    async with asyncio.timeout(timeout):
        while not items or not done(items[-1]):
            items.append(await anext(stream))
    return items


async def test_each_event_family_becomes_a_change(redis_target: RedisTarget) -> None:
    t, r = redis_target, redis_target.admin
    k = t.key
    writes: list[tuple[str, str, Any]] = [
        ("set", k("s"), r.set(k("s"), "1")),
        ("incrby", k("s"), r.incr(k("s"))),
        ("append", k("s"), r.append(k("s"), "x")),
        ("setrange", k("s"), r.setrange(k("s"), 0, "9")),
        ("expire", k("s"), r.expire(k("s"), 100)),
        ("persist", k("s"), r.persist(k("s"))),
        ("rename_from", k("s"), r.rename(k("s"), k("s2"))),
        ("rename_to", k("s2"), None),
        ("del", k("s2"), r.delete(k("s2"))),
        ("hset", k("h"), r.hset(k("h"), "f", "v")),
        ("hincrby", k("h"), r.hincrby(k("h"), "n", 2)),
        ("hdel", k("h"), r.hdel(k("h"), "f")),
        ("lpush", k("l"), r.lpush(k("l"), "a", "b")),
        ("rpush", k("l"), r.rpush(k("l"), "c")),
        ("lpop", k("l"), r.lpop(k("l"))),
        ("lset", k("l"), r.lset(k("l"), 0, "z")),
        ("ltrim", k("l"), r.ltrim(k("l"), 0, 0)),
        ("sadd", k("set"), r.sadd(k("set"), "a", "b")),
        ("srem", k("set"), r.srem(k("set"), "a")),
        ("zadd", k("z"), r.zadd(k("z"), {"m": 1})),
        ("zincr", k("z"), r.zincrby(k("z"), 2, "m")),
        ("zrem", k("z"), r.zrem(k("z"), "m")),
        ("del", k("z"), None),  # removing the last member deletes the key
        ("xadd", k("x"), r.xadd(k("x"), {"f": "v"})),
        ("xtrim", k("x"), r.xtrim(k("x"), 0)),
        ("set", k("e"), r.set(k("e"), "v", px=20)),
        ("expire", k("e"), None),  # SET ... PX also announces the expiry it set
        ("expired", k("e"), None),
    ]
    async with connector(t) as source:
        stream = aiter(source.changes())
        for _, _, write in writes:
            if write is not None:
                await write
        # The last key expires on its own: wait for its event rather than sleeping.
        got = await take(stream, len(writes), timeout=10)
    assert [(c.op, c.key) for c in got] == [(op, key) for op, key, _ in writes]
    for change in got:
        assert isinstance(change, Change)
        assert change.source == "redis" and change.target == t.prefix + "*"
        assert change.after is None and change.ts is not None
    assert len({c.id for c in got}) == len(got)


async def test_one_change_per_matching_pattern(redis_target: RedisTarget) -> None:
    t = redis_target
    patterns = [t.key("session:*"), t.key("*")]
    async with connector(t, patterns=patterns) as source:
        stream = aiter(source.changes())
        await t.admin.set(t.key("session:abc"), "1")
        await t.admin.set(t.key("user:1"), "1")
        got = await take(stream, 3)
    assert sorted((c.target, c.key) for c in got) == sorted(
        [
            (t.key("session:*"), t.key("session:abc")),
            (t.key("*"), t.key("session:abc")),
            (t.key("*"), t.key("user:1")),
        ]
    )
    address = source.resolve(t.key("session:abc"))
    assert address == RoomAddress(t.key("session:*"), t.key("session:abc"))


async def test_values_for_each_type(redis_target: RedisTarget) -> None:
    t, r = redis_target, redis_target.admin
    k = t.key
    async with connector(t, fetch_values=True) as source:
        stream = aiter(source.changes())
        await r.set(k("s"), "hello")
        await r.hset(k("h"), mapping={"a": "1", "b": "2"})
        await r.rpush(k("l"), "x", "y")
        await r.sadd(k("set"), "b", "a")
        await r.zadd(k("z"), {"low": 1, "high": 2.5})
        entry = text(await r.xadd(k("x"), {"f": "v"}))
        await r.delete(k("h"))
        got = await take(stream, 7)
    after = {c.key: (c.op, c.after) for c in got[:6]}
    # Each image is the row a snapshot gives for its key: the key, its type and its value.
    assert after[k("s")] == ("set", {"key": k("s"), "type": "string", "value": "hello"})
    assert after[k("l")] == ("rpush", {"key": k("l"), "type": "list", "value": ["x", "y"]})
    assert after[k("set")] == ("sadd", {"key": k("set"), "type": "set", "value": ["a", "b"]})
    zset = [["low", 1.0], ["high", 2.5]]
    assert after[k("z")] == ("zadd", {"key": k("z"), "type": "zset", "value": zset})
    assert after[k("x")] == (
        "xadd",
        {"key": k("x"), "type": "stream", "value": [{"id": entry, "fields": {"f": "v"}}]},
    )
    # The hash event's value was read when the feed got to it: maybe after the delete, in
    # which case it says so (type "none" reads as no after image), never a stale guess.
    hashed = {"key": k("h"), "type": "hash", "value": {"a": "1", "b": "2"}}
    assert after[k("h")][1] in (hashed, None)
    assert (got[6].op, got[6].key, got[6].after) == ("del", k("h"), None)


async def test_large_values_are_truncated_with_a_flag(redis_target: RedisTarget) -> None:
    t, r = redis_target, redis_target.admin
    async with connector(t, fetch_values=True, max_value_bytes=100, max_value_items=10) as source:
        stream = aiter(source.changes())
        await r.set(t.key("big"), "x" * 1000)
        await r.rpush(t.key("long"), *[str(i) for i in range(50)])
        await r.hset(t.key("wide"), mapping={f"f{i}": "v" * 30 for i in range(5)})
        big, long, wide = await take(stream, 3)
    assert big.after["value"] == "x" * 100
    assert big.meta == {"truncated": True, "length": 1000}
    assert long.after["value"] == [str(i) for i in range(10)]
    assert long.meta == {"truncated": True, "length": 50}
    assert len(wide.after["value"]) < 5 and wide.meta["truncated"] is True


async def test_non_utf8_keys_and_values_are_base64(redis_target: RedisTarget) -> None:
    t, r = redis_target, redis_target.admin
    raw_key = t.key("").encode() + b"\xff\xfe"
    async with connector(t, fetch_values=True) as source:
        stream = aiter(source.changes())
        await r.set(raw_key, b"\x00\x9f")
        await r.set(t.key("text"), b"\xc3")
        binary, text_key = await take(stream, 2)
        snapshot = await source.snapshot(RoomAddress(t.key("*")), lambda row: True, 10)
    assert binary.key == base64.b64encode(raw_key).decode()
    assert binary.meta == {"key_base64": True, "value_base64": True}
    assert binary.after == {
        "key": binary.key,
        "type": "string",
        "value": base64.b64encode(b"\x00\x9f").decode(),
        "value_base64": True,
        "key_base64": True,
    }
    assert text_key.key == t.key("text") and text_key.meta == {"value_base64": True}
    assert binary.wire["key"] == binary.key  # JSON-safe
    rows = {row["key"]: row for row in snapshot.rows}
    assert rows[binary.key]["key_base64"] is True
    # A live image is the row a snapshot gives: a client keeping rows sees one shape.
    assert rows[binary.key] == binary.after
    assert rows[text_key.key] == text_key.after


async def test_snapshot_scans_the_pattern_bounded(redis_target: RedisTarget) -> None:
    t, r = redis_target, redis_target.admin
    for i in range(30):
        await r.set(t.key(f"k{i}"), str(i))
    await r.hset(t.key("h"), "f", "v")
    async with connector(t, fetch_values=True) as source:
        all_rows = await source.snapshot(RoomAddress(t.key("*")), lambda row: True, 100)
        some = await source.snapshot(RoomAddress(t.key("*")), lambda row: True, 5)
        one = await source.snapshot(RoomAddress(t.key("*"), t.key("h")), lambda row: True, 5)
        missing = await source.snapshot(RoomAddress(t.key("*"), t.key("nope")), lambda r: True, 5)
        hashes = await source.snapshot(
            RoomAddress(t.key("*")), lambda row: row["type"] == "hash", 100
        )
    assert len(all_rows.rows) == 31 and not all_rows.truncated
    assert {row["key"]: row["value"] for row in all_rows.rows}[t.key("k7")] == "7"
    assert len(some.rows) == 5 and some.truncated
    assert one.rows == [{"key": t.key("h"), "type": "hash", "value": {"f": "v"}}]
    assert missing.rows == []
    assert [row["key"] for row in hashes.rows] == [t.key("h")]
    change = Change("x", "cache", "redis", t.key("*"), "set", t.key("k1"))
    assert all_rows.covers(change) is False  # Redis snapshots are never exact


async def test_many_snapshots_at_once_do_not_starve_value_reads(redis_target: RedisTarget) -> None:
    """The connector reads values and snapshots through one pool of 8 connections. When more
    than 8 calls were under way (clients reloading together after a gap) redis-py raised
    "Too many connections": a snapshot failed, and worse, live changes went out without their
    value (`value_error`), so a client's rows kept the old one in silence. Now a call waits
    for a free connection."""
    t, r = redis_target, redis_target.admin
    for i in range(20):
        await r.hset(t.key(f"h{i}"), "n", str(i))
    async with connector(t, fetch_values=True) as source:
        stream = aiter(source.changes())
        room = RoomAddress(t.key("*"))
        snapshots = [source.snapshot(room, lambda row: True, 100) for _ in range(12)]
        results, _ = await asyncio.gather(
            asyncio.gather(*snapshots), r.hset(t.key("h3"), "n", "new")
        )
        [change] = await take(stream, 1)
    assert all(len(snapshot.rows) == 20 for snapshot in results)
    assert change.meta is None, change.meta
    assert change.after is not None and change.after["value"] == {"n": "new"}


async def test_snapshot_without_values_lists_keys_and_types(redis_target: RedisTarget) -> None:
    t = redis_target
    await t.admin.rpush(t.key("l"), "a")
    async with connector(t) as source:
        snap = await source.snapshot(RoomAddress(t.key("*")), lambda row: True, 10)
    assert snap.rows == [{"key": t.key("l"), "type": "list"}]


async def test_client_kill_pubsub_gives_a_gap_then_events_flow(redis_target: RedisTarget) -> None:
    t = redis_target
    source = connector(t)
    states: list[str] = []
    source.on_status(lambda status: states.append(status.state.value))
    async with source:
        stream = aiter(source.changes())
        await t.admin.set(t.key("a"), "1")
        before = (await take(stream, 1))[0]
        assert before.key == t.key("a")
        assert await t.kill_pubsub("feed:cache:events") >= 1
        gap = (await take(stream, 1))[0]
        assert isinstance(gap, Gap) and gap.connector == "cache" and gap.target is None
        assert "dropped" in gap.reason
        await t.admin.set(t.key("b"), "2")
        after = await take(stream, 1)
    assert after[0].key == t.key("b")
    assert after[0].id.rsplit("-", 1)[0] != before.id.rsplit("-", 1)[0]  # a new epoch
    assert states == ["up", "down", "up", "stopped"]


async def test_connector_restart_announces_a_gap(redis_target: RedisTarget) -> None:
    t = redis_target
    source = connector(t)
    async with source:
        stream = aiter(source.changes())
        await t.admin.set(t.key("a"), "1")
        first = await take(stream, 1)
    async with source:
        stream = aiter(source.changes())
        gap = (await take(stream, 1))[0]
        await t.admin.set(t.key("b"), "1")
        second = await take(stream, 1)
    assert isinstance(gap, Gap) and "restarted" in gap.reason
    assert first[0].id.rsplit("-", 1)[0] != second[0].id.rsplit("-", 1)[0]


async def test_check_describes_the_server(redis_target: RedisTarget) -> None:
    text = await connector(redis_target).check()
    assert text.startswith("redis ") and "keyspace mode" in text and ":" in text
    assert "notify-keyspace-events '" in text


async def test_values_keep_arrival_order_under_a_burst(redis_target: RedisTarget) -> None:
    """Batches are read concurrently; changes must still come out in the order Redis sent them."""
    t, r = redis_target, redis_target.admin
    async with connector(t, fetch_values=True) as source:
        stream = aiter(source.changes())
        for chunk in range(4):
            pipe = r.pipeline(transaction=False)
            for i in range(chunk * 500, chunk * 500 + 500):
                pipe.set(t.key(f"k{i}"), str(i))
            await pipe.execute()
        got = await take(stream, 2000, timeout=20)
    assert [c.key for c in got] == [t.key(f"k{i}") for i in range(2000)]
    assert all(
        c.after == {"key": c.key, "type": "string", "value": str(i)} for i, c in enumerate(got)
    )
