"""Turning `to_jsonb(row)` back into the Python values asyncpg would have returned.

The capture trigger stores images as jsonb (the only form that survives any column list and any
row size), and snapshots read rows the same way, so a live change and a snapshot row of the same
data are always equal and filters treat them alike. jsonb loses a few types (numeric becomes a
JSON number, uuid and timestamps become strings, bytea becomes `\\x...` text), so each column is
decoded by its declared type; the feed's `to_json` then maps those Python values onto the wire
(table in docs/connectors/postgres.md).
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from connectors.postgres_migrate import quote_ident

Convert = Callable[[Any], Any]

# typtype and typcategory are "char": cast to text, or asyncpg hands them back as bytes.
COLUMNS_SQL = """
SELECT a.attname AS name,
       bt.typname AS type, bt.typtype::text AS kind, bt.typcategory::text AS category,
       bt.typrelid AS fields, et.typname AS elem, et.typtype::text AS elem_kind,
       et.typrelid AS elem_fields
FROM pg_catalog.pg_attribute a
JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
JOIN pg_catalog.pg_type bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
LEFT JOIN pg_catalog.pg_type et0 ON bt.typcategory = 'A' AND et0.oid = bt.typelem
LEFT JOIN pg_catalog.pg_type et
       ON et.oid = CASE WHEN et0.typtype = 'd' THEN et0.typbasetype ELSE et0.oid END
WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""
FIELDS_SQL = COLUMNS_SQL.replace("$1::regclass", "$1::oid")
"""A composite type's fields, as COLUMNS_SQL reads a table's columns (by the type's relation)."""

PRIMARY_KEY_SQL = """
SELECT a.attname AS name
FROM pg_catalog.pg_index i
CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n)
JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = $1::regclass AND i.indisprimary
ORDER BY k.n
"""


_DECODER = json.JSONDecoder(parse_float=Decimal)
"""One decoder for every row: `json.loads` with an argument builds a new one per call."""


def loads(text: str | None) -> Any:
    """Parse jsonb text keeping every digit of a number (floats become Decimal first)."""
    if text is None:
        return None
    return _DECODER.decode(text)


WIDEST = 1 << 64
"""Integers past 64 bits are JSON numbers few readers take: python-socketio's client drops a
message holding one of more than 100 digits (and jsonb prints 1e200 as 201 digits)."""


def plain(value: Any) -> Any:
    """Undo `loads`' Decimals inside values that are JSON by nature (json, jsonb, composites),
    and make a number too wide for 64 bits a double, as a decimal one already is."""
    if isinstance(value, Decimal):
        return float(value)
    if type(value) is int and not -WIDEST < value < WIDEST:
        return float(Decimal(value))  # past a double's range: infinity, sent as null
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def _numeric(value: Any) -> Any:
    if isinstance(value, Decimal):
        return value
    if isinstance(value, int | str):  # "NaN", "Infinity"
        return Decimal(value)
    return value


def _float(value: Any) -> Any:
    if isinstance(value, Decimal | int | str):
        return float(value)  # "NaN", "Infinity", "-Infinity" parse too
    return value


def _parse(parser: Callable[[str], Any]) -> Convert:
    def convert(value: Any) -> Any:
        if isinstance(value, str):
            try:
                return parser(value)
            except ValueError:  # 'infinity', years beyond 9999, BC dates: keep the server's text
                return value
        return value

    return convert


def _bytea(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    if value.startswith("\\x"):
        return bytes.fromhex(value[2:])
    return _unescape_bytea(value)


def _unescape_bytea(text: str) -> bytes:
    """The `bytea_output = escape` form, for writers whose session uses it."""
    out = bytearray()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and text[i + 1 : i + 2] == "\\":
            out.append(0x5C)
            i += 2
        elif ch == "\\" and i + 3 < len(text) + 1 and text[i + 1 : i + 4].isdigit():
            out.append(int(text[i + 1 : i + 4], 8))
            i += 4
        else:
            out.extend(ch.encode())
            i += 1
    return bytes(out)


def _oid(value: Any) -> Any:
    """`to_jsonb` writes an oid as a string ("16384"); it is a number, as filters read it
    (connectors/postgres_filters.py), and as the logical reader reads pgoutput's text: a
    number in both modes, whichever way a row was read (it was "5" in a row the logical reader
    had the server rebuild, and 5 in one it read itself)."""
    return int(value) if isinstance(value, str) else value


def _uuid(value: Any) -> Any:
    return uuid.UUID(value) if isinstance(value, str) else value


def _identity(value: Any) -> Any:
    return value


SCALARS: dict[str, Convert] = {
    "numeric": _numeric,
    "float4": _float,
    "float8": _float,
    "uuid": _uuid,
    "oid": _oid,
    "bytea": _bytea,
    "timestamptz": _parse(dt.datetime.fromisoformat),
    "timestamp": _parse(dt.datetime.fromisoformat),
    "date": _parse(dt.date.fromisoformat),
    "time": _parse(dt.time.fromisoformat),
    "timetz": _parse(dt.time.fromisoformat),
    "json": plain,
    "jsonb": plain,
}


def converter(type_name: str, kind: str, category: str) -> Convert:
    if kind == "c":  # composite: a nested JSON object
        return plain
    if kind == "e" or (category in ("S", "B", "N") and type_name not in SCALARS):
        return _identity  # enums, text types, bool, integers
    return SCALARS.get(type_name, plain)


def _array(element: Convert) -> Convert:
    def convert(value: Any) -> Any:
        if isinstance(value, list):
            return [convert(v) for v in value]
        return None if value is None else element(value)

    return convert


_ABSENT: Any = object()


@dataclass(frozen=True)
class TableShape:
    """A table's columns (with their decoders) and primary key, read from the catalog."""

    target: str
    columns: Mapping[str, Convert]
    primary_key: tuple[str, ...]
    column_types: Mapping[str, str]

    def decode(self, text: str | None) -> dict[str, Any] | None:
        """One row image, its columns in the table's order; columns the catalog no longer knows
        (dropped since) stay as JSON, after the others.

        The images are `to_jsonb(row)`, and jsonb keeps its keys shortest first, so a row read
        as is came out as `id, amount, status, created, user_id`: a client laying rows out as
        the table does would have to know the table's columns to undo that.
        """
        image = loads(text)
        if image is None:
            return None
        row: dict[str, Any] = {}
        for name, convert in self.columns.items():
            value = image.get(name, _ABSENT)
            if value is not _ABSENT:
                row[name] = None if value is None else convert(value)
        if len(row) != len(image):
            for name, value in image.items():
                if name not in row:
                    row[name] = None if value is None else plain(value)
        return row

    def knows(self, image: Mapping[str, Any]) -> bool:
        return all(name in self.columns for name in image)

    def key(self, image: Mapping[str, Any] | None) -> Any:
        """The event key: a scalar for one pk column, a dict for several, None without a pk."""
        if image is None or not self.primary_key:
            return None
        if len(self.primary_key) == 1:
            return image.get(self.primary_key[0])
        return {name: image.get(name) for name in self.primary_key}


async def read_shape(conn: Any, target: str, regclass: str, limit: float) -> TableShape:
    types: dict[str, str] = {}
    rows = await conn.fetch(COLUMNS_SQL, regclass, timeout=limit)
    columns = await _converters(conn, rows, limit, 0)
    for row in rows:
        types[row["name"]] = row["type"]
    pk = tuple(r["name"] for r in await conn.fetch(PRIMARY_KEY_SQL, regclass, timeout=limit))
    return TableShape(target, columns, pk, types)


MAX_NESTING = 8
"""Composite types inside composite types decoded by their fields' types, this deep at most
(past it, `plain`)."""


async def _converters(conn: Any, rows: list[Any], limit: float, depth: int) -> dict[str, Convert]:
    """A decoder per column (or per field of a composite type), by its type; a composite's
    fields by theirs, so a numeric, a bytea or a timestamptz reads the same in a composite
    as in a column of its own (before, they came as a double, `\\x..` text and jsonb's time)."""
    columns: dict[str, Convert] = {}
    for row in rows:
        convert = converter(row["type"], row["kind"], row["category"])
        if row["kind"] == "c" and depth < MAX_NESTING:
            convert = await _composite(conn, row["fields"], limit, depth)
        if row["category"] == "A" and row["elem"] is not None:
            element = converter(row["elem"], row["elem_kind"], "")
            if row["elem_kind"] == "c" and depth < MAX_NESTING:
                element = await _composite(conn, row["elem_fields"], limit, depth)
            convert = _array(element)
        columns[row["name"]] = convert
    return columns


async def _composite(conn: Any, relid: int, limit: float, depth: int) -> Convert:
    fields = await _converters(
        conn, await conn.fetch(FIELDS_SQL, relid, timeout=limit), limit, depth + 1
    )
    if not fields:
        return plain

    def convert(value: Any) -> Any:
        if not isinstance(value, dict):
            return plain(value)
        record: dict[str, Any] = {}
        for name, decode in fields.items():  # in the type's order, as a table's columns
            if name in value:
                field = value[name]
                record[name] = None if field is None else decode(field)
        for name, field in value.items():
            if name not in record:
                record[name] = plain(field)
        return record

    return convert


GENERATED_SQL = """
SELECT a.attname AS name, a.attgenerated::text AS kind,
       CASE WHEN a.attgenerated <> '' THEN pg_get_expr(d.adbin, d.adrelid) END AS expr
FROM pg_attribute a
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""


async def computing(
    conn: Any, regclass: str, pick: Callable[[str, str], bool], limit: float
) -> str | None:
    """A select list over a row `r` of the table that computes the generated columns `pick`
    chooses (by name and kind: "s" stored, "v" virtual) from the row's other columns, by their
    own expressions; None when it chooses none (or the table is gone).

    Why: some images come without a generated column's value (pgoutput before Postgres 18
    leaves stored ones out; a trigger's NEW and OLD hold virtual ones, Postgres 18, as NULL),
    where a snapshot's `to_jsonb(row)` has it. Such a column's expression is immutable and of
    the same row's other columns only, so computing it from the image gives the value a read
    of the row gives.
    """
    rows = await conn.fetch(GENERATED_SQL, regclass, timeout=limit)
    if not any(row["expr"] is not None and pick(row["name"], row["kind"]) for row in rows):
        return None
    return ", ".join(
        f"({row['expr']}) AS {quote_ident(row['name'])}"
        if row["expr"] is not None and pick(row["name"], row["kind"])
        else f"r.{quote_ident(row['name'])}"
        for row in rows
    )


def recompute_sql(regclass: str, select: str | None) -> str:
    """The query that rebuilds images ($1, JSON texts) as `to_jsonb` of the table's row type,
    in order; with `select` (`computing`), its generated columns computed."""
    record = f"jsonb_populate_record(NULL::{regclass}, u.x::jsonb)"
    rows = "unnest($1::text[]) WITH ORDINALITY AS u(x, n)"
    if select is None:
        return f"SELECT to_jsonb({record})::text AS image FROM {rows} ORDER BY u.n"
    # Qualified throughout: a table's own column named `g` or `n` would otherwise be what a bare
    # `g` or `n` means here (the whole-row `g` its value, `n` ambiguous).
    return (
        f"SELECT to_jsonb(g.*)::text AS image FROM {rows},"
        f" LATERAL (SELECT {select} FROM {record} AS r) AS g ORDER BY u.n"
    )
