"""Versioned SQL migrations for the Postgres connector (`feed migrate`).

Files in `migrations/` are named `NNNN_description.sql` and applied in version order, each in its
own transaction together with its row in `<schema>.migrations`, so a failed file leaves nothing
half-done and the error names the file. An advisory lock keeps two `feed migrate` runs from racing.
A file edited after it was applied is reported, never re-run: migrations only move forward.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from feed.errors import SourceMisconfigured, SourceUnavailable

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
FILE_NAME = re.compile(r"^(\d{4})_[A-Za-z0-9_]+\.sql$")
LOCK_CLASS = 0x66656564  # "feed": first key of every advisory lock the connector takes
SETUP_WAIT_MS = 30_000


class MigrationError(SourceMisconfigured):
    """A migration file failed; the message names the file and the server's reason."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()[:16]


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def channel_for(schema: str) -> str:
    """The NOTIFY channel the capture trigger wakes the reader on."""
    return f"{schema}_journal"


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = FILE_NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: migration files are named NNNN_description.sql")
        found.append(Migration(int(match.group(1)), path.name, path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a version number in {directory}")
    return found


def render(migration: Migration, schema: str) -> str:
    return migration.sql.replace("{{schema}}", quote_ident(schema)).replace(
        "{{channel}}", quote_literal(channel_for(schema))
    )


async def pending(conn: Any, schema: str, migrations: list[Migration] | None = None) -> list[str]:
    """Names of migrations not yet applied (all of them when the schema does not exist)."""
    migrations = load_migrations() if migrations is None else migrations
    exists = await conn.fetchval(
        "SELECT to_regclass($1) IS NOT NULL", f"{quote_ident(schema)}.migrations"
    )
    if not exists:
        return [m.name for m in migrations]
    done = {
        r["version"]
        for r in await conn.fetch(f"SELECT version FROM {quote_ident(schema)}.migrations")
    }
    return [m.name for m in migrations if m.version not in done]


async def apply_migrations(
    conn: Any, schema: str, migrations: list[Migration] | None = None
) -> list[str]:
    """Apply what is missing; return one line per file applied (or one saying all is current)."""
    import asyncpg

    migrations = load_migrations() if migrations is None else migrations
    q = quote_ident(schema)
    lines: list[str] = []
    lock_key = await conn.fetchval("SELECT hashtext($1)", schema)
    try:
        async with conn.transaction():
            # Held until the end of this bootstrap transaction only; each file re-takes it below.
            await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", LOCK_CLASS, lock_key)
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {q}")
            await conn.execute(
                f"""CREATE TABLE IF NOT EXISTS {q}.migrations (
                    version integer PRIMARY KEY,
                    name text NOT NULL,
                    checksum text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now())"""
            )
    except asyncpg.InsufficientPrivilegeError as exc:
        raise MigrationError(
            f"cannot create schema {schema!r}: {_reason(exc)}: " + await _create_grant(conn, schema)
        ) from None
    except asyncpg.PostgresError as exc:
        raise MigrationError(f"cannot create schema {schema!r}: {_reason(exc)}") from None
    for migration in migrations:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", LOCK_CLASS, lock_key)
            row = await conn.fetchrow(
                f"SELECT name, checksum FROM {q}.migrations WHERE version = $1", migration.version
            )
            if row is not None:
                if row["checksum"] != migration.checksum:
                    lines.append(
                        f"warning: {migration.name} changed after it was applied; not re-run"
                    )
                continue
            try:
                await conn.execute(render(migration, schema))
            except asyncpg.PostgresError as exc:
                raise MigrationError(
                    f"migration {migration.name} failed and was rolled back: {_reason(exc)}"
                ) from None
            await conn.execute(
                f"INSERT INTO {q}.migrations (version, name, checksum) VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                migration.checksum,
            )
            lines.append(f"applied {migration.name}")
    if not lines:
        lines.append(f"schema {schema!r} is up to date ({len(migrations)} migrations applied)")
    return lines + await newer(conn, schema, migrations)


async def newer(conn: Any, schema: str, migrations: list[Migration] | None = None) -> list[str]:
    """A warning when the schema holds migrations this build does not have: a newer feed
    migrated it (a roll under way, or a build gone back to). Migrations only move forward, so
    this build reads a schema it was not written for: said, not refused, because during a
    rolling upgrade the older nodes must keep running."""
    migrations = load_migrations() if migrations is None else migrations
    known = {m.version for m in migrations}
    q = quote_ident(schema)
    if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{q}.migrations"):
        return []
    rows = await conn.fetch(f"SELECT version, name FROM {q}.migrations ORDER BY version")
    unknown = [r["name"] for r in rows if r["version"] not in known]
    if not unknown:
        return []
    return [
        f"warning: schema {schema!r} has migrations this feed does not know "
        f"({', '.join(unknown)}): a newer feed applied them; run that build (migrations are "
        "never undone)"
    ]


async def _create_grant(conn: Any, schema: str) -> str:
    """The GRANT that lets `feed migrate` create its schema (or its table in it)."""
    row = await conn.fetchrow(
        "SELECT current_user AS who, current_database() AS db,"
        " (SELECT count(*) FROM pg_namespace WHERE nspname = $1) AS present",
        schema,
    )
    if row["present"]:
        grant = f"GRANT CREATE ON SCHEMA {quote_ident(schema)} TO {row['who']}"
    else:
        grant = f"GRANT CREATE ON DATABASE {quote_ident(row['db'])} TO {row['who']}"
    return f"{grant}, or run `feed migrate` as the database's owner"


@contextlib.asynccontextmanager
async def setup_lock(conn: Any, schema: str) -> AsyncIterator[None]:
    """Hold the schema's migration lock for the session while capture is attached.

    Every replica of a deployment may run `feed migrate` (or start with `auto_migrate`) at once:
    attaching unlocked, two of them created the same trigger and all but one failed with
    `trigger ... already exists`; the files themselves were already applied under this lock.
    """
    import asyncpg

    key = await conn.fetchval("SELECT hashtext($1)", schema)
    try:  # one string, one implicit transaction: a lock that times out takes the SET with it
        await conn.execute(
            f"SET lock_timeout = {SETUP_WAIT_MS}; SELECT pg_advisory_lock({LOCK_CLASS}, {key});"
            " RESET lock_timeout"
        )
    except asyncpg.LockNotAvailableError as exc:
        raise SourceUnavailable(
            f"another `feed migrate` or starting feed has been setting up schema {schema!r} "
            f"for {SETUP_WAIT_MS // 1000}s ({_reason(exc)}): try again once it is done"
        ) from None
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # a lost session has let go of it already
            await conn.execute("SELECT pg_advisory_unlock($1, $2)", LOCK_CLASS, key)


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text
