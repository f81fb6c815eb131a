"""Streams mode: XREAD from the saved position, so a restart loses nothing."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from connectors.base import RoomAddress
from connectors.redis import RedisConnector
from feed.core.change import Change, Gap
from feed.errors import ConfigError
from feed.options import Options
from tests.connector_contract import generator
from tests.support import redis as redis_support
from tests.support.redis import RedisTarget, text
from tests.test_redis import take

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


redis_target = redis_support.redis_target


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
    assert [row["_id"] for row in one.rows] == [seen[1].after["_id"]]  # row 42: its newest entry
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
