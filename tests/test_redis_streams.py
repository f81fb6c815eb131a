"""Streams mode: XREAD from the saved position, so a restart loses nothing."""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import subprocess
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from connectors.base import RoomAddress, State
from connectors.redis import RedisConnector
from feed.core.change import Change, Gap
from feed.errors import ConfigError, SourceMisconfigured
from feed.options import Options
from tests.connector_contract import generator
from tests.support import redis as redis_support
from tests.support.redis import RedisServer, RedisTarget, text, unique_prefix
from tests.test_redis import take, take_until

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


redis_target = redis_support.redis_target


def _major(version: str) -> int:
    return int(version.split(".")[0])


@pytest.fixture
async def redis7() -> AsyncIterator[RedisTarget]:
    """A Redis 7 or later, whose XINFO counts entries (`entries-added`): the suite's own server
    when it is one (FEED_TEST_REDIS_URL), else a private redis-server from PATH (the embedded
    one is 6.2); skipped when there is none."""
    async with redis_support.open_redis_target() as target:
        if _major((await target.admin.info("server"))["redis_version"]) >= 7:
            yield target
            return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no Redis 7: set FEED_TEST_REDIS_URL, or put redis-server 7 on PATH")
    run = await asyncio.to_thread(
        subprocess.run, [binary, "--version"], capture_output=True, text=True, check=True
    )
    out = run.stdout
    version = out.split("v=")[1].split()[0] if "v=" in out else "0"
    if _major(version) < 7:
        pytest.skip(f"no Redis 7: {binary} is {version}")
    server = RedisServer()
    server.binary = binary  # the embedded binary is 6.2
    await asyncio.to_thread(server.start)
    admin = Redis.from_url(server.url())
    try:
        yield RedisTarget(url=server.url(), prefix=unique_prefix(), admin=admin, server=server)
    finally:
        await admin.aclose()
        await asyncio.to_thread(server.close)


def connector(t: RedisTarget, **extra: Any) -> RedisConnector:
    table = t.config(
        mode="streams",
        patterns=[t.key("orders"), t.key("audit")],
        offsets_key=t.key("offsets"),
        **extra,
    )
    table.pop("configure")
    return RedisConnector("cache", Options(table, "connectors[0]"))


async def routed_past(t: RedisTarget, stream: AsyncGenerator[Change | Gap, None]) -> None:
    """Acknowledge what was taken, as the hub does by asking for the next item: one more entry,
    in the other stream, taken. Not a task left pulling and cancelled afterwards: a cancel that
    lands inside a Redis call the stream makes (saving its offsets) is a race of its own."""
    await t.admin.xadd(t.key("audit"), {"n": "marker"})
    (marker,) = await take(stream, 1)
    assert marker.target == t.key("audit")


async def closed(stream: AsyncGenerator[Change | Gap, None]) -> None:
    """Close the stream where it waits at a yield (its readers are stopped), within a bound."""
    async with asyncio.timeout(15):
        await stream.aclose()


async def test_entries_arrive_with_stable_ids_and_source_time(redis_target: RedisTarget) -> None:
    t = redis_target
    async with connector(t) as source:
        stream = aiter(source.changes())
        first = text(await t.admin.xadd(t.key("orders"), {"status": "new", "n": "1"}))
        await t.admin.xadd(t.key("audit"), {"who": b"\xff"})
        one, two = await take(stream, 2)
    assert isinstance(one, Change) and one.id == f"cache:{t.key('orders')}:{first}"
    assert (one.op, one.target, one.key) == ("xadd", t.key("orders"), first)
    assert one.after == {"_id": first, "status": "new", "n": "1"}
    assert one.ts is not None and abs(one.ts - dt.datetime.now(dt.UTC)) < dt.timedelta(seconds=5)
    assert two.meta == {"value_base64": True}
    assert two.after == {"_id": two.key, "d2hv": "/w==", "_base64": True}
    assert source.resolve(f"{t.key('orders')}:{first}") == RoomAddress(t.key("orders"), first)


async def test_restart_resumes_from_the_saved_position(redis_target: RedisTarget) -> None:
    t, r = redis_target, redis_target.admin
    async with connector(t) as source:
        stream = aiter(source.changes())
        await r.xadd(t.key("orders"), {"n": "1"})
        await r.xadd(t.key("orders"), {"n": "2"})
        _, second = await take(stream, 2)
    # Written while the feed is down: delivered at the next start.
    await r.xadd(t.key("orders"), {"n": "3"})
    await r.xadd(t.key("orders"), {"n": "4"})
    async with connector(t) as source:
        stream = aiter(source.changes())
        got = await take(stream, 2)
        if got[0].after["n"] == "2":  # routed but never confirmed: sent again, same id
            assert got[0].id == second.id
            got = [got[1], *await take(stream, 1)]
    assert [c.after["n"] for c in got] == ["3", "4"]


async def test_trimmed_past_the_position_is_a_gap(redis_target: RedisTarget) -> None:
    t, r = redis_target, redis_target.admin
    async with connector(t) as source:
        stream = aiter(source.changes())
        await r.xadd(t.key("orders"), {"n": "a"})
        await r.xadd(t.key("orders"), {"n": "b"})
        await take(stream, 2)  # asking for the second confirms the first
    for i in range(5):
        await r.xadd(t.key("orders"), {"n": str(i)})
    await r.xtrim(t.key("orders"), maxlen=2, approximate=False)
    async with connector(t) as source:
        stream = aiter(source.changes())
        gap = (await take(stream, 1))[0]
        rest = await take(stream, 2)
    assert isinstance(gap, Gap) and gap.target == t.key("orders") and "trimmed" in gap.reason
    assert [c.after["n"] for c in rest] == ["3", "4"]
    assert source.capture_faults == {"stream_trimmed": 1}  # feed_capture_faults_total


async def test_snapshot_is_exact(redis_target: RedisTarget) -> None:
    t, r = redis_target, redis_target.admin
    async with connector(t, start="earliest") as source:
        ids = [text(await r.xadd(t.key("orders"), {"n": str(i)})) for i in range(5)]
        stream = generator(source.changes())
        try:
            seen = await take(stream, 5)
            # The snapshot waits until its entries are routed: the last is, once the stream is
            # asked for the next item.
            waiting = asyncio.create_task(
                source.snapshot(RoomAddress(t.key("orders")), lambda row: True, 3)
            )
            await routed_past(t, stream)
            snap = await asyncio.wait_for(waiting, 10)
            one = await source.snapshot(RoomAddress(t.key("orders"), ids[1]), lambda r: True, 3)
        finally:
            await closed(stream)
    assert [row["_id"] for row in snap.rows] == ids[2:] and snap.truncated
    assert snap.keys == ids[2:]  # without key_field a row's key is its entry id, as in changes
    assert all(snap.covers(c) for c in seen)
    later = Change(
        "x",
        "cache",
        "redis",
        t.key("orders"),
        "xadd",
        "9-9",
        position=(t.key("orders"), (2**62, 0)),
    )
    assert not snap.covers(later)
    assert one.rows == [{"_id": ids[1], "n": "1"}]


async def changelog(
    t: RedisTarget, entries: list[dict[Any, Any]], key: str, **options: Any
) -> tuple[list[Change], Any, Any]:
    """Read `entries` from a stream keyed by `id`: the changes, a snapshot of the stream and
    one of row `key`."""
    async with connector(t, key_field="id", start="earliest", **options) as source:
        for entry in entries:
            await t.admin.xadd(t.key("orders"), entry)
        stream = generator(source.changes())
        try:
            seen: list[Change] = await take(stream, len(entries))
            await routed_past(t, stream)
            rows = await source.snapshot(RoomAddress(t.key("orders")), lambda row: True, 10)
            one = await source.snapshot(RoomAddress(t.key("orders"), key), lambda row: True, 10)
        finally:
            await closed(stream)
    return seen, rows, one


async def test_key_field_makes_rows_of_a_changelog(redis_target: RedisTarget) -> None:
    entries = [{"id": key, "v": v} for key, v in (("a", "1"), ("b", "1"), ("a", "2"))]
    seen, rows, one = await changelog(redis_target, entries, "a")
    assert [c.key for c in seen] == ["a", "b", "a"]
    assert [(row["id"], row["v"]) for row in rows.rows] == [("b", "1"), ("a", "2")]
    assert rows.keys == ["b", "a"]  # the key field's value, as the changes' keys
    assert [(row["id"], row["v"]) for row in one.rows] == [("a", "2")]
    assert all(rows.covers(c) for c in seen)


async def test_op_field_deletes_rows_of_a_changelog(redis_target: RedisTarget) -> None:
    """With `op_field`, an entry can say what it does to its row (Debezium's c, u, d too): a
    delete is a `delete` change without an image, and a snapshot no longer has that row."""
    entries: list[dict[Any, Any]] = [
        {"id": "a", "op": "insert", "v": "1"},
        {"id": "b", "op": "c", "v": "1"},
        {"id": "a", "op": "UPDATE", "v": "2"},
        {"id": "b", "op": "d"},
        {"id": "c", "v": "1"},  # no op: an entry as before
        {"id": "c", "op": "upsert", "v": "2"},  # not known: passed on as it is
    ]
    seen, rows, gone = await changelog(redis_target, entries, "b", op_field="op")
    assert [(c.op, c.key) for c in seen] == [
        ("insert", "a"),
        ("insert", "b"),
        ("update", "a"),
        ("delete", "b"),
        ("xadd", "c"),
        ("upsert", "c"),
    ]
    assert seen[3].after is None and seen[3].before is None
    assert seen[2].after is not None and seen[2].after["v"] == "2"
    assert rows.keys == ["a", "c"] and [row["v"] for row in rows.rows] == ["2", "2"]
    assert gone.rows == [] and gone.keys == []


def test_op_field_needs_key_field() -> None:
    table = {"url": "redis://localhost/0", "patterns": ["s"], "mode": "streams", "op_field": "op"}
    with pytest.raises(ConfigError, match=r"connectors\[0\].op_field: needs key_field"):
        RedisConnector("cache", Options(table, "connectors[0]"))


async def test_row_snapshot_of_a_non_id_is_empty(redis_target: RedisTarget) -> None:
    async with connector(redis_target) as source:
        snap = await source.snapshot(
            RoomAddress(redis_target.key("orders"), "not-an-id"), lambda row: True, 10
        )
    assert snap.rows == []


async def test_a_live_row_is_the_snapshot_row_of_its_entry(redis_target: RedisTarget) -> None:
    """`after` and a snapshot row of the same entry are equal (`_id` first, then the fields), so
    a client's rows do not differ by where each came from, and filters treat both alike."""
    t = redis_target
    async with connector(t) as source:
        stream = generator(source.changes())
        try:
            await t.admin.xadd(t.key("orders"), {"status": "new"})
            (live,) = await take(stream, 1)
            waiting = asyncio.create_task(
                source.snapshot(RoomAddress(t.key("orders"), live.key), lambda row: True, 5)
            )
            await routed_past(t, stream)
            snap = await asyncio.wait_for(waiting, 10)
        finally:
            await closed(stream)
    assert isinstance(live, Change) and snap.rows == [live.after]


async def test_key_field_is_read_from_entries_that_are_not_utf8(redis_target: RedisTarget) -> None:
    """An entry with any field that is not UTF-8 has all its fields sent base64, but its row is
    still the key field's value (before: its entry id, a row of its own that later entries of
    the key never updated or deleted), in changes and snapshots alike; a key that is itself not
    UTF-8 is sent base64 with `key_base64`, as keyspace mode sends such keys."""
    entries: list[dict[Any, Any]] = [
        {"id": "42", "status": "new"},
        {"id": "42", "status": "paid", "blob": b"\xff\x00"},
        {"id": b"k\xff", "v": "1"},
    ]
    seen, rows, one = await changelog(redis_target, entries, "42")
    assert [c.key for c in seen] == ["42", "42", "a/8="]
    assert seen[1].meta == {"value_base64": True}
    assert seen[2].meta == {"value_base64": True, "key_base64": True}
    assert rows.keys == ["42", "a/8="]  # the keys the changes carry
    newest = seen[1].after
    assert newest is not None and [row["_id"] for row in one.rows] == [newest["_id"]]
    assert one.keys == ["42"]


async def test_fields_named_like_the_rows_own_are_kept_aside(redis_target: RedisTarget) -> None:
    """`_id` is the entry id and `_base64` the feed's flag, whatever the entry holds: a field
    of either name (or of such a name behind more underscores) gets one more `_` in front, live
    and in snapshots, so a filter or a client keying rows by `_id` always sees the entry id."""
    entries: list[dict[Any, Any]] = [
        {"id": "7", "_id": "fake", "__id": "two", "_base64": "no", "_other": "x"}
    ]
    seen, rows, _ = await changelog(redis_target, entries, "7")
    after = seen[0].after
    assert after is not None
    assert after == {
        "_id": after["_id"],
        "id": "7",
        "__id": "fake",
        "___id": "two",
        "__base64": "no",
        "_other": "x",
    }
    assert after["_id"] != "fake" and seen[0].id.endswith(after["_id"])
    assert rows.rows == [after]


async def held_at_one_entry(t: RedisTarget, source: RedisConnector) -> AsyncGenerator[Any, None]:
    """The connector's stream, having read one entry of `orders`: the reader is at it."""
    stream = generator(source.changes())
    await t.admin.xadd(t.key("orders"), {"n": "first"})
    (first,) = await take(stream, 1)
    assert first.after["n"] == "first"
    return stream


def gaps(items: list[Any]) -> list[Gap]:
    return [item for item in items if isinstance(item, Gap)]


async def trimmed_while_running(t: RedisTarget) -> None:
    """Entries trimmed (MAXLEN) past what the running reader had read are a gap for that
    stream's rooms at once, not only at the next start; the entries left still arrive."""
    async with connector(t) as source:
        stream = await held_at_one_entry(t, source)
        try:
            # Not taken meanwhile: the reader holds a couple of reads, then waits for the hub.
            pipe = t.admin.pipeline(transaction=False)
            for i in range(200):
                pipe.xadd(t.key("orders"), {"n": str(i)}, maxlen=5, approximate=False)
            await pipe.execute()
            items = await take_until(
                stream, lambda c: isinstance(c, Change) and (c.after or {}).get("n") == "199"
            )
        finally:
            await closed(stream)
    (gap,) = gaps(items)
    assert gap.target == t.key("orders") and "trimmed" in gap.reason, gap.reason
    assert source.capture_faults == {"stream_trimmed": 1}
    changes = [item.after["n"] for item in items if isinstance(item, Change) and item.after]
    assert changes[-5:] == ["195", "196", "197", "198", "199"]


async def test_trimmed_while_running_is_a_gap(redis_target: RedisTarget) -> None:
    await trimmed_while_running(redis_target)  # Redis 6.2 (embedded) or the one named


async def test_trimmed_while_running_is_a_gap_on_redis7(redis7: RedisTarget) -> None:
    await trimmed_while_running(redis7)


async def test_trimmed_to_what_was_read_is_no_gap_on_redis7(redis7: RedisTarget) -> None:
    """Redis 7 counts the entries a stream was given, so a stream kept at MAXLEN 1 whose entry
    read last is trimmed by the next one's XADD loses nothing and gets no gap (Redis 6.2
    cannot tell this from a loss, and gives one)."""
    t = redis7
    async with connector(t) as source:
        stream = await held_at_one_entry(t, source)
        try:
            got = []
            for i in range(5):
                await t.admin.xadd(t.key("orders"), {"n": str(i)}, maxlen=1, approximate=False)
                got += await take(stream, 1)
            await routed_past(t, stream)  # a gap would come before this marker
        finally:
            await closed(stream)
    assert [c.after["n"] for c in got] == ["0", "1", "2", "3", "4"]


async def test_a_stream_deleted_while_running_is_a_gap(redis_target: RedisTarget) -> None:
    """Deleted while the feed runs: a gap for its rooms, and the reader starts over, so a stream
    created again under that key is read whole, lower ids included (before: no gap, and every
    entry below the last id read was skipped)."""
    t, r = redis_target, redis_target.admin
    async with connector(t) as source:
        stream = await held_at_one_entry(t, source)
        try:
            await r.delete(t.key("orders"))
            (gap,) = await take(stream, 1)  # seen within a block (health_check_interval)
            await r.xadd(t.key("orders"), {"n": "again"}, id="1-1")
            await r.xadd(t.key("orders"), {"n": "later"})
            again = await take(stream, 2)
        finally:
            await closed(stream)
    assert isinstance(gap, Gap) and gap.target == t.key("orders"), gap
    assert gap.reason == f"stream {t.key('orders')!r} was deleted"
    assert source.capture_faults == {"stream_lost": 1}
    assert [(c.key, c.after["n"]) for c in again] == [("1-1", "again"), (again[1].key, "later")]
    # The saved position moved back with it (the last entry confirmed): a restart reads on.
    assert await r.hget(t.key("offsets"), t.key("orders")) == b"1-1"


async def created_again_unseen(t: RedisTarget) -> tuple[list[Any], Any, bool]:
    """Delete a stream the reader is at and create it again with a lower id and a newer one, in
    one MULTI (so the reader cannot see it missing): what arrives, the stream's rows then, and
    whether the server is Redis 7. (The new stream's automatic id can be the very id read last,
    in the same millisecond: only the entry's fields tell it from the old one.)"""
    r = t.admin
    redis7 = _major((await r.info("server"))["redis_version"]) >= 7
    async with connector(t) as source:
        stream = await held_at_one_entry(t, source)
        try:
            pipe = r.pipeline(transaction=True)
            pipe.delete(t.key("orders"))
            pipe.xadd(t.key("orders"), {"n": "low"}, id="1-1")
            pipe.xadd(t.key("orders"), {"n": "new"})
            await pipe.execute()
            items = await take_until(stream, lambda c: isinstance(c, Gap))
            await r.xadd(t.key("audit"), {"n": "marker"})  # all that came before it, routed
            items += await take_until(stream, lambda c: c.target == t.key("audit"))
            items.pop()
            rows = await source.snapshot(RoomAddress(t.key("orders")), lambda row: True, 10)
        finally:
            await closed(stream)
    return items, rows, redis7


async def test_a_stream_created_again_unseen_is_a_gap(redis_target: RedisTarget) -> None:
    """Redis 7 tells a stream deleted and created again from a trim or an XDEL (its count of
    entries starts again, and nothing deleted the entry read last): a gap, and the new stream is
    read from its start. Redis 6.2 cannot tell it from an XDEL of the entry read last: a gap
    all the same (before: none, and `1-1` was never seen), whose reload shows the new rows."""
    items, rows, redis7 = await created_again_unseen(redis_target)
    assert [row["n"] for row in rows.rows] == ["low", "new"]
    if redis7:
        gap, *again = items
        assert isinstance(gap, Gap) and "created again" in gap.reason, gap
        assert [c.after["n"] for c in again] == ["low", "new"]
    else:  # "new" is read (before or after the gap) unless it has the id read last
        (gap,) = gaps(items)
        assert "Redis 6.2 cannot tell" in gap.reason, gap
        assert [c.after["n"] for c in items if c is not gap] in ([], ["new"])


async def test_a_stream_created_again_unseen_is_a_gap_on_redis7(redis7: RedisTarget) -> None:
    items, _, redis7_seen = await created_again_unseen(redis7)
    assert redis7_seen and isinstance(items[0], Gap) and "created again" in items[0].reason


async def test_a_listed_key_that_is_not_a_stream(redis_target: RedisTarget) -> None:
    """A listed key replaced by a string while running: one status line naming it, a gap for its
    rooms that says what happened (not "no longer exists"), and the other streams keep flowing
    (before: every stream stalled behind a WRONGTYPE naming no key); once it is a stream again it
    is read from its start, and the status is up."""
    t, r = redis_target, redis_target.admin
    orders = t.key("orders")
    async with connector(t) as source:
        stream = await held_at_one_entry(t, source)
        try:
            pipe = r.pipeline(transaction=True)
            pipe.delete(orders)
            pipe.set(orders, "a string")
            await pipe.execute()
            await r.xadd(t.key("audit"), {"n": "still read"})
            items = await take_until(stream, lambda c: isinstance(c, Change))
            status = source.status
            await r.delete(orders)
            await r.xadd(orders, {"n": "a stream again"})
            (back,) = await take(stream, 1)
            await routed_past(t, stream)
            up = source.status
        finally:
            await closed(stream)
    gap, audit = items
    assert isinstance(gap, Gap) and gap.target == orders
    assert gap.reason == f"stream {orders!r} was replaced by a string, which is not a stream"
    assert audit.after["n"] == "still read"
    assert status.state is State.DOWN
    assert f"{orders!r} holds a string" in status.detail and "delete it" in status.detail
    assert back.after["n"] == "a stream again" and up.state is State.UP


async def test_a_listed_key_that_is_not_a_stream_at_start(redis_target: RedisTarget) -> None:
    """The same key already a string at start: the connector starts (before: it failed with a
    line naming no key, and restarted over and over), says which key is wrong, reads the others,
    and announces no gap for a stream it never read."""
    t, r = redis_target, redis_target.admin
    await r.set(t.key("orders"), "a string")
    async with connector(t) as source:
        status = source.status
        stream = generator(source.changes())
        try:
            await r.xadd(t.key("audit"), {"n": "read"})
            (audit,) = await take(stream, 1)
        finally:
            await closed(stream)
    assert status.state is State.DOWN and f"{t.key('orders')!r} holds a string" in status.detail
    with pytest.raises(SourceMisconfigured, match=f"{t.key('orders')!r} holds a string"):
        await connector(t).check()  # feed check: the same line, and a failed source
    assert isinstance(audit, Change) and audit.after == {"_id": audit.key, "n": "read"}


async def test_entries_deleted_before_being_read_are_a_gap_on_redis7(redis7: RedisTarget) -> None:
    """XDEL of an entry the feed had not read yet: once the reader is at the stream's last entry,
    Redis 7's count of entries added is more than the reader read (checked every
    capture_check_interval), and the stream's rooms get a gap."""
    t, r = redis7, redis7.admin
    orders = t.key("orders")
    async with connector(t, capture_check_interval=0.05) as source:
        stream = await held_at_one_entry(t, source)
        try:
            ms = int(dt.datetime.now(dt.UTC).timestamp() * 1000) + 1000
            pipe = r.pipeline(transaction=True)  # added and deleted before any read
            pipe.xadd(orders, {"n": "kept"}, id=f"{ms}-1")
            pipe.xadd(orders, {"n": "deleted"}, id=f"{ms}-2")
            pipe.xdel(orders, f"{ms}-2")
            await pipe.execute()
            (kept,) = await take(stream, 1)
            await r.xadd(orders, {"n": "after"})
            items = await take_until(stream, lambda c: isinstance(c, Gap), timeout=10)
        finally:
            await closed(stream)
    assert kept.after["n"] == "kept" and items[0].after["n"] == "after"
    assert isinstance(items[-1], Gap) and items[-1].target == orders
    assert items[-1].reason == f"1 entry of stream {orders!r} removed before being read"


async def test_the_entry_read_last_deleted_is_said_once(redis_target: RedisTarget) -> None:
    """XDEL of the entry read last, older ones kept: no loss on Redis 7 (its XDEL record says
    what went), one gap on Redis 6.2 (which cannot tell it from a stream created again with
    lower ids); either way not a gap at every read while that entry stays gone."""
    t, r = redis_target, redis_target.admin
    redis7 = _major((await r.info("server"))["redis_version"]) >= 7
    await r.xadd(t.key("orders"), {"n": "older"})
    async with connector(t) as source:
        stream = await held_at_one_entry(t, source)
        try:
            newest: Any = await r.xrevrange(t.key("orders"), count=1)
            await r.xdel(t.key("orders"), newest[0][0])
            items: list[Any] = []
            for i in range(5):  # five more reads, each finding the entry read last gone
                await r.xadd(t.key("audit"), {"n": str(i)})
                items += await take_until(stream, lambda c: c.target == t.key("audit"))
        finally:
            await closed(stream)
    assert [(c.after or {}).get("n") for c in items if isinstance(c, Change)] == [
        "0",
        "1",
        "2",
        "3",
        "4",
    ]
    if redis7:
        assert gaps(items) == []
    else:
        (gap,) = gaps(items)
        assert "Redis 6.2 cannot tell" in gap.reason
