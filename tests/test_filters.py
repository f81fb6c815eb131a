"""Filters: parsing, canonical names, and evaluation on before and after images."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from feed.core.change import Change
from feed.core.filters import parse_filter
from feed.errors import ProtocolError


def change(before: dict[str, object] | None, after: dict[str, object] | None) -> Change:
    return Change("1", "main", "postgres", "public.orders", "update", 1, before, after)


def test_same_conditions_in_any_order_share_one_canonical_form() -> None:
    a = parse_filter("status=eq.paid&amount=gt.100")
    b = parse_filter("amount=gt.100&status=eq.paid&status=eq.paid")
    assert a == b
    assert a.canonical == "amount=gt.100&status=eq.paid"


@pytest.mark.parametrize(
    ("text", "row", "expected"),
    [
        ("status=eq.paid", {"status": "paid"}, True),
        ("status=neq.paid", {"status": "paid"}, False),
        ("amount=gt.100", {"amount": 150}, True),
        ("amount=gt.100", {"amount": Decimal("100.00")}, False),
        ("amount=gte.100", {"amount": Decimal("100.00")}, True),
        ("amount=lt.1.5", {"amount": 1.25}, True),
        ("amount=lte.1", {"amount": 2}, False),
        ("id=in.(1,2,3)", {"id": 2}, True),
        ("id=in.(1,2,3)", {"id": 4}, False),
        ("name=in.(Ann,Bob)", {"name": "Bob"}, True),
        ("paid=eq.true", {"paid": True}, True),
        ("paid=eq.true", {"paid": False}, False),
        ("note=eq.null", {"note": None}, True),
        ("note=neq.null", {"note": "x"}, True),
        ("amount=gt.10", {"amount": None}, False),
        ("amount=gt.10", {"other": 11}, False),
        ("amount=gt.abc", {"amount": 11}, False),
        ("city=eq.Paris", {"address": {"city": "Paris"}}, False),
        ("address.city=eq.Paris", {"address": {"city": "Paris"}}, True),
        ("at=gt.2026-01-01T00:00:00Z", {"at": dt.datetime(2026, 6, 1, tzinfo=dt.UTC)}, True),
        ("day=lt.2026-01-01", {"day": dt.date(2025, 12, 31)}, True),
        ("name=eq.John%20Smith", {"name": "John Smith"}, True),
    ],
)
def test_evaluation(text: str, row: dict[str, object], expected: bool) -> None:
    assert parse_filter(text).matches_image(row) is expected


def test_a_row_that_stops_matching_is_still_delivered() -> None:
    paid = parse_filter("status=eq.paid")
    assert paid.matches(change({"status": "paid"}, {"status": "refunded"}))
    assert paid.matches(change({"status": "new"}, {"status": "paid"}))
    assert not paid.matches(change({"status": "new"}, {"status": "sent"}))
    assert paid.matches(change({"status": "paid"}, None))


@pytest.mark.parametrize(
    "text",
    ["", "status", "status=paid", "status=like.x", "id=in.1,2", "id=in.()", "=eq.1", "&&&"],
)
def test_bad_filters_are_refused_with_a_reason(text: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_filter(text)
    assert info.value.code == "bad_filter" and info.value.message


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ('name=in.("Smith, John",Ada)', ("Ada", "Smith, John")),  # PostgREST's quoting
        ('name=eq."a,b"', ("a,b",)),
        ('name=in.("say \\"hi\\"",x)', ('say "hi"', "x")),
        ('name=in.("back\\\\slash")', ("back\\slash",)),
        ('name=in.("",a)', ("", "a")),
        ("name=in.(a%2Cb,c)", ("a,b", "c")),  # percent-encoding, as before
        ("name=eq.%22a%22", ('"a"',)),  # an encoded quote is a character, not a delimiter
    ],
)
def test_quoted_values_as_postgrest_reads_them(text: str, values: tuple[str, ...]) -> None:
    """A value with a comma (or anything else) in double quotes is one value; before, the
    quotes were kept and `in.("Smith, John",Ada)` looked for '"Smith' and ' John"'."""
    parsed = parse_filter(text)
    assert parsed.conditions[0].values == values
    assert parse_filter(parsed.canonical) == parsed
    assert parsed.matches_image({"name": values[-1]})


@pytest.mark.parametrize(
    "text", ['name=in.("abc,d)', 'name=in.("a"b,c)', 'name=eq."a"b"', 'name=in.("a)']
)
def test_broken_quotes_are_refused(text: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_filter(text)
    assert info.value.code == "bad_filter" and "quote" in info.value.message


def test_limits() -> None:
    with pytest.raises(ProtocolError):
        parse_filter("a=eq.1&" * 30)
    with pytest.raises(ProtocolError):
        parse_filter("a=eq." + "x" * 2000)
    with pytest.raises(ProtocolError):
        parse_filter("id=in.(" + ",".join(map(str, range(200))) + ")")


@given(st.text(max_size=200))
def test_any_text_either_parses_or_is_refused_cleanly(text: str) -> None:
    try:
        parsed = parse_filter(text)
    except ProtocolError as exc:
        assert exc.code == "bad_filter"
        return
    assert parse_filter(parsed.canonical) == parsed
