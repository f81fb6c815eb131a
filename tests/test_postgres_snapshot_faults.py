"""A snapshot whose connection the server ends (pg_terminate_backend, a restart) or that the
connector's own restart cuts short: the rows, read again on a fresh connection, or one clear
SourceUnavailable (the subscriber's `snapshot_failed`, which it retries), never an asyncpg
error escaping as a traceback and an `internal` ack."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest

from connectors.base import RoomAddress
from connectors.postgres import PostgresConnector
from feed.errors import SourceUnavailable
from tests.postgres_helpers import WAIT, make_connector, streaming
from tests.support import postgres as pg_support
from tests.support.postgres import PgDatabase

pg_server = pg_support.pg_server
pg = pg_support.pg

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]


async def blocked_snapshot_pid(db: PgDatabase, other_than: int | None = None) -> int:
    """The pid of this test's snapshot session (not `other_than`) once it waits for the
    table's lock (a server state with no event to await: polled, with a deadline)."""
    try:
        async with asyncio.timeout(WAIT):
            while True:
                found = await db.conn.fetchval(
                    "SELECT pid FROM pg_stat_activity"
                    " WHERE application_name = 'feed:main:snapshot' AND pid <> $1"
                    " AND datname = current_database() AND wait_event_type = 'Lock'",
                    other_than or 0,
                )
                if found is not None:
                    return int(found)
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError("the snapshot never waited for the table's lock") from None


async def terminate(db: PgDatabase, pid: int) -> None:
    assert await db.conn.fetchval("SELECT pg_terminate_backend($1, 5000)", pid)


def snapshot(connector: PostgresConnector) -> asyncio.Task[Any]:
    return asyncio.create_task(
        connector.snapshot(RoomAddress("public.orders"), lambda row: True, 100)
    )


@pytest.fixture
async def orders(pg: PgDatabase) -> PgDatabase:
    await pg.conn.execute("CREATE TABLE public.orders (id int PRIMARY KEY, note text)")
    await pg.conn.execute("INSERT INTO orders SELECT g, 'x' FROM generate_series(1, 5) g")
    return pg


@asynccontextmanager
async def snapshot_behind_a_lock(
    db: PgDatabase, connector: PostgresConnector
) -> AsyncIterator[tuple[asyncio.Task[Any], asyncpg.Connection]]:
    """A snapshot of `orders` started while another session holds the table's lock, so that
    its own session can be ended (or its connector stopped) while it waits. The lock holder
    comes along: rolling back its transaction lets the snapshot read."""
    locker = await asyncpg.connect(db.url)
    try:
        await locker.execute("BEGIN; LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
        yield snapshot(connector), locker
    finally:
        await locker.close()


async def test_a_snapshot_whose_session_is_terminated_reads_again(orders: PgDatabase) -> None:
    connector = make_connector(orders.url, ["public.orders"])
    async with streaming(connector), snapshot_behind_a_lock(orders, connector) as (task, locker):
        first = await blocked_snapshot_pid(orders)
        await terminate(orders, first)
        await blocked_snapshot_pid(orders, first)  # the second attempt, on a fresh session
        await locker.execute("ROLLBACK")
        result = await asyncio.wait_for(task, WAIT)
    assert sorted(row["id"] for row in result.rows) == [1, 2, 3, 4, 5]


async def test_a_snapshot_that_loses_its_session_twice_fails_in_one_line(
    orders: PgDatabase,
) -> None:
    connector = make_connector(orders.url, ["public.orders"])
    async with streaming(connector), snapshot_behind_a_lock(orders, connector) as (task, _):
        first = await blocked_snapshot_pid(orders)
        await terminate(orders, first)
        await terminate(orders, await blocked_snapshot_pid(orders, first))
        with pytest.raises(SourceUnavailable) as caught:
            await asyncio.wait_for(task, WAIT)
    message = str(caught.value)
    assert "\n" not in message
    assert "snapshot of public.orders: connection lost" in message, message
    assert "terminating connection due to administrator command" in message, message


async def test_a_snapshot_cut_short_by_the_connectors_restart_fails_cleanly(
    orders: PgDatabase,
) -> None:
    """What the hub does when it restarts a connector (stop, start) mid-snapshot: the pool
    closes under the snapshot ('pool is closing', 'connection is closed' before)."""
    connector = make_connector(orders.url, ["public.orders"])
    async with streaming(connector), snapshot_behind_a_lock(orders, connector) as (task, _):
        await blocked_snapshot_pid(orders)
        await asyncio.wait_for(connector.stop(), WAIT)  # closes the pool, then ends it
        with pytest.raises(SourceUnavailable) as caught:
            await asyncio.wait_for(task, WAIT)
    assert "\n" not in str(caught.value)
    assert "snapshot of public.orders" in str(caught.value), caught.value


def test_a_session_the_server_ended_is_named_so_in_status_lines() -> None:
    """What asyncpg raises at the next query on a session the server ended while it sat idle
    (the logical reader between polls): its protocol state was the reader's `down` line."""
    from connectors.postgres_errors import one_line

    state = asyncpg.InternalClientError("cannot switch to state 12; another operation (2) is in")
    assert one_line(state) == "the server ended the session"
    try:
        try:
            raise asyncpg.ConnectionDoesNotExistError("connection was closed: terminating")
        except asyncpg.ConnectionDoesNotExistError:
            raise asyncpg.InterfaceError(
                "cannot call Transaction.__aexit__(): the underlying connection is closed"
            ) from None
    except asyncpg.InterfaceError as exc:
        cleanup = exc
    assert one_line(cleanup) == "connection was closed: terminating"
