"""A filter room's snapshot query keeps every document the room's filter keeps.

`connectors.mongodb_filters.pushdown` may keep more than the filter (the feed checks each document
it reads), never less: a document it left out would be missing from the client's rows while its
changes still arrived. Checked over random documents of every BSON type the connector decodes
and random filters whose literals are drawn from those values' own texts, with the query
evaluated by the wire-protocol test server's matcher (tests/mongo_wire/query.py) on the
documents as that server stores them (a BSON round trip).
"""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import bson
from bson import Binary, Code, DBRef, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
from bson.binary import UuidRepresentation
from bson.codec_options import CodecOptions
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.mongodb_filters import pushdown
from feed.core.filters import parse_filter
from tests.mongo_wire.query import matches

CODEC: CodecOptions[dict[str, Any]] = CodecOptions(
    tz_aware=True, uuid_representation=UuidRepresentation.STANDARD
)
"""The connector's decoding (connectors/mongodb.py) and the test server's."""

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(-(2**31), 2**31 - 1).map(Int64),
    st.floats(allow_nan=True, allow_infinity=True),
    # Decimal128 holds 34 digits: a longer decimal is not a BSON value (it raised Inexact).
    st.decimals(allow_nan=False, places=3, min_value=-(10**30), max_value=10**30).map(Decimal128),
    st.sampled_from(["7", "paid", "", "true", "null", "7.0", "2026-01-01T00:00:00Z"]),
    st.text(max_size=6),
    st.datetimes(
        min_value=dt.datetime(1970, 1, 1),
        max_value=dt.datetime(2100, 1, 1),
        timezones=st.just(dt.UTC),
    ).map(lambda t: t.replace(microsecond=t.microsecond // 1000 * 1000)),
    st.builds(ObjectId),
    st.builds(uuid.uuid4),
    st.sampled_from([Code("7"), Code("paid")]),
    # Compared by the feed as Python's text of them: `b'ab'`, `Timestamp(1, 2)`, ...
    st.sampled_from(
        [Regex("a"), Timestamp(1, 2), Binary(b"ab", 0), MinKey(), MaxKey(), DBRef("c", 1)]
    ),
)
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(st.sampled_from(["id", "x"]), scalars, max_size=2),
)
documents = st.dictionaries(st.sampled_from(["a", "b", "c"]), values, max_size=3)


def literal_texts(value: Any) -> list[str]:
    """Texts a client could write for this value (how the feed would render or read it)."""
    if value is None:
        return ["null"]
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, dt.datetime):
        return [value.isoformat(), value.isoformat().replace("+00:00", "Z")]
    if isinstance(value, float | int | Int64):
        return [str(value), str(Decimal(str(value))), repr(value)]
    if isinstance(value, list):
        return [t for item in value for t in literal_texts(item)]
    if isinstance(value, dict):
        return [str(value)]
    return [str(value)]


def round_trip(doc: dict[str, Any]) -> dict[str, Any]:
    return bson.decode(bson.encode(doc, codec_options=CODEC), CODEC)


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, list[dict[str, Any]]]:
    docs = [round_trip(d) for d in draw(st.lists(documents, min_size=1, max_size=6))]
    texts = sorted({t for d in docs for v in d.values() for t in literal_texts(v)}) or ["x"]
    conditions = []
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from(["a", "b", "c", "a.id"]))
        op = draw(st.sampled_from(["eq", "in", "neq", "gt"]))
        if op == "in":
            chosen = draw(st.lists(st.sampled_from(texts), min_size=1, max_size=3))
            inner = ",".join(quote(t, safe="") if t else '""' for t in chosen)
            conditions.append(f"{field}=in.({inner})")
        else:
            conditions.append(f"{field}={op}.{quote(draw(st.sampled_from(texts)), safe='')}")
    return "&".join(conditions), docs


@settings(max_examples=1500, deadline=None)
@given(cases())
def test_the_query_keeps_every_document_the_filter_keeps(
    case: tuple[str, list[dict[str, Any]]],
) -> None:
    text, docs = case
    try:
        row_filter = parse_filter(text)
    except Exception:  # a literal the filter grammar refuses: not a room anyone can follow
        return
    query = pushdown(row_filter)
    for doc in docs:
        if row_filter.matches_image(doc):
            assert matches(doc, query), (text, doc, query)


def test_equality_is_pushed_and_the_rest_is_not() -> None:
    assert pushdown(parse_filter("user_id=eq.42"))["$or"][0] == {
        "user_id": {"$in": ["42", 42, 42.0, Decimal128("42")]}
    }
    assert pushdown(parse_filter("amount=gt.10&status=neq.paid")) == {}
    assert pushdown(parse_filter("owner.id=eq.7")) == {}  # dotted: left to the check
    assert pushdown(parse_filter("x=eq.null")) == {"x": {"$in": [None]}}
    two = pushdown(parse_filter("tenant=eq.acme&user_id=in.(1,2)"))
    assert [list(c["$or"][0]) for c in two["$and"]] == [["tenant"], ["user_id"]]
