"""Redis through the whole product: a real Redis, the real server, real Socket.IO clients."""

from __future__ import annotations

import asyncio

import pytest

from tests.support import redis as redis_support
from tests.support.redis import RedisTarget
from tests.support.server import RunningFeed, feed_client, running_feed

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]
WAIT = 15.0


redis_target = redis_support.redis_target


def config(t: RedisTarget, extra: str = "") -> str:
    return f"""
[server]
replay_buffer = 50

[[connectors]]
name = "cache"
type = "redis"
url = "{t.url}"
patterns = ["{t.key("session:*")}", "{t.key("user:*")}"]
configure = true
fetch_values = true
health_check_interval = 0.5
{extra}
"""


async def wait_up(feed: RunningFeed, name: str = "cache") -> None:
    async with asyncio.timeout(WAIT):
        while feed.hub.connectors[name].status.state.value != "up":  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def test_set_reaches_pattern_and_key_rooms(redis_target: RedisTarget) -> None:
    t = redis_target
    key = t.key("session:abc")
    async with running_feed(config(t)) as feed:
        await wait_up(feed)
        async with feed_client(feed.url) as pattern_client, feed_client(feed.url) as key_client:
            ack = await pattern_client.subscribe(f"cache:{t.key('session:*')}")
            assert ack["ok"] and ack["room"] == f"cache:{t.key('session:*')}"
            ack = await key_client.subscribe(f"cache:{key}")
            assert ack["ok"], ack
            # The ack's canonical name resolves to the same room.
            again = await key_client.subscribe(ack["room"])
            assert again["ok"] and again["room"] == ack["room"]
            await t.admin.set(t.key("session:other"), "x")
            await t.admin.set(key, "hello")
            await t.admin.hset(t.key("user:1"), "name", "ada")  # another pattern's room
            first, second = await pattern_client.take(2)
            [mine] = await key_client.take(1)
    assert (first["op"], first["key"]) == ("set", t.key("session:other"))
    assert second["key"] == key and second["after"] == {
        "key": key,
        "type": "string",
        "value": "hello",
    }
    assert second["source"] == "redis" and second["target"] == t.key("session:*")
    assert mine["id"] == second["id"] and mine["room"] == ack["room"]
    assert pattern_client.changes.empty()


async def test_kill_pubsub_sends_gap_to_clients(redis_target: RedisTarget) -> None:
    t = redis_target
    async with running_feed(config(t)) as feed:
        await wait_up(feed)
        async with feed_client(feed.url) as client:
            room = f"cache:{t.key('session:*')}"
            assert (await client.subscribe(room))["ok"]
            await t.admin.set(t.key("session:a"), "1")
            await t.admin.set(t.key("session:a"), "2")
            before, _ = await client.take(2)
            assert await t.kill_pubsub("feed:cache:events") >= 1
            gap = await client.next_gap(timeout=WAIT)
            await t.admin.set(t.key("session:b"), "2")
            after = await client.next_change()
            resumed = await client.subscribe(room, since=before["seq"], epoch=gap.get("epoch"))
    assert gap["connector"] == "cache" and gap["room"] == room and "dropped" in gap["reason"]
    assert after["key"] == t.key("session:b")
    assert resumed["ok"] and resumed["recovered"] is False  # a gap since: reload


async def test_snapshot_on_subscribe(redis_target: RedisTarget) -> None:
    t = redis_target
    await t.admin.set(t.key("session:a"), "1")
    await t.admin.rpush(t.key("session:l"), "x", "y")
    async with running_feed(config(t)) as feed:
        await wait_up(feed)
        async with feed_client(feed.url) as client:
            ack = await client.subscribe(f"cache:{t.key('session:*')}", snapshot=True)
    assert ack["ok"], ack
    rows = {row["key"]: row for row in ack["snapshot"]}
    assert ack["snapshot_keys"] == [row["key"] for row in ack["snapshot"]]  # the Redis keys
    assert rows[t.key("session:a")]["value"] == "1"
    assert rows[t.key("session:l")] == {
        "key": t.key("session:l"),
        "type": "list",
        "value": ["x", "y"],
    }
    assert ack["snapshot_truncated"] is False


async def test_a_filter_room_hears_a_key_leave_it_or_go(redis_target: RedisTarget) -> None:
    """Redis sends no before image, so "the old value matched, the new one does not" cannot be
    read from the change: the feed follows the keys it gave each filter room (by its snapshot or
    a matching change) and sends such a key's next change there too. Before, a key that left the
    filter or was deleted was never sent, and the client's rows kept it for good."""
    t = redis_target
    pro, deleted, free, late = (t.key(f"user:{n}") for n in (1, 2, 3, 4))
    await t.admin.hset(pro, mapping={"plan": "pro"})
    await t.admin.hset(deleted, mapping={"plan": "pro"})
    await t.admin.hset(free, mapping={"plan": "free"})
    async with running_feed(config(t)) as feed:
        await wait_up(feed)
        async with feed_client(feed.url) as client:
            ack = await client.subscribe(
                f"cache:{t.key('user:*')}", filter="value.plan=eq.pro", snapshot=True
            )
            assert sorted(ack["snapshot_keys"]) == [pro, deleted], ack
            await t.admin.hset(pro, "plan", "free")  # leaves the room
            await t.admin.delete(deleted)  # gone
            await t.admin.hset(free, "plan", "free")  # never in it: not sent
            await t.admin.hset(late, "plan", "pro")  # enters
            got = await client.take(3)
            # Redis's value is read after its event: written before that read, the next value
            # would be what both events show.
            await t.admin.hset(late, "plan", "basic")  # and leaves again
            got += await client.take(1)
            assert client.changes.empty()
    assert [(c["op"], c["key"]) for c in got] == [
        ("hset", pro),
        ("del", deleted),
        ("hset", late),
        ("hset", late),
    ]
    assert [c.get("left", False) for c in got] == [True, False, False, True]
    assert got[1]["after"] is None


async def test_a_filter_room_drops_a_key_whose_value_was_gone_when_read(
    redis_target: RedisTarget,
) -> None:
    """HSET then DEL in one transaction: the feed reads the value after the events, finds the
    key gone, and sends the `hset` with no image. The filter room held the key, so it must
    still hear the `del` that follows. Before, the image-less `hset` made the room forget the
    key, the `del` went nowhere, and the client's rows kept the key for good."""
    from dbfeed_client import FeedClient

    t = redis_target
    stale, kept = t.key("user:stale"), t.key("user:kept")
    await t.admin.hset(stale, mapping={"plan": "pro"})
    await t.admin.hset(kept, mapping={"plan": "pro"})
    async with running_feed(config(t)) as feed:
        await wait_up(feed)
        async with (
            FeedClient(feed.url) as client,
            client.subscribe(
                f"cache:{t.key('user:*')}", filter="value.plan=eq.pro", snapshot=True
            ) as sub,
        ):
            assert sub.rows is not None and sorted(sub.rows) == [kept, stale]
            seen: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
            sub.on("change", lambda change: seen.put_nowait((change["op"], change["key"])))
            async with t.admin.pipeline(transaction=True) as multi:
                multi.hset(stale, "n", "1")
                multi.delete(stale)
                await multi.execute()
            await t.admin.hset(kept, "n", "2")  # a marker: everything before it has arrived
            ops: list[tuple[str, str]] = []
            while ("hset", kept) not in ops:
                ops.append(await asyncio.wait_for(seen.get(), WAIT))
            assert sorted(sub.rows) == [kept], ops
    assert ops == [("hset", stale), ("del", stale), ("hset", kept)]


async def test_client_rows_follow_keys_renamed_moved_and_taken_away(
    redis_target: RedisTarget,
) -> None:
    """dbfeed_client's rows for a pattern room equal the keys Redis holds after RENAME, MOVE
    and GETDEL: each ends a key with an event of its own (rename_from, move_from, del), and the
    first two used to leave the old key in `rows` for good."""
    from dbfeed_client import FeedClient

    t = redis_target
    pattern = t.key("user:*")
    keys = [t.key(f"user:{n}") for n in range(4)]
    for key in keys:
        await t.admin.set(key, "v")
    async with running_feed(config(t)) as feed:
        await wait_up(feed)
        async with (
            FeedClient(feed.url) as client,
            client.subscribe(f"cache:{pattern}", snapshot=True) as sub,
        ):
            seen: asyncio.Queue[str] = asyncio.Queue()
            sub.on("change", lambda change: seen.put_nowait(change["op"]))
            await t.admin.rename(keys[0], t.key("user:renamed"))
            await t.admin.move(keys[1], 5)
            await t.admin.getdel(keys[2])
            ops = [await asyncio.wait_for(seen.get(), WAIT) for _ in range(4)]
            held = sorted([key.decode() async for key in t.admin.scan_iter(match=pattern)])
            assert sub.rows is not None and sorted(sub.rows) == held, ops
    assert ops == ["rename_from", "rename_to", "move_from", "del"]
    import redis.asyncio as aioredis

    other = aioredis.Redis.from_url(t.url, db=5)  # the moved key: not left behind
    await other.delete(keys[1])
    await other.aclose()


async def test_a_filter_without_values_to_match_is_refused(redis_target: RedisTarget) -> None:
    """Without fetch_values a keyspace change has no image: a filter room would never receive
    anything, so the subscribe is refused saying what to set (it used to be accepted)."""
    t = redis_target
    async with running_feed(config(t).replace("fetch_values = true", "")) as feed:
        await wait_up(feed)
        async with feed_client(feed.url) as client:
            ack = await client.subscribe(f"cache:{t.key('user:*')}", filter="type=eq.hash")
            plain = await client.subscribe(f"cache:{t.key('user:*')}")
    assert ack["ok"] is False and ack["error"]["code"] == "bad_filter", ack
    assert "fetch_values = true" in ack["error"]["message"]
    assert plain["ok"], plain
