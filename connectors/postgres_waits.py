"""Who a setup step waits for: one phrase naming the session, for the line an operator reads.

Logical mode's setup takes a lock no writer can pass (`ALTER TABLE ... REPLICA IDENTITY FULL`)
and makes a slot, which waits for every transaction open when it began. Behind one long
transaction the first hung `feed migrate` (and the writes queued behind its lock) for as long as
that transaction stayed open, the second ended in a bare TimeoutError traceback. Both now wait a
bounded time and say which session is in the way.
"""

from __future__ import annotations

import contextlib
from typing import Any

import asyncpg

LOCK_WAIT = "2s"
"""How long a setup step waits for a table's lock; writers queue behind it meanwhile."""

HOLDER_SQL = """
SELECT a.pid, a.application_name, extract(epoch FROM now() - a.xact_start)::int AS age
FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
WHERE l.relation = to_regclass($1) AND l.granted AND l.pid <> pg_backend_pid()
ORDER BY a.xact_start NULLS LAST LIMIT 1
"""

OLDEST_SQL = """
SELECT a.pid, a.application_name, extract(epoch FROM now() - a.xact_start)::int AS age
FROM pg_catalog.pg_stat_activity a
WHERE a.backend_xid IS NOT NULL AND a.pid <> pg_backend_pid()
ORDER BY a.xact_start LIMIT 1
"""


def _session(row: Any) -> str:
    if row is None:
        return ""
    app = f" {row['application_name']}," if row["application_name"] else ""
    return f"pid {row['pid']},{app} open for {row['age']}s"


async def lock_holder(conn: Any, regclass: str) -> str:
    """`pid N, app, open for Ns` for a transaction holding a lock on the table, or "" when
    none is found (it ended meanwhile, or the role may not see it)."""
    with contextlib.suppress(asyncpg.PostgresError, TimeoutError):
        return _session(await conn.fetchrow(HOLDER_SQL, regclass, timeout=5))
    return ""


async def oldest_transaction(conn: Any) -> str:
    """The same phrase for the oldest transaction with an xid (what a new slot waits for)."""
    with contextlib.suppress(asyncpg.PostgresError, TimeoutError):
        return _session(await conn.fetchrow(OLDEST_SQL, timeout=5))
    return ""
