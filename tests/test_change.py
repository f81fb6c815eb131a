"""The change envelope's JSON mapping for every type the sources produce."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import gc
import inspect
import json
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from bson import Binary, Decimal128, ObjectId

from feed.core.change import Change, format_ts, key_text, room_key, to_json
from feed.core.rooms import Room


class Color(enum.Enum):
    RED = "red"


def test_json_mapping_of_source_types() -> None:
    oid = ObjectId("64b7f0c2a1b2c3d4e5f60718")
    value = {
        "price": Decimal("12.30"),
        "at": dt.datetime(2026, 1, 2, 3, 4, 5, 6000, tzinfo=dt.UTC),
        "naive": dt.datetime(2026, 1, 2, 3, 4, 5),
        "day": dt.date(2026, 1, 2),
        "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "blob": b"\x00\xff",
        "color": Color.RED,
        "nan": float("nan"),
        "tags": ("a", "b"),
        "nested": {"deep": [1, {"x": Decimal("1E+2")}]},
        "oid": oid,
        "d128": Decimal128("1.10"),
        "bin": Binary(b"\x01\x02", 4),
    }
    out = to_json(value)
    json.dumps(out)
    assert out["price"] == "12.30"
    assert out["at"] == "2026-01-02T03:04:05.006000Z"
    assert out["naive"] == "2026-01-02T03:04:05"
    assert out["day"] == "2026-01-02"
    assert out["id"] == "12345678-1234-5678-1234-567812345678"
    assert out["blob"] == "AP8="
    assert out["color"] == "red"
    assert out["nan"] == "NaN"
    assert out["tags"] == ["a", "b"]
    assert out["nested"] == {"deep": [1, {"x": "100"}]}  # positional, never an exponent
    assert out["oid"] == {"$oid": "64b7f0c2a1b2c3d4e5f60718"}
    assert out["d128"] == {"$numberDecimal": "1.10"}
    assert out["bin"] == {"$binary": {"base64": "AQI=", "subType": "04"}}


def test_room_keys() -> None:
    assert room_key(42) == "42"
    assert room_key("abc") == "abc"
    assert room_key({"order_id": 7, "line": 2}) == "7,2"
    assert room_key(ObjectId("64b7f0c2a1b2c3d4e5f60718")) == "64b7f0c2a1b2c3d4e5f60718"
    assert room_key(None) is None


KEY_TEXT = Path(__file__).parent / "support" / "key_text.json"


@pytest.mark.parametrize("key, text", json.loads(KEY_TEXT.read_text())["cases"])
def test_key_text_is_the_one_rule_the_client_libraries_follow(key: Any, text: str | None) -> None:
    """The table both client libraries check too: a key's text from its JSON form alone."""
    assert key_text(key) == text


def test_room_keys_of_bson_values_read_as_their_json_keys() -> None:
    """A key JSON has no type for is named by its JSON form's text, as clients see it (a
    Decimal128 was named by Python's str of its extended JSON, `{'$numberDecimal': '9.90'}`,
    and a whole double `2.0`, which a JavaScript client reads as 2)."""
    assert room_key(Decimal128("9.90")) == "9.90"
    assert room_key(2.0) == "2"
    assert room_key({"a": Decimal128("1.5"), "b": 2.0}) == "1.5,2"
    assert room_key({"a": {"b": 1}}) == '{"b":1}'
    assert room_key(Binary(b"\x01\x02", 5)) == '{"base64":"AQI=","subType":"05"}'
    assert room_key(uuid.UUID("12345678-1234-5678-1234-567812345678")) == (
        "12345678-1234-5678-1234-567812345678"
    )
    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert room_key(when) == "2026-01-02T03:04:05.000000Z"
    for value in (Decimal128("9.90"), 2.0, 1e-5, {"a": 1.0}, [True, None]):
        assert room_key(value) == key_text(json.loads(json.dumps(to_json(value))))


def test_wire_body_is_shared_and_immutable() -> None:
    change = Change(
        "main:1",
        "main",
        "postgres",
        "public.orders",
        "insert",
        1,
        None,
        {"id": 1},
        dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    )
    assert change.wire is change.wire
    assert change.wire["ts"] == "2026-01-01T00:00:00.000000Z"
    assert set(change.wire) == {
        "id",
        "connector",
        "source",
        "target",
        "op",
        "key",
        "before",
        "after",
        "ts",
    }


def test_commit_times_render_in_utc_with_a_z_whatever_their_zone() -> None:
    instant = "2026-01-02T03:04:05.000006Z"
    assert format_ts(dt.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=dt.UTC)) == instant
    assert format_ts(dt.datetime(2026, 1, 2, 3, 4, 5, 6)) == instant  # naive: taken as UTC
    plus2 = dt.timezone(dt.timedelta(hours=2))
    assert format_ts(dt.datetime(2026, 1, 2, 5, 4, 5, 6, tzinfo=plus2)) == instant
    assert (
        format_ts(dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)) == "2026-01-02T03:04:05.000000Z"
    )


def test_the_hand_written_init_sets_every_field_and_keeps_the_change_frozen() -> None:
    """Change has its own __init__ (faster than dataclass's): it must take exactly the fields,
    with their defaults, set each one, and leave the instance immutable."""
    fields = dataclasses.fields(Change)
    params = list(inspect.signature(Change.__init__).parameters.values())[1:]
    assert [p.name for p in params] == [f.name for f in fields]
    for param, f in zip(params, fields, strict=True):
        expected = inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
        assert param.default == expected, f.name
    values: dict[str, Any] = {f.name: object() for f in fields}
    change = Change(**values)
    assert {name: getattr(change, name) for name in values} == values
    with pytest.raises(dataclasses.FrozenInstanceError):
        change.op = "delete"  # type: ignore[misc]
    assert dataclasses.replace(change, op="x").op == "x"


@pytest.mark.parametrize(
    "change",
    [
        Change("m:1", "m", "memory", "t", "insert", 1, None, {"id": 1, "n": 1.5}, position=1),
        Change(
            "pg:7",
            "pg",
            "postgres",
            "public.orders",
            "update",
            {"a": 1, "b": "x"},
            {"a": 1, "b": "x", "doc": {"tags": ["a"]}, "price": Decimal("1.10")},
            {"a": 2, "b": "x", "doc": None, "price": Decimal("1.20")},
            dt.datetime(2026, 12, 4, 17, 0, 0, 1, tzinfo=dt.UTC),
            {"old_key": {"a": 1, "b": "x"}},
            (12, 7),
        ),
        Change("r:1", "r", "redis", "k", "delete", "k:1", {"v": "1"}, None, position="k:1"),
    ],
)
def test_what_a_replay_buffer_keeps_is_the_change_again(change: Change) -> None:
    """A replay rebuilds the change from what its buffer kept: every field comes back equal, in
    its order, and the wire body it is sent with is the same."""
    again = Change.thawed(change.kept())
    for field in dataclasses.fields(Change):
        assert getattr(again, field.name) == getattr(change, field.name), field.name
    for image in ("before", "after", "meta"):
        kept, was = getattr(again, image), getattr(change, image)
        assert (kept and list(kept)) == (was and list(was)), f"{image}: key order"
    assert again.wire == change.wire and again.wire_tail == change.wire_tail


def test_what_a_replay_buffer_keeps_leaves_the_collector_after_its_young_passes() -> None:
    """A room's buffered changes must stop counting for the garbage collector's full passes:
    each kept change still tracked when it reaches the old generation brings the next full pass
    (tens of milliseconds at 1,000 clients) nearer. Tuples of plain values are let go of by the
    young passes; this fails when an image is kept in a nested tuple."""
    room = Room("mem:t", "mem", "t")
    ts = dt.datetime(2026, 12, 4, 22, 0, 0, 1, tzinfo=dt.UTC)
    for i in range(50):
        after = {"id": i, "t": 1.5, "name": f"row {i}"}
        room.record(
            Change(f"mem:{i}", "mem", "memory", "t", "update", i, after, after, ts, None, i)
        )
    gc.collect(0)
    gc.collect(1)
    buffered = list(room._buffer)
    assert len(buffered) == 50
    assert [i for i, kept in enumerate(buffered) if gc.is_tracked(kept)] == []
