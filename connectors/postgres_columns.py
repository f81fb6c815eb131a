"""Noticing that a watched table's columns changed, in both capture modes.

An `ALTER TABLE` that adds, drops, renames or retypes a column changes every row of the table
(a new column's default, a value in its new type) without a single row change: nothing is
captured, and a client that keeps the rows (a snapshot, then the changes) went on showing the
old columns for every row not written since, a quiet difference from the table. So the reader
compares each table's columns at every capture check and, when they changed, reads the table's
shape again and announces a `gap` for the table: clients reload it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

COLUMNS_SQL = """
SELECT t.target, array_agg(a.attname || ' ' || format_type(a.atttypid, NULL) ORDER BY a.attnum)
       AS columns
FROM unnest($1::text[], $2::text[]) AS t(target, reg)
JOIN pg_catalog.pg_attribute a ON a.attrelid = to_regclass(t.reg)
WHERE a.attnum > 0 AND NOT a.attisdropped
GROUP BY t.target
"""

Columns = tuple[str, ...]
"""A table's columns as `name type`, in the table's order."""


async def column_lists(
    conn: Any, regclasses: Mapping[str, str], limit: float
) -> dict[str, Columns]:
    """Each existing table's columns, by target (a table that does not exist is left out)."""
    targets = list(regclasses)
    rows = await conn.fetch(COLUMNS_SQL, targets, [regclasses[t] for t in targets], timeout=limit)
    return {row["target"]: tuple(row["columns"]) for row in rows}


def describe(before: Columns, after: Columns) -> str:
    """What changed between two column lists, e.g. `added extra integer; dropped pad`."""
    old = dict(column.split(" ", 1) for column in before)
    new = dict(column.split(" ", 1) for column in after)
    parts = [f"added {name} {new[name]}" for name in new if name not in old]
    parts += [f"dropped {name}" for name in old if name not in new]
    parts += [
        f"{name} is now {new[name]} (was {old[name]})"
        for name in new
        if name in old and old[name] != new[name]
    ]
    return "; ".join(parts) or "columns reordered"


def gap_reason(target: str, before: Columns, after: Columns) -> str:
    return (
        f"the columns of {target} changed ({describe(before, after)}): rows not written since "
        "still show the old ones; reload"
    )
