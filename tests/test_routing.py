"""Filter rooms found through the equality index route exactly as checking every filter would.

The oracle below is the filter evaluation as it was before literals were parsed once and rooms
indexed (string literals converted on every comparison, every room checked): the typed
comparands and the index must both agree with it, over every operator, `in` lists, nested
fields, nulls, type mismatches and before/after images.
"""

from __future__ import annotations

import datetime as dt
import operator
import uuid
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.memory import MemoryConnector
from feed.core.change import Change
from feed.core.filter_index import FilterIndex
from feed.core.filters import Condition, Literal, RowFilter, _compare, parse_filter, value_key
from feed.core.rooms import Room
from feed.delivery.protocol import SubscribeRequest
from feed.options import Options
from feed.routing.hub import Hub, TargetRooms
from feed.security.access import Shape

# -- the oracle: filters as evaluated before this index existed ---------------------------------

ORACLE_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq,
    "neq": operator.ne,
    "lt": operator.lt,
    "lte": operator.le,
    "gt": operator.gt,
    "gte": operator.ge,
}


def oracle_lookup(image: Mapping[str, Any], field: str) -> tuple[bool, Any]:
    if field in image:
        return True, image[field]
    value: Any = image
    for part in field.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return False, None
        value = value[part]
    return True, value


def oracle_compare(op: Callable[[Any, Any], bool], value: Any, literal: str) -> bool:
    if literal == "null" and op in (operator.eq, operator.ne):
        return op(value, None)
    if value is None:
        return False
    try:
        if isinstance(value, bool):
            if literal not in ("true", "false"):
                return False
            return op(value, literal == "true")
        if isinstance(value, int | float | Decimal):
            return op(Decimal(str(value)), Decimal(literal))
        if isinstance(value, dt.datetime):
            other = dt.datetime.fromisoformat(literal.replace("Z", "+00:00"))
            if (value.tzinfo is None) != (other.tzinfo is None):
                return False
            return op(value, other)
        if isinstance(value, dt.date):
            return op(value, dt.date.fromisoformat(literal))
        if isinstance(value, str):
            return op(value, literal)
        return op(str(value), literal)
    except (InvalidOperation, ValueError, TypeError):
        return False


def oracle_holds(condition: Condition, image: Mapping[str, Any]) -> bool:
    found, value = oracle_lookup(image, condition.field)
    if not found:
        return False
    if condition.op == "in":
        return any(oracle_compare(operator.eq, value, v) for v in condition.values)
    if condition.op == "neq" and value is None:
        return condition.values[0] != "null"
    return oracle_compare(ORACLE_OPS[condition.op], value, condition.values[0])


def oracle_matches(row_filter: RowFilter, change: Change) -> bool:
    return any(
        image is not None and all(oracle_holds(c, image) for c in row_filter.conditions)
        for image in (change.before, change.after)
    )


# -- strategies ---------------------------------------------------------------------------------

OFFSETS = [dt.UTC, dt.timezone(dt.timedelta(hours=2)), dt.timezone(dt.timedelta(hours=-5))]
MOMENTS = [
    dt.datetime(2026, 1, 1, 0, 0),
    dt.datetime(2026, 1, 1, 2, 0),
    dt.datetime(2025, 12, 31, 19),
]

values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.integers(),
    st.sampled_from([0.5, 1.0, -0.0, 2.5, float("nan"), float("inf"), 0.1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [Decimal("1.00"), Decimal("-0"), Decimal("NaN"), Decimal("2.5"), Decimal("1E+1")]
    ),
    st.sampled_from(MOMENTS),
    st.builds(
        lambda m, tz: m.replace(tzinfo=tz), st.sampled_from(MOMENTS), st.sampled_from(OFFSETS)
    ),
    st.sampled_from([dt.date(2026, 1, 1), dt.date(2025, 12, 31)]),
    st.sampled_from(["paid", "1", "1.0", "true", "null", "2026-01-01", "", "Paid", "a b"]),
    st.text(max_size=3),
    st.sampled_from([uuid.UUID(int=1), [1, 2], {"x": 1}, dt.time(1, 2)]),
)
literal_texts = st.one_of(
    st.sampled_from(
        [
            "null",
            "true",
            "false",
            "1",
            "1.0",
            "01",
            "1e0",
            "-0",
            "0",
            "2.5",
            "10",
            "NaN",
            "sNaN",
            "inf",
            "-Infinity",
            " 1",
            "1_0",
            "paid",
            "Paid",
            "",
            "a b",
            "2026-01-01",
            "2026-01-01T00:00:00",
            "2026-01-01T00:00:00Z",
            "2026-01-01T02:00:00+02:00",
            "2025-12-31",
            "2025-12-31T19:00:00-05:00",
            str(uuid.UUID(int=1)),
            "[1, 2]",
            "{'x': 1}",
            "01:02:00",
        ]
    ),
    st.integers().map(str),
    st.text(max_size=3),
)
FIELDS = ["a", "b", "n.x"]


@st.composite
def conditions(draw: st.DrawFn) -> Condition:
    field = draw(st.sampled_from(FIELDS))
    op = draw(st.sampled_from([*ORACLE_OPS, "in", "eq", "in"]))
    if op == "in":
        return Condition(
            field, op, tuple(sorted(set(draw(st.lists(literal_texts, min_size=1, max_size=4)))))
        )
    return Condition(field, op, (draw(literal_texts),))


row_filters = st.lists(conditions(), min_size=1, max_size=3).map(
    lambda cs: RowFilter(tuple(sorted(set(cs))))
)


@st.composite
def images(draw: st.DrawFn) -> dict[str, Any] | None:
    if draw(st.integers(0, 4)) == 0:
        return None
    image: dict[str, Any] = {}
    for field in ("a", "b"):
        if draw(st.booleans()) or draw(st.booleans()):
            image[field] = draw(values)
    shape = draw(st.integers(0, 3))
    if shape == 1:
        image["n"] = {"x": draw(values)}
    elif shape == 2:
        image["n.x"] = draw(values)  # a top-level key with a dot wins over the nested path
        image["n"] = {"x": draw(values)}
    elif shape == 3:
        image["n"] = draw(values)  # not a mapping: n.x is missing
    return image


def change_of(
    before: dict[str, Any] | None, after: dict[str, Any] | None, connector: str = "main"
) -> Change:
    op = "update" if before and after else "insert" if after is not None else "delete"
    return Change("1", connector, "postgres", "public.orders", op, 1, before, after)


# -- typed comparands -----------------------------------------------------------------------------


@settings(max_examples=3000, deadline=None)
@given(values, st.sampled_from(list(ORACLE_OPS)), literal_texts)
def test_typed_literals_compare_exactly_as_text_literals_did(
    value: Any, op: str, text: str
) -> None:
    expected = oracle_compare(ORACLE_OPS[op], value, text)
    assert _compare(ORACLE_OPS[op], value, Literal.parse(text)) is expected


@settings(max_examples=3000, deadline=None)
@given(values, literal_texts)
def test_eq_implies_a_shared_equality_key(value: Any, text: str) -> None:
    """The index's one obligation: a value equal to a literal is filed under one of its keys."""
    if oracle_compare(operator.eq, value, text):
        assert value_key(value) in Literal.parse(text).equality_keys()


@pytest.mark.parametrize(
    ("value", "text", "expected"),
    [
        # numbers: Decimal, exactly, whatever the spelling and the value's numeric type
        (1, "1.0", True),
        (1, "1e0", True),
        (Decimal("1.00"), "1", True),
        (0.1, "0.1", True),
        (2.5, "2.50", True),
        (1, "01", True),
        (1, "1.0000000000000000000000001", False),
        (10**30, "1E+30", True),
        (float("nan"), "NaN", False),
        (1, "abc", False),
        # booleans: only true/false, never 1/0
        (True, "true", True),
        (True, "1", False),
        (1, "true", False),
        (False, "false", True),
        # null: eq.null matches null only (not the text "null")
        (None, "null", True),
        ("null", "null", False),
        (None, "x", False),
        # timestamps: same instant in any offset; naive and aware never equal
        (dt.datetime(2026, 1, 1, tzinfo=dt.UTC), "2026-01-01T02:00:00+02:00", True),
        (dt.datetime(2026, 1, 1, tzinfo=dt.UTC), "2026-01-01T00:00:00Z", True),
        (dt.datetime(2026, 1, 1), "2026-01-01T00:00:00Z", False),
        (dt.datetime(2026, 1, 1), "2026-01-01T00:00:00", True),
        (dt.datetime(2026, 1, 1), "2026-01-01", True),
        (dt.date(2026, 1, 1), "2026-01-01", True),
        (dt.date(2026, 1, 1), "2026-01-01T00:00:00", False),
        # text: exact, case-sensitive; other types by their text
        ("Paid", "paid", False),
        ("1", "1.0", False),
        (uuid.UUID(int=1), str(uuid.UUID(int=1)), True),
    ],
)
def test_equality_semantics_by_type(value: Any, text: str, expected: bool) -> None:
    literal = Literal.parse(text)
    assert _compare(operator.eq, value, literal) is expected
    assert oracle_compare(operator.eq, value, text) is expected
    assert (value_key(value) in literal.equality_keys()) is expected


def test_ordering_semantics_by_type() -> None:
    assert parse_filter("at=lt.2026-01-01T01:00:00%2B02:00").matches_image(
        {"at": dt.datetime(2025, 12, 31, 22, 59, tzinfo=dt.UTC)}
    )
    assert not parse_filter("at=lt.2026-01-01").matches_image(
        {"at": dt.datetime(2025, 1, 1, tzinfo=dt.UTC)}  # aware against naive: no match
    )
    assert parse_filter("n=gt.9").matches_image({"n": 10})  # numerically, not as text
    assert not parse_filter("s=gt.9").matches_image({"s": "10"})  # text compares as text
    assert parse_filter("b=gt.false").matches_image({"b": True})
    assert not parse_filter("n=gt.null").matches_image({"n": None})
    assert parse_filter("n=neq.5").matches_image({"n": None})  # null is not 5...
    assert not parse_filter("n=neq.null").matches_image({"n": None})  # ...but it is null


# -- the index --------------------------------------------------------------------------------


def rooms_for(filters: list[RowFilter]) -> list[Room]:
    return [
        Room(f"main:public.orders?{f.canonical}#{i}", "main", "public.orders", None, f)
        for i, f in enumerate(filters)
    ]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(row_filters, min_size=1, max_size=12),
    st.lists(st.tuples(images(), images()), min_size=1, max_size=6),
)
def test_the_index_routes_exactly_as_checking_every_filter(
    filters: list[RowFilter], changes: list[tuple[dict[str, Any] | None, dict[str, Any] | None]]
) -> None:
    index: FilterIndex[Room] = FilterIndex()
    rooms = rooms_for(filters)
    for room in rooms:
        index.add(room)
    for before, after in changes:
        change = change_of(before, after)
        routed: list[Room] = []
        index.collect(change, routed)
        assert len(routed) == len({r.name for r in routed})  # never twice
        expected = {
            r.name for r in rooms if r.filter is not None and oracle_matches(r.filter, change)
        }
        assert {r.name for r in routed} == expected
        assert {r.name for r in rooms if r.filter and r.filter.matches(change)} == expected


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(row_filters, min_size=1, max_size=8),
    st.lists(
        st.tuples(st.sampled_from([1, 2, 3]), images(), st.integers(0, 3)),
        min_size=1,
        max_size=12,
    ),
    st.data(),
)
def test_without_before_images_a_room_hears_of_every_row_it_was_given(
    filters: list[RowFilter],
    changes: list[tuple[int, dict[str, Any] | None, int]],
    data: st.DataObject,
) -> None:
    """A source with no before images (Redis): each change reaches the rooms its new image
    matches and the rooms that hold its row (last sent it matching, or given it by a snapshot),
    exactly; so a client's rows never keep one that left its filter or was deleted, even
    when a write without its value came first (the rooms go on holding the row). Some
    changes do carry one (MongoDB's `whenAvailable` pre-images): routed by it, as always."""
    index: FilterIndex[Room] = FilterIndex(track=True)
    rooms = rooms_for(filters)
    for room in rooms:
        index.add(room)
    holds: dict[str, set[str]] = {room.name: set() for room in rooms}  # the model
    snapshot_room = data.draw(st.sampled_from(rooms))
    given = data.draw(st.sets(st.sampled_from(["1", "2", "3"])))
    index.hold(snapshot_room.name, given)
    holds[snapshot_room.name] |= given
    for key, after, seen in changes:
        # Without an image a change is a removal, or a write whose value was not read (Redis
        # found the key gone by then, MongoDB sent no document): the row may still be there.
        op = data.draw(st.sampled_from(["delete", "hset"])) if after is None else "update"
        before = dict(after or {}, a=seen) if seen else None  # a before image, now and then
        change = Change("1", "main", "redis", "public.orders", op, key, before, after)
        routed: list[Room] = []
        index.collect(change, routed)
        index.follow(change, routed, 0)
        names = [r.name for r in routed]
        assert len(names) == len(set(names))  # never twice
        matched = {r.name for r in rooms if r.filter is not None and r.filter.matches_image(after)}
        if before is None:
            holding = {name for name, rows in holds.items() if str(key) in rows}
            assert set(names) == matched | holding
        else:
            assert set(names) == {r.name for r in rooms if r.filter and r.filter.matches(change)}
        if before is None and after is None and op == "hset":
            continue  # unknown: the rooms holding the row go on holding it, for what follows
        for name, rows in holds.items():
            if name in matched:
                rows.add(str(key))
            else:
                rows.discard(str(key))
    assert index.held() == sum(len(rows) for rows in holds.values())
    for room in rooms:
        index.discard(room.name)
    assert index.held() == 0 and not index._held


def test_a_room_registered_again_keeps_the_rows_it_holds() -> None:
    """The cluster reader rebuilds a room from its spec whenever a node registers it."""
    index: FilterIndex[Room] = FilterIndex(track=True)
    (room,) = rooms_for([parse_filter("plan=eq.pro")])
    index.add(room)
    index.hold(room.name, ["a"])
    index.discard(room.name, forget=False)
    (again,) = rooms_for([parse_filter("plan=eq.pro")])
    index.add(again)
    routed: list[Room] = []
    gone = Change("1", "main", "redis", "t", "del", "a", None, None)
    index.collect(gone, routed)
    index.follow(gone, routed, 0)
    assert routed == [again]


@settings(max_examples=200, deadline=None)
@given(st.lists(row_filters, min_size=1, max_size=10), st.data())
def test_removing_rooms_leaves_the_index_exact_and_empty(
    filters: list[RowFilter], data: st.DataObject
) -> None:
    index: FilterIndex[Room] = FilterIndex()
    rooms = rooms_for(filters)
    for room in rooms:
        index.add(room)
    gone = data.draw(st.sets(st.sampled_from(range(len(rooms)))))
    for i in gone:
        index.discard(rooms[i].name)
    kept = [r for i, r in enumerate(rooms) if i not in gone]
    assert {r.name for r in index.rooms()} == {r.name for r in kept}
    before, after = data.draw(images()), data.draw(images())
    change = change_of(before, after)
    routed: list[Room] = []
    index.collect(change, routed)
    assert {r.name for r in routed} == {
        r.name for r in kept if r.filter is not None and oracle_matches(r.filter, change)
    }
    for room in kept:
        index.discard(room.name)
    assert len(index) == 0 and index.index_size() == 0


def test_a_change_reaches_its_user_room_among_many() -> None:
    target = TargetRooms(Room("main:public.orders", "main", "public.orders"))
    rooms = rooms_for([parse_filter(f"user_id=eq.{i}") for i in range(10_000)])
    for room in rooms:
        target.add(room)
    update = change_of({"user_id": 7, "id": 1}, {"user_id": Decimal("4321.0"), "id": 1})
    names = [r.name for r in target.matching(update)]
    assert names == ["main:public.orders", rooms[7].name, rooms[4321].name]


# -- through the hub: churn, grace, shaped rooms ------------------------------------------------


async def test_subscribe_churn_keeps_the_index_exact() -> None:
    connector = MemoryConnector("mem", Options({"targets": ["public.orders"]}, "test"))
    hub = Hub([connector])
    names: dict[int, str] = {}
    for user in range(50):
        ack = await hub.subscribe(
            f"sid{user}", SubscribeRequest("mem:public.orders", f"user_id=eq.{user}")
        )
        names[user] = ack["room"]
    # a second member of room 3, and rooms of several kinds on the same field
    await hub.subscribe("other", SubscribeRequest("mem:public.orders", "user_id=eq.3"))
    await hub.subscribe(
        "other", SubscribeRequest("mem:public.orders", "user_id=in.(3,4)&total=gt.5")
    )
    await hub.subscribe("other", SubscribeRequest("mem:public.orders", "total=gt.5"))
    target = hub._targets[("mem", "public.orders")]

    def routed(row: dict[str, Any]) -> set[str]:
        return {r.name for r in target.matching(change_of(None, row))}

    for user in range(0, 50, 2):
        hub.unsubscribe(f"sid{user}", names[user])
    hub.disconnect("sid3")
    hub.expire_rooms(float("inf"))
    assert names[3] in hub.rooms  # still followed by "other"
    assert routed({"user_id": 3, "total": 9}) == {
        "mem:public.orders",
        names[3],
        "mem:public.orders?total=gt.5&user_id=in.(3,4)",
        "mem:public.orders?total=gt.5",
    }
    assert routed({"user_id": 4, "total": 1}) == {"mem:public.orders"}
    assert routed({"user_id": 5}) == {"mem:public.orders", names[5]}
    assert len(target.filtered) == 25 + 2  # the odd users' rooms, room 3 counted once, two more
    hub.disconnect("other")
    for user in range(1, 50, 2):
        hub.disconnect(f"sid{user}")
    hub.expire_rooms(float("inf"))
    assert len(target.filtered) == 0 and target.filtered.index_size() == 0
    assert set(hub.rooms) == {"mem:public.orders"}
    assert routed({"user_id": 5}) == {"mem:public.orders"}


async def test_shaped_rooms_with_forced_filters_are_indexed() -> None:
    """Per-tenant rooms from a claim's forced row filter take the same indexed path."""
    connector = MemoryConnector("mem", Options({"targets": ["public.orders"]}, "test"))
    hub = Hub([connector])
    for tenant in range(100):
        shape = Shape(parse_filter(f"tenant=eq.{tenant}"), (("secret",),))
        await hub.subscribe(f"sid{tenant}", SubscribeRequest("mem:public.orders"), shape=shape)
    masked_only = Shape(None, (("secret",),))
    await hub.subscribe("all", SubscribeRequest("mem:public.orders"), shape=masked_only)
    target = hub._targets[("mem", "public.orders")]
    assert target.filtered.index_size() == 100 * 2  # each tenant under its text and number keys
    moved = change_of({"tenant": 1, "secret": "s"}, {"tenant": 2, "secret": "s"}, "mem")
    routed = hub.route(moved)
    by_name = {room.name: payload for room, payload in routed}
    assert len(routed) == 4  # the target room, tenants 1 and 2, and the masked-only room
    for room, payload in routed:
        if room.name.startswith("mem:public.orders?tenant=eq.1@"):
            assert payload["before"] == {"tenant": 1} and payload["after"] is None
        if room.name.startswith("mem:public.orders?tenant=eq.2@"):
            assert payload["before"] is None and payload["after"] == {"tenant": 2}
    assert by_name["mem:public.orders"]["after"]["secret"] == "s"


def test_a_room_s_replay_buffer_numbers_and_flags_what_it_evicts_and_keeps() -> None:
    """The buffer keeps changes without their numbers (consecutive, ending at `seq`): replays
    carry the numbers and `left` flags they were first sent with, and eviction forgets both."""
    room = Room("mem:t?s=eq.a", "mem", "t", filter=parse_filter("s=eq.a"), capacity=3)
    statuses = ["a", "b", "a", "b", "a"]  # changes 2 and 4 leave the filter (after is "b")
    sent = []
    for i, s in enumerate(statuses, start=1):
        change = Change(f"mem:{i}", "mem", "memory", "t", "update", i, {"s": "a"}, {"s": s})
        sent.append(room.record(change))
        if i == 4:  # 1 evicted; 2, 3 and 4 replayed as they were sent
            assert [bool(p.get("left")) for _, _, p in room.after(0)] == [True, False, True]
    assert [p["seq"] for p in sent] == [1, 2, 3, 4, 5]
    assert [bool(p.get("left")) for p in sent] == [False, True, False, True, False]
    assert room._left == {4}  # 2 was evicted with its change
    assert not room.holds_after(1) and room.holds_after(2) and room.holds_after(5)
    replayed = list(room.after(2))
    assert [(seq, change.id) for seq, change, _ in replayed] == [
        (3, "mem:3"),
        (4, "mem:4"),
        (5, "mem:5"),
    ]
    assert [payload for _, _, payload in replayed] == sent[2:]
    assert [seq for seq, _, _ in room.after(4)] == [5]
    assert list(room.after(5)) == []


def test_a_snapshot_watch_returns_the_rows_that_left_unseen_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without before images (`track`): of the snapshot's rows, those whose last change during
    the read came after its point and reached no one, oldest first; past the watch's limit,
    None (the hub then tells the subscriber to reload)."""
    index: FilterIndex[Room] = FilterIndex(track=True)
    paid = Room("m:t?status=eq.paid", "m", "t", filter=parse_filter("status=eq.paid"))
    index.add(paid)
    watch = index.watch(paid.name)
    assert index.watch("m:t").name == "m:t"  # not a filter room here: watches nothing

    def write(n: int, key: int, status: str | None) -> Change:
        after = None if status is None else {"id": key, "status": status}
        change = Change(f"m:{n}", "m", "memory", "t", "update", key, None, after, position=n)
        out: list[Room] = []
        index.collect(change, out)
        index.follow(change, out, 0)
        return change

    write(1, 1, "paid")  # reaches the room (matches): nothing to send again
    left_late = write(2, 2, "refunded")
    write(3, 3, "refunded")  # not a row of the snapshot
    gone = write(4, 4, None)
    write(5, 5, "refunded")  # covered: the snapshot already shows it gone
    index.unwatch(watch)
    write(6, 6, "refunded")  # after the watch: not noted
    covers = {5}
    found = watch.leavers(["1", "2", "4", "5", "6"], lambda c: c.position in covers)
    assert found == [left_late, gone]
    assert watch.leavers(None, lambda c: False) is None  # no keys: cannot tell
    monkeypatch.setattr("feed.core.filter_index.WATCH_LIMIT", 2)
    small = index.watch(paid.name)
    for n in range(3):
        write(10 + n, 10 + n, "refunded")
    assert small.leavers(["10"], lambda c: False) is None


def test_snapshots_read_at_once_share_one_log_and_each_sees_its_own_window() -> None:
    """A storm of snapshot subscribes costs one note per change, not one per snapshot; a
    snapshot begun later does not take a change from before it began."""
    index: FilterIndex[Room] = FilterIndex(track=True)
    rooms = [
        Room(f"m:t?status=eq.s{i}", "m", "t", filter=parse_filter(f"status=eq.s{i}"))
        for i in range(2)
    ]
    for room in rooms:
        index.add(room)

    def write(n: int, key: int, status: str) -> Change:
        change = Change(f"m:{n}", "m", "memory", "t", "update", key, None, {"status": status})
        out: list[Room] = []
        index.collect(change, out)
        index.follow(change, out, 0)
        return change

    early = index.watch(rooms[0].name)
    first = write(1, 1, "gone")
    late = index.watch(rooms[1].name)
    second = write(2, 2, "gone")
    assert early.log is late.log and early.log is not None and len(early.log.last) == 2
    index.unwatch(early)
    index.unwatch(late)
    index.unwatch(late)  # twice: no harm
    assert early.leavers(["1", "2"], lambda c: False) == [first, second]
    assert late.leavers(["1", "2"], lambda c: False) == [second]
    assert index.watch(rooms[0].name).log is not early.log  # a new log once none was left
