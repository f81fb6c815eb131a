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
import re
import uuid
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

from connectors.postgres_migrate import quote_ident
from connectors.postgres_types import TableShape
from feed.core.filters import Condition, Literal, RowFilter
from feed.errors import ProtocolError

TEXT = {"text", "varchar", "bpchar", "name", "citext"}
INTEGERS = {"int2", "int4", "int8"}
NUMBERS = {*INTEGERS, "numeric", "float4", "float8", "oid"}
UNCOMPARABLE = {"bytea": "bytes, sent as base64"}
"""Types whose values a literal never equals: refused rather than accepted to match nothing.
(`money` is its text form, as `interval` is: compared as text.)"""


def _number(text: str) -> str | None:
    try:
        Decimal(text)
    except InvalidOperation:
        return "a number, e.g. 100 or 9.5"
    return None


def _whole(text: str) -> str | None:
    """An integer column equals no fraction, NaN or infinity (`qty=eq.1.5`): refused, as any
    literal no value of the column equals is. (`lt`/`gt` take them: `qty=lt.1.5` means something.)"""
    number = Decimal(text)
    if number.is_finite() and number == number.to_integral_value():
        return None
    return "a whole number, e.g. 100"


def _not_nan(text: str) -> str | None:
    """`x=eq.NaN` (or `lt.NaN`...) on a number column: filters compare numbers as IEEE does,
    so it matched nothing, not even a NaN (Postgres's own `=` says NaN = NaN): refused.
    `neq.NaN` holds for every value, and is kept."""
    if Decimal(text).is_nan():
        return (
            "a number other than NaN (NaN neither equals nor orders with any value, not even a NaN)"
        )
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


KEYS_ENTRY = "~keys"
"""Where `filter_schema` carries each table's key columns (comma-joined) to the other nodes."""

INTEGERS = {"int2", "int4", "int8"}
WHOLE_NUMBER = re.compile(r"-?[0-9]+")


def check_key(shape: TableShape, key: str, connector: str) -> None:
    """Raise ProtocolError("bad_key") for a row room key no row of this table can have.

    Only what is sure is refused: a composite key's values may hold commas themselves, so only
    fewer parts than key columns is impossible; an integer key's text is its digits.
    """
    columns = shape.primary_key
    if not columns:
        raise ProtocolError(
            "bad_key",
            f"{shape.target} has no primary key, so it has no row rooms: name its key columns "
            f"with `keys` in connector {connector!r}, or follow {connector}:{shape.target} "
            "with a filter",
        )
    if len(columns) > 1 and key.count(",") + 1 < len(columns):
        example = ",".join(f"<{column}>" for column in columns)
        raise ProtocolError(
            "bad_key",
            f"{shape.target}'s key is ({', '.join(columns)}): a row room names every one, "
            f"joined by commas ({connector}:{shape.target}:{example}), not {key[:64]!r}",
        )
    integer = len(columns) == 1 and shape.column_types.get(columns[0]) in INTEGERS
    if integer and not WHOLE_NUMBER.fullmatch(key):
        raise ProtocolError(
            "bad_key",
            f"{shape.target}'s key {columns[0]} is {shape.column_types[columns[0]]}: "
            f"{key[:64]!r} is not a whole number",
        )


def check_filter(shape: TableShape, row_filter: RowFilter) -> None:
    """Raise ProtocolError("bad_filter") for a condition no row of this table can satisfy."""
    for condition in row_filter.conditions:
        _check_condition(shape, condition)


def _check_condition(shape: TableShape, condition: Condition) -> None:
    field = condition.field
    column = field if field in shape.column_types else field.partition(".")[0]
    type_name = shape.column_types.get(column)
    if type_name is None:
        names = ", ".join(shape.column_types)
        if len(names) > 600:
            names = names[:600].rsplit(", ", 1)[0] + ", ..."
        raise ProtocolError(
            "bad_filter", f"{shape.target} has no column {field[:64]!r} (columns: {names})"
        )
    nulls_only = all(v == "null" for v in condition.values) and condition.op in ("eq", "neq")
    kind = "an array" if type_name.startswith("_") else UNCOMPARABLE.get(type_name)
    if column == field and kind is not None and not nulls_only:
        raise ProtocolError(
            "bad_filter",
            f"{shape.target}.{column} is {type_name} ({kind}): a filter compares single "
            "values, so no literal can match it (only eq.null and neq.null)",
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
        if wanted is None and condition.equality and type_name in INTEGERS:
            wanted = _whole(literal)
        if wanted is None and condition.op != "neq" and type_name in NUMBERS:
            wanted = _not_nan(literal)
        if wanted is not None:
            raise ProtocolError(
                "bad_filter",
                f"{shape.target}.{column} is {type_name}: {literal[:64]!r} is not {wanted}",
            )


# -- snapshots: the filter as a WHERE clause -------------------------------------------------------

INT8 = 1 << 63


def pushdown(
    shape: TableShape, row_filter: RowFilter | None, first: int
) -> tuple[list[str], list[Any]]:
    """SQL conditions (parameters numbered from `first`) that every row `row_filter` matches
    satisfies: a per-user room's snapshot then reads that user's rows, through the table's index,
    instead of every row (2.5 s per subscribe on a 300,000-row table, measured).

    Only what is sure to keep every matching row is translated; the filter is still applied to
    each row read (feed.core.filters, the rules clients are told), so a condition left out costs
    time, never rows. Translated: `eq` and `in` on integer, numeric, text, varchar, boolean, uuid,
    date and timestamp columns, `eq.null`, and `lt`/`lte`/`gt`/`gte` on integer and numeric
    columns. Not translated: `neq`, dotted paths, floats (a float4 reads back rounded: SQL's
    comparison would drop rows Python's keeps), char(n) (SQL ignores its padding one way only),
    text ordering (collations differ from Python's), and any literal not of the column's type.
    """
    clauses: list[str] = []
    args: list[Any] = []
    for condition in row_filter.conditions if row_filter is not None else ():
        translated = _translate(shape, condition)
        if translated is None:
            continue
        sql, values = translated
        clauses.append(sql.format(*(f"${first + len(args) + i}" for i in range(len(values)))))
        args += values
    return clauses, args


def _translate(shape: TableShape, condition: Condition) -> tuple[str, list[Any]] | None:
    type_name = shape.column_types.get(condition.field)
    if type_name is None or condition.op == "neq":
        return None
    column = "t." + quote_ident(condition.field)
    if condition.op in ("eq", "in"):
        null = any(literal.null for literal in condition.literals)
        typed = _typed(type_name, [v for v in condition.literals if not v.null])
        if typed is None:
            return None
        sql_type, values = typed
        if not values:
            return (f"{column} IS NULL" if null else "FALSE"), []
        sql = f"{column} = ANY({{}}::{sql_type}[])"
        return (f"({sql} OR {column} IS NULL)" if null else sql), [values]
    if type_name not in INTEGERS and type_name != "numeric":
        return None
    number = condition.literals[0].number
    if not _plain(number):
        return None
    symbol = {"lt": "<", "lte": "<=", "gt": ">", "gte": ">="}[condition.op]
    return f"{column} {symbol} {{}}::numeric", [number]


def _typed(type_name: str, literals: list[Literal]) -> tuple[str, list[Any]] | None:
    """The literals as values of the column's type, leaving out those that equal no value of it
    (None: one may equal a value SQL would not find, or the type is not translated)."""
    try:
        if type_name in INTEGERS or type_name == "numeric":
            numbers = [v.number for v in literals]
            if not all(_plain(n) for n in numbers):
                return None
            if type_name == "numeric":
                return "numeric", numbers
            # Compared as int8, so that the column's index serves: a fraction, or a number past
            # int8's range, equals no value of the column.
            whole = [int(n) for n in numbers if n is not None and n == n.to_integral_value()]
            return "int8", [n for n in whole if -INT8 <= n < INT8]
        if type_name in ("text", "varchar"):
            # Postgres text holds no NUL and no lone surrogate: such a literal equals no value.
            return "text", [v.text for v in literals if _storable(v.text)]
        if type_name == "bool":
            if any(v.boolean is None for v in literals):
                return None
            return "bool", [v.boolean for v in literals]
        if type_name == "uuid":
            return "uuid", [uuid.UUID(v.text) for v in literals]
        if type_name == "date":
            if any(v.day is None for v in literals):
                return None
            return "date", [v.day for v in literals]
        if type_name in ("timestamptz", "timestamp"):
            aware = type_name == "timestamptz"
            moments = [v.moment for v in literals]
            if any(m is None or (m.tzinfo is not None) != aware for m in moments):
                return None
            return type_name, moments
    except (ValueError, ArithmeticError):
        return None
    return None


def _plain(number: Decimal | None) -> bool:
    """A number SQL's numeric takes as it is: finite, and of a sane exponent."""
    return number is not None and number.is_finite() and abs(number.adjusted()) <= 1000


def _storable(text: str) -> bool:
    if "\x00" in text:
        return False
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
