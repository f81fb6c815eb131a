"""Noticing that a watched table's columns changed, in both capture modes.

An `ALTER TABLE` that adds, drops, renames or retypes a column changes every row of the table
(a new column's default, a value in its new type) without a single row change: nothing is
captured, and a client that keeps the rows (a snapshot, then the changes) went on showing the
old columns for every row not written since, a quiet difference from the table. So the reader
compares each table's columns at every capture check and, when they changed, reads the table's
shape again and announces a `gap` for the table: clients reload it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

COLUMNS_SQL = """
SELECT t.target,
       array_agg(quote_ident(a.attname) || ' ' || format_type(a.atttypid, NULL) ORDER BY a.attnum)
         AS columns,
       (SELECT string_agg(quote_ident(p.attname), ', ' ORDER BY k.n)
        FROM pg_catalog.pg_index i
        CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n)
        JOIN pg_catalog.pg_attribute p ON p.attrelid = i.indrelid AND p.attnum = k.attnum
        WHERE i.indrelid = to_regclass(t.reg) AND i.indisprimary) AS pk
FROM unnest($1::text[], $2::text[]) AS t(target, reg)
JOIN pg_catalog.pg_attribute a ON a.attrelid = to_regclass(t.reg)
WHERE a.attnum > 0 AND NOT a.attisdropped
GROUP BY t.target, t.reg
"""

PRIMARY_KEY = "\0primary_key"
"""The last entry of a table's `Columns`: its primary key, which names its rows' keys."""

Columns = tuple[str, ...]
"""A table's columns as `name type` (the name quoted where SQL would quote it, so a name with a
space, `"order id"`, is told from its type), in the table's order, then `PRIMARY_KEY (columns)`
(left out for a table whose key the config gives: its primary key names nothing then)."""


async def column_lists(
    conn: Any, regclasses: Mapping[str, str], limit: float, keyed: Collection[str] = ()
) -> dict[str, Columns]:
    """Each existing table's columns, by target (a table that does not exist is left out);
    the primary key too, but for the `keyed` targets (whose keys the config gives)."""
    targets = list(regclasses)
    rows = await conn.fetch(COLUMNS_SQL, targets, [regclasses[t] for t in targets], timeout=limit)
    found: dict[str, Columns] = {}
    for row in rows:
        key = () if row["target"] in keyed else (f"{PRIMARY_KEY} ({row['pk'] or 'none'})",)
        found[row["target"]] = (*row["columns"], *key)
    return found


def describe(before: Columns, after: Columns) -> str:
    """What changed between two column lists, e.g. `added extra integer; dropped pad`."""
    old = dict(_name_and_type(column) for column in before)
    new = dict(_name_and_type(column) for column in after)
    parts = [f"added {name} {new[name]}" for name in new if name not in old]
    parts += [f"dropped {name}" for name in old if name not in new]
    parts += [
        f"{name} is now {new[name]} (was {old[name]})"
        for name in new
        if name in old and old[name] != new[name]
    ]
    return "; ".join(parts).replace(f"{PRIMARY_KEY} is now", "the primary key is now")


def _name_and_type(column: str) -> tuple[str, str]:
    """`"N n" integer` -> (`"N n"`, `integer`): a quoted name ends at its closing quote (a
    doubled quote is one inside it), not at its first space (a column `N n` read as `N`, of
    type `n text`, in the gap's reason)."""
    if column.startswith('"'):
        end = 1
        while True:
            end = column.index('"', end)
            if column.startswith('""', end):
                end += 2
                continue
            return column[: end + 1], column[end + 2 :]
    name, _, kind = column.partition(" ")
    return name, kind


def gap_reason(target: str, before: Columns, after: Columns) -> str:
    return (
        f"the columns of {target} changed ({describe(before, after)}): rows not written since "
        "still show the old ones; reload"
    )
