"""A filter room's conditions as a MongoDB query, so that its snapshot reads only its documents.

A per-user room (`user_id=eq.42`, or a tenant's forced `row_filter`) used to read the whole
collection for its snapshot and test every document in Python: each subscribe cost a full
collection scan, however good the user's index. The hub's filter (feed.core.filters) stays the
final word on every document read (`Where`); what goes to MongoDB must only keep **every**
document that filter keeps, and may keep more.

Only equality is translated (`eq`, `in`; the per-user and per-tenant rooms), and only where the
translation is sure to be a superset:

- The feed compares by the value's type: text as text, numbers as exact decimals, booleans,
  timezone-aware times (the connector decodes BSON dates as UTC), `null`. A literal becomes
  each BSON value it can equal: the string, the number as a 64-bit int, a double and a
  Decimal128, the boolean, the instant, null; an ObjectId or a UUID when it spells one
  (the feed compares those by their text). MongoDB's equality on numbers crosses the numeric
  types, and on an array matches any element: both only add documents.
- A BSON symbol is text to the feed (pymongo decodes it as `str`), and a `$type` clause keeps
  symbols, which MongoDB's string equality need not.
- Other BSON types (binary, timestamps, regular expressions, DBRefs, documents, arrays) reach
  the feed's comparison as Python's text of the value (`b'..'`, `Timestamp(..)`, `{..}`): a
  literal that could be such a text is not translated.
- A dotted field (`owner.id`) is not translated: the feed first reads a top-level field named
  with the dot, which a MongoDB path never reaches.

Everything else (`neq`, `lt`, `gt`, ...) is left to the per-document check; docs/connectors/
mongodb.md says what each costs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import uuid
from decimal import Decimal
from typing import Any

from bson.decimal128 import Decimal128
from bson.objectid import ObjectId

from feed.core.filters import Condition, Literal, RowFilter

TEXT_TYPES = ["symbol"]
"""BSON types the feed compares as text (pymongo decodes them to `str`) that a string literal in
a MongoDB equality may not match. (JavaScript code decodes to `Code`, a `str` that equals no
plain string: the feed never finds it equal to a literal.)"""

OPAQUE_STARTS = (
    "b'",
    'b"',
    "{",
    "[",
    "Binary(",
    "Timestamp(",
    "Regex(",
    "DBRef(",
    "MinKey",
    "MaxKey",
)
"""How Python's text of a value of another BSON type begins: a literal that does is left to the
per-document check."""

INT64 = 1 << 63


def pushdown(row_filter: RowFilter | None) -> dict[str, Any]:
    """A MongoDB query keeping at least every document `row_filter` keeps ({}: every document)."""
    if row_filter is None:
        return {}
    return conjunction([c for c in map(_clause, row_filter.conditions) if c is not None])


def conjunction(clauses: list[dict[str, Any]]) -> dict[str, Any]:
    """A query keeping what every clause keeps ({}: every document)."""
    if len(clauses) <= 1:
        return clauses[0] if clauses else {}
    return {"$and": clauses}


def _clause(condition: Condition) -> dict[str, Any] | None:
    if not condition.equality or "." in condition.field or condition.field.startswith("$"):
        return None
    candidates: list[Any] = []
    for literal in condition.literals:
        values = _equal_values(literal)
        if values is None:
            return None
        candidates += values
    field = condition.field
    if all(literal.null for literal in condition.literals):
        return {field: {"$in": candidates}}
    return {"$or": [{field: {"$in": candidates}}, {field: {"$type": TEXT_TYPES}}]}


def _equal_values(literal: Literal) -> list[Any] | None:
    """Every BSON value the feed's `eq` may find equal to `literal` (None: not sure of that)."""
    if literal.null:  # `eq.null` holds for null only (in MongoDB: null or missing, a superset)
        return [None]
    text = literal.text
    if text.startswith(OPAQUE_STARTS):
        return None
    values: list[Any] = [text]
    if literal.boolean is not None:
        values.append(literal.boolean)
    number = literal.number
    if number is not None:
        values += _numbers(number)
    moment = literal.moment
    if moment is not None and moment.tzinfo is not None:  # a naive time equals no BSON date
        values.append(moment.astimezone(dt.UTC))
    if ObjectId.is_valid(text):
        values.append(ObjectId(text))
    with contextlib.suppress(ValueError):
        values.append(uuid.UUID(text))
    return values


def _numbers(number: Decimal) -> list[Any]:
    """The number as each numeric BSON type that can hold it (MongoDB compares across them; a
    Decimal128 is compared by the feed as its text, which equals the literal's text only for
    the same decimal, so the Decimal128 of the literal keeps it)."""
    if number.is_nan():  # a Decimal128 NaN is `NaN` to the feed's text comparison
        return [Decimal128(number)]
    values: list[Any] = []
    if number.is_finite() and number == number.to_integral_value():
        whole = int(number)
        if -INT64 <= whole < INT64:
            values.append(whole)
    values.append(float(number))  # past a double's range: inf, which equals only inf
    # More digits than a Decimal128 holds (Inexact) or too large: no Decimal128 equals it.
    with contextlib.suppress(decimal.Inexact, decimal.Overflow):
        values.append(Decimal128(number))
    return values
