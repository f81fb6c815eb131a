"""Logical mode under an operator's hands (issue 17): a slot dropped or invalidated is announced
after any restart, `feed check` tells the truth, and the WAL the slot holds is a metric.

Needs wal_level = logical (the suite's embedded server has it; the tests skip elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import pytest

from feed.core.change import Gap
from feed.errors import SourceMisconfigured
from tests.postgres_helpers import WAIT, make_connector, streaming
from tests.support import postgres as pg_support
from tests.support.postgres import PgDatabase
from tests.support.server import FeedClient, RunningFeed, feed_client, http_get, running_feed
from tests.support.waiting import wait_until
from tests.test_capture_watch import metric, next_status

pg_server = pg_support.pg_server
pg = pg_support.pg
logical_pg = pg_support.logical_pg

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]


@pytest.fixture
async def small_wal_pg() -> AsyncIterator[PgDatabase]:
    """A private server whose slots may keep at most 1 MB of WAL: easy to invalidate."""
    async with pg_support.private_database(max_slot_wal_keep_size="1MB") as db:
        yield db


def logical(db: PgDatabase, **extra: Any) -> Any:
    return make_connector(db.url, ["public.orders"], mode="logical", poll_interval=0.02, **extra)


def feed_config(db: PgDatabase) -> str:
    """A feed reading public.orders in logical mode, checking its capture every 0.3 s."""
    return f"""
[[connectors]]
name = "main"
type = "postgres"
mode = "logical"
dsn = "{db.url}"
tables = ["public.orders"]
poll_interval = 0.02
capture_check_interval = 0.3
"""


async def orders(db: PgDatabase) -> None:
    await db.conn.execute("CREATE TABLE public.orders (id int PRIMARY KEY, note text)")


async def invalidate(db: PgDatabase) -> None:
    """Write past max_slot_wal_keep_size and checkpoint: the slot's WAL is removed."""
    for _ in range(4):
        await db.conn.execute(
            "INSERT INTO orders SELECT g, 'lost' FROM generate_series(1, 1) g"
            " ON CONFLICT (id) DO UPDATE SET note = 'lost'"
        )
        await db.conn.execute("SELECT pg_switch_wal()")
    await db.conn.execute("CHECKPOINT")
    status = await db.conn.fetchval("SELECT wal_status FROM pg_replication_slots")
    assert status == "lost", status


async def test_a_slot_dropped_while_stopped_is_announced_by_a_new_process(
    logical_pg: PgDatabase,
) -> None:
    db = logical_pg
    await orders(db)
    async with streaming(logical(db)) as stream:
        await db.conn.execute("INSERT INTO orders VALUES (1, 'a')")
        await stream.take(1)
    await db.conn.execute("SELECT pg_drop_replication_slot('feed_main')")
    await db.conn.execute("INSERT INTO orders VALUES (2, 'never delivered')")
    with pytest.raises(SourceMisconfigured, match="is gone"):
        await logical(db).check()
    # A new connector, as after a restart of the feed: nothing in memory says the slot existed.
    async with streaming(logical(db)) as stream:
        gap = await asyncio.wait_for(stream.queue.get(), WAIT)
        assert isinstance(gap, Gap) and "dropped" in gap.reason, gap
        await db.conn.execute("INSERT INTO orders VALUES (3, 'a')")
        assert [c.key for c in await stream.take(1)] == [3]
        stream.assert_idle()


async def test_feed_check_in_logical_mode(logical_pg: PgDatabase) -> None:
    db = logical_pg
    await orders(db)
    assert "no replication slot 'feed_main' yet" in await logical(db).check()
    await logical(db).migrate()
    text = await logical(db).check()
    assert "logical mode" in text and "pending" not in text
    assert "slot 'feed_main' reserved, retains" in text


async def test_an_invalidated_slot_is_recreated_with_a_gap_and_a_hint(
    small_wal_pg: PgDatabase,
) -> None:
    db = small_wal_pg
    await orders(db)
    await logical(db).migrate()
    await invalidate(db)
    with pytest.raises(SourceMisconfigured, match="max_slot_wal_keep_size"):
        await logical(db).check()
    async with running_feed(feed_config(db)) as feed, feed_client(feed.url) as client:
        assert (await client.subscribe("main:public.orders"))["ok"]
        # The slot was lost before this feed started: announced at start (perhaps before the
        # subscribe, so counted rather than awaited on the client).
        async with asyncio.timeout(WAIT):
            while feed.hub.metrics.value("feed_gaps_total", connector="main") < 1:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        await next_status(client, "up")
        await db.conn.execute("INSERT INTO orders VALUES (100, 'after')")
        got = await client.next_change()
        assert got["key"] == 100
        retained = await metric(feed.url, 'feed_postgres_slot_retained_wal_bytes{connector="main"}')
        assert retained >= 0
        assert "feed_postgres_slot_retained_wal_bytes" in (await http_get(feed.url + "/metrics"))[1]
        # Invalidated again while serving: the client hears the gap, with the cause.
        before = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
        await invalidate(db)
        # (A "connection lost" may come first: the checkpoint ends a session reading the slot.)
        await next_status(client, "down", saying="max_slot_wal_keep_size")
        gap = await client.next_gap(timeout=WAIT)
        while gap["ts"] < before:  # the start's gap, if it reached this client
            gap = await client.next_gap(timeout=WAIT)
        assert "wal_status lost" in gap["reason"], gap
        await db.conn.execute("INSERT INTO orders VALUES (101, 'after')")
        async with asyncio.timeout(WAIT):  # what invalidate() wrote may come first, or not
            while (await client.next_change())["key"] != 101:
                pass


@contextlib.asynccontextmanager
async def following_orders(db: PgDatabase) -> AsyncIterator[tuple[RunningFeed, FeedClient]]:
    """A feed reading the slot, and a client that has had row 1 of `orders` through it."""
    await orders(db)
    async with running_feed(feed_config(db)) as feed, feed_client(feed.url) as client:
        connector = feed.hub.connectors["main"]
        await wait_until(lambda: connector.status.state.value == "up", WAIT, "the slot read")
        assert (await client.subscribe("main:public.orders"))["ok"]
        await db.conn.execute("INSERT INTO orders VALUES (1, 'a')")
        assert (await client.next_change())["key"] == 1
        yield feed, client


async def test_a_table_taken_out_of_the_publication_is_put_back_with_a_gap(
    logical_pg: PgDatabase,
) -> None:
    db = logical_pg
    async with following_orders(db) as (feed, client):
        await db.conn.execute("ALTER PUBLICATION feed_main DROP TABLE orders")
        await db.conn.execute("INSERT INTO orders VALUES (2, 'not decoded')")
        gap = await client.next_gap()
        assert "stopped covering" in gap["reason"], gap
        # Counted as what it was (it was counted as slot_lost, a slot that was never touched).
        assert feed.hub.connectors["main"].capture_faults == {"publication": 1}
        tables = "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'feed_main'"
        assert await db.conn.fetchval(tables) == 1
        await db.conn.execute("INSERT INTO orders VALUES (3, 'a')")
        async with asyncio.timeout(WAIT):  # 2 may or may not be decoded, depending on timing
            while (await client.next_change())["key"] != 3:
                pass


async def test_a_slot_moved_on_while_the_feed_was_stopped_is_announced(
    logical_pg: PgDatabase,
) -> None:
    """Dropped and made again by hand (or read by something else) while no feed ran: the slot
    exists, so only where the feed stopped, kept on the publication, tells."""
    db = logical_pg
    await orders(db)
    async with streaming(logical(db)) as stream:
        await db.conn.execute("INSERT INTO orders VALUES (1, 'a')")
        await stream.take(1)
    await db.conn.execute("INSERT INTO orders VALUES (2, 'lost with the old slot')")
    await db.conn.execute("SELECT pg_drop_replication_slot('feed_main')")
    await db.conn.execute("SELECT pg_create_logical_replication_slot('feed_main', 'pgoutput')")
    async with streaming(logical(db)) as stream:
        gap = await asyncio.wait_for(stream.queue.get(), WAIT)
        assert isinstance(gap, Gap) and "moved on while the feed was stopped" in gap.reason, gap
        await db.conn.execute("INSERT INTO orders VALUES (3, 'a')")
        assert [c.key for c in await stream.take(1)] == [3]
    # A clean stop and start with nothing in between: no gap.
    async with streaming(logical(db)) as stream:
        await db.conn.execute("INSERT INTO orders VALUES (4, 'a')")
        assert [c.key for c in await stream.take(1)] == [4]
        stream.assert_idle()


async def test_a_slot_of_another_database_is_refused(logical_pg: PgDatabase) -> None:
    import uuid

    import asyncpg

    db = logical_pg
    await orders(db)
    slot = f"foreign_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(db.server.admin_url)
    try:
        await admin.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", slot)
        with pytest.raises(SourceMisconfigured, match="belongs to database 'postgres'"):
            await logical(db, slot=slot).start()
        with pytest.raises(SourceMisconfigured, match="is not this feed's"):
            await logical(db, slot=slot).check()
    finally:
        await admin.execute("SELECT pg_drop_replication_slot($1)", slot)
        await admin.close()


async def test_a_slot_invalidated_for_idleness_is_recreated_with_a_gap() -> None:
    """Postgres 18 invalidates a slot unread for idle_replication_slot_timeout. The feed
    blamed max_slot_wal_keep_size (wal_status reads lost); it reads invalidation_reason now,
    and `feed check`, the status and the gap name the setting to raise."""
    async with pg_support.private_database(idle_replication_slot_timeout="1s") as db:
        if int(await db.conn.fetchval("SHOW server_version_num")) < 180000:
            pytest.skip("idle_replication_slot_timeout needs Postgres 18")
        await orders(db)
        await logical(db).migrate()
        reason = (
            "SELECT invalidation_reason FROM pg_replication_slots WHERE slot_name = 'feed_main'"
        )

        async def idle_out() -> bool:
            await db.conn.execute("CHECKPOINT")  # where the server invalidates it
            return bool(await db.conn.fetchval(reason) == "idle_timeout")

        async with asyncio.timeout(WAIT):
            while not await idle_out():  # noqa: ASYNC110 - the server has no event for it
                await asyncio.sleep(0.2)
        with pytest.raises(SourceMisconfigured, match="idle_replication_slot_timeout"):
            await logical(db).check()
        async with streaming(logical(db)) as stream:
            gap = await asyncio.wait_for(stream.queue.get(), WAIT)
            assert isinstance(gap, Gap) and "idle_timeout" in gap.reason, gap
            await db.conn.execute("INSERT INTO orders VALUES (1, 'after')")
            assert (await stream.next()).key == 1


async def test_a_publication_narrowed_by_hand_is_set_back_with_a_gap(
    logical_pg: PgDatabase,
) -> None:
    """`ALTER PUBLICATION ... SET (publish = 'insert')`: updates and deletes were no longer
    decoded, and clients' rows drifted from the table while the connector showed `up`."""
    db = logical_pg
    async with following_orders(db) as (feed, client):
        await db.conn.execute("ALTER PUBLICATION feed_main SET (publish = 'insert')")
        await db.conn.execute("UPDATE orders SET note = 'not decoded' WHERE id = 1")
        gap = await client.next_gap()
        assert "lost publish = 'insert, update, delete, truncate'" in gap["reason"], gap
        assert feed.hub.connectors["main"].capture_faults == {"publication": 1}
        options = "SELECT pubupdate AND pubdelete FROM pg_publication WHERE pubname = 'feed_main'"
        assert await db.conn.fetchval(options)
        await db.conn.execute("DELETE FROM orders WHERE id = 1")
        async with asyncio.timeout(WAIT):
            while (await client.next_change())["op"] != "delete":
                pass


async def test_a_publication_dropped_by_hand_is_made_again_with_its_slot(
    logical_pg: PgDatabase,
) -> None:
    """The slot decodes each change with the catalog of its time, so after a DROP PUBLICATION
    every peek failed with 'publication "feed_main" does not exist', even after the restart had
    made it again: a restart loop for good, and no gap."""
    db = logical_pg
    async with following_orders(db) as (feed, client):
        connector = feed.hub.connectors["main"]
        await db.conn.execute("DROP PUBLICATION feed_main")
        await db.conn.execute("INSERT INTO orders VALUES (2, 'lost')")
        gap = await client.next_gap()
        # Up to PostgreSQL 17 the slot fails on the missing publication; 18 decodes on without
        # it, and the capture check finds the tables uncovered first: a gap either way.
        dropped = ("publication 'feed_main' was dropped", "stopped covering")
        assert any(reason in gap["reason"] for reason in dropped), gap
        assert connector.capture_faults == {"publication": 1}
        await db.conn.execute("INSERT INTO orders VALUES (3, 'a')")
        async with asyncio.timeout(WAIT):
            while (await client.next_change())["key"] != 3:
                pass
        assert connector.status.state.value == "up"


async def test_a_renamed_table_is_a_gap_and_down_until_it_is_back(
    logical_pg: PgDatabase,
) -> None:
    """The publication follows a renamed table by its oid: its changes came on under the new
    name, which no room has, and were skipped while the connector showed `up`."""
    db = logical_pg
    async with following_orders(db) as (feed, client):
        connector = feed.hub.connectors["main"]
        await db.conn.execute("ALTER TABLE orders RENAME TO orders_old")
        await db.conn.execute("INSERT INTO orders_old VALUES (2, 'under another name')")
        gap = await client.next_gap()
        assert gap["reason"] == "table public.orders no longer exists (renamed or dropped)"
        await wait_until(lambda: "does not exist" in (connector.status.detail or ""), WAIT, "down")
        await db.conn.execute("ALTER TABLE orders_old RENAME TO orders")
        await wait_until(lambda: connector.status.state.value == "up", WAIT, "up again")
        await db.conn.execute("INSERT INTO orders VALUES (3, 'a')")
        async with asyncio.timeout(WAIT):
            while (await client.next_change())["key"] != 3:
                pass
