"""Filters checked against a Postgres table's columns, so one that can never match is refused.

A filter on a column the table does not have (`nosuchcol=eq.1`), or with a literal that is not of
the column's type (`amount=gt.abc`), would be accepted by the generic filter code and then match
nothing, silently, forever. Postgres knows its schema, so the subscribe is refused instead, with
`bad_filter` naming the column and its type. Dotted paths (`meta.tier`) are refused only into
columns that are plainly not JSON (numbers, text, booleans, times, uuid); text-like, enum, array,
json and other types accept any literal.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

from connectors.postgres_types import TableShape
from feed.core.filters import Condition, RowFilter
from feed.errors import ProtocolError

TEXT = {"text", "varchar", "bpchar", "name", "citext"}
NUMBERS = {"int2", "int4", "int8", "numeric", "float4", "float8", "oid", "money"}


def _number(text: str) -> str | None:
    try:
        Decimal(text)
    except InvalidOperation:
        return "a number, e.g. 100 or 9.5"
    return None


def _bool(text: str) -> str | None:
    return None if text in ("true", "false") else "true or false"


def _moment(aware: bool) -> Callable[[str], str | None]:
    example = "2024-05-01T12:00:00Z" if aware else "2024-05-01T12:00:00"

    def check(text: str) -> str | None:
        try:
            value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            return f"an ISO 8601 time, e.g. {example}"
        if (value.tzinfo is not None) != aware:
            return f"a time {'with' if aware else 'without'} a UTC offset, e.g. {example}"
        return None

    return check


def _date(text: str) -> str | None:
    try:
        dt.date.fromisoformat(text)
    except ValueError:
        return "a date, e.g. 2024-05-01"
    return None


def _uuid(text: str) -> str | None:
    try:
        if str(uuid.UUID(text)) == text:
            return None
    except ValueError:
        pass
    return "a UUID in lowercase 8-4-4-4-12 form"


CHECKS: dict[str, Callable[[str], str | None]] = {
    **dict.fromkeys(NUMBERS, _number),
    "bool": _bool,
    "timestamptz": _moment(aware=True),
    "timestamp": _moment(aware=False),
    "date": _date,
    "uuid": _uuid,
}


def check_filter(shape: TableShape, row_filter: RowFilter) -> None:
    """Raise ProtocolError("bad_filter") for a condition no row of this table can satisfy."""
    for condition in row_filter.conditions:
        _check_condition(shape, condition)


def _check_condition(shape: TableShape, condition: Condition) -> None:
    field = condition.field
    column = field if field in shape.column_types else field.partition(".")[0]
    type_name = shape.column_types.get(column)
    if type_name is None:
        names = ", ".join(list(shape.column_types)[:40])
        raise ProtocolError(
            "bad_filter", f"{shape.target} has no column {field[:64]!r} (columns: {names})"
        )
    if column != field:  # a path into the column's value
        if type_name not in CHECKS and type_name not in TEXT:  # json, jsonb, composites, ...
            return
        raise ProtocolError(
            "bad_filter",
            f"{shape.target}.{column} is {type_name}, not JSON: {field[:64]!r} has no path into it",
        )
    check = CHECKS.get(type_name)
    if check is None:
        return
    for literal in condition.values:
        if literal == "null" and condition.op in ("eq", "neq", "in"):
            continue
        wanted = check(literal)
        if wanted is not None:
            raise ProtocolError(
                "bad_filter",
                f"{shape.target}.{column} is {type_name}: {literal[:64]!r} is not {wanted}",
            )
