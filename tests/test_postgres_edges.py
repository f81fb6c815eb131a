"""Edge cases of a real user's schema, found by probing both capture modes (docs/connectors/
postgres.md): what a client gets when a table is dropped and made again, and the like.

Needs wal_level = logical for the logical-mode tests (the suite's embedded server has it).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from feed.core.change import Change, Gap
from feed.errors import ConfigError, SourceMisconfigured
from tests.postgres_helpers import WAIT, make_connector, streaming
from tests.support import postgres as pg_support
from tests.support.postgres import PgDatabase
from tests.support.server import feed_client, running_feed
from tests.support.waiting import wait_until

pg_server = pg_support.pg_server
pg = pg_support.pg
logical_pg = pg_support.logical_pg

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]


def logical(db: PgDatabase, **extra: Any) -> Any:
    return make_connector(db.url, ["public.items"], mode="logical", poll_interval=0.02, **extra)


CREATE = "CREATE TABLE public.items (id int PRIMARY KEY, note text)"


async def test_a_table_dropped_and_made_again_while_stopped_is_a_gap_in_logical_mode(
    logical_pg: PgDatabase,
) -> None:
    """The publication loses a dropped table; the start puts the new one back, but what was
    written to it before that was never decoded. Notify mode says so (the table's oid changed);
    logical mode used to start reading without a word, row 2 missing for good."""
    db = logical_pg
    await db.conn.execute(CREATE)
    async with streaming(logical(db)) as stream:
        await db.conn.execute("INSERT INTO items VALUES (1, 'a')")
        assert [c.key for c in await stream.take(1)] == [1]
    await db.conn.execute("DROP TABLE items")
    await db.conn.execute(CREATE)
    await db.conn.execute("INSERT INTO items VALUES (2, 'written before the feed came back')")
    async with streaming(logical(db)) as stream:
        first = await asyncio.wait_for(stream.queue.get(), WAIT)
        assert isinstance(first, Gap), first
        assert first.target == "public.items" and "not in publication" in first.reason, first
        await db.conn.execute("INSERT INTO items VALUES (3, 'a')")
        got = await stream.take(1)
        assert isinstance(got[0], Change) and got[0].key == 3
        stream.assert_idle()


async def test_a_clean_restart_with_the_table_unchanged_has_no_gap(
    logical_pg: PgDatabase,
) -> None:
    db = logical_pg
    await db.conn.execute(CREATE)
    async with streaming(logical(db)) as stream:
        await db.conn.execute("INSERT INTO items VALUES (1, 'a')")
        await stream.take(1)
    async with streaming(logical(db)) as stream:
        await db.conn.execute("INSERT INTO items VALUES (2, 'a')")
        got = await asyncio.wait_for(stream.queue.get(), WAIT)
        assert isinstance(got, Change) and got.key == 2, got
        stream.assert_idle()


async def test_a_table_dropped_and_made_again_under_a_running_feed_is_a_gap_once_back(
    logical_pg: PgDatabase,
) -> None:
    """Through `feed serve`'s app and a Socket.IO client: the drop is a gap (the capture
    check), and so is the table's return, since rows written to the new table before the
    feed put it in the publication never arrive (here: made and written in one transaction)."""
    db = logical_pg
    await db.conn.execute(CREATE)
    config = f"""
[[connectors]]
name = "main"
type = "postgres"
mode = "logical"
dsn = "{db.url}"
tables = ["public.items"]
poll_interval = 0.02
capture_check_interval = 0.3
reconnect_max = 0.5
"""
    async with running_feed(config) as feed, feed_client(feed.url) as client:
        connector = feed.hub.connectors["main"]
        await wait_until(lambda: connector.status.state.value == "up", WAIT, "the slot read")
        assert (await client.subscribe("main:public.items"))["ok"]
        await db.conn.execute("INSERT INTO items VALUES (1, 'a')")
        assert (await client.next_change())["key"] == 1
        await db.conn.execute("DROP TABLE items")
        gone = await client.next_gap()
        assert "no longer exists" in gone["reason"], gone
        async with db.conn.transaction():
            await db.conn.execute(CREATE)
            await db.conn.execute("INSERT INTO items VALUES (2, 'never decoded')")
        back = await client.next_gap(timeout=WAIT * 2)
        assert back["room"] == "main:public.items" and "not in publication" in back["reason"]
        await wait_until(lambda: connector.status.state.value == "up", WAIT, "reading again")
        await db.conn.execute("INSERT INTO items VALUES (3, 'a')")
        assert (await client.next_change())["key"] == 3


@pytest.mark.parametrize("mode", ["notify", "logical"])
async def test_a_gap_names_a_column_whose_name_has_a_space_whole(pg: PgDatabase, mode: str) -> None:
    """`"N n"` changing type was reported as `N is now n text (was n integer)`: the column
    list split each `name type` at its first space."""
    if mode == "logical" and await pg.server.wal_level() != "logical":
        pytest.skip("the server's wal_level is not logical")
    await pg.conn.execute('CREATE SCHEMA "Sales"')
    await pg.conn.execute('CREATE TABLE "Sales"."Orders" ("order id" int PRIMARY KEY, "N n" int)')
    connector = make_connector(
        pg.url, ["Sales.Orders"], mode=mode, poll_interval=0.02, capture_check_interval=0.1
    )
    async with streaming(connector) as stream:
        await pg.conn.execute('INSERT INTO "Sales"."Orders" VALUES (1, 2)')
        assert [c.key for c in await stream.take(1)] == [1]
        await pg.conn.execute('ALTER TABLE "Sales"."Orders" ALTER COLUMN "N n" TYPE text')
        gap = await asyncio.wait_for(stream.queue.get(), WAIT)
        assert isinstance(gap, Gap) and gap.target == "Sales.Orders", gap
        assert '("N n" is now text (was integer))' in gap.reason, gap.reason
        await pg.conn.execute('ALTER TABLE "Sales"."Orders" ADD COLUMN "new ""q"" col" int')
        gap = await asyncio.wait_for(stream.queue.get(), WAIT)
        assert isinstance(gap, Gap) and '(added "new ""q"" col" integer)' in gap.reason, gap


async def test_an_update_without_its_toasted_values_is_a_gap_not_nulls(
    logical_pg: PgDatabase,
) -> None:
    """With a replica identity other than FULL (set by hand under a running feed, before its
    check sets FULL back), pgoutput sends an unchanged TOASTed column as "unchanged", without
    its value. The change went out with `big: null`, a value the row never had; the check's
    gap came seconds later. Now the change is a gap for the table in its place, at once."""
    db = logical_pg
    await db.conn.execute("CREATE TABLE public.items (id int PRIMARY KEY, big text, n int)")
    big = "SELECT string_agg(md5(g::text), '') FROM generate_series(1, 5000) g"  # 160 kB
    await db.conn.execute(f"INSERT INTO items VALUES (1, ({big}), 1), (3, ({big}), 1)")
    async with streaming(logical(db, capture_check_interval=60.0)) as stream:
        await db.conn.execute("INSERT INTO items VALUES (2, 'small', 1)")
        assert [c.key for c in await stream.take(1)] == [2]
        await db.conn.execute("ALTER TABLE items REPLICA IDENTITY DEFAULT")
        # big unchanged, TOASTed: two rows in one statement, one gap (one reload) for both
        await db.conn.execute("UPDATE items SET n = 2 WHERE id IN (1, 3)")
        await db.conn.execute("UPDATE items SET n = 2 WHERE id = 2")  # nothing TOASTed
        first = await asyncio.wait_for(stream.queue.get(), WAIT)
        assert isinstance(first, Gap), first
        assert first.target == "public.items" and "big" in first.reason, first.reason
        second = await asyncio.wait_for(stream.queue.get(), WAIT)
        assert isinstance(second, Change) and second.key == 2, second
        assert second.after == {"id": 2, "big": "small", "n": 2}
        await db.conn.execute("ALTER TABLE items REPLICA IDENTITY FULL")
        await db.conn.execute("UPDATE items SET n = 3 WHERE id = 1")  # FULL: the old row has it
        third = await asyncio.wait_for(stream.queue.get(), WAIT)
        assert isinstance(third, Change) and third.after is not None, third
        assert len(third.after["big"]) == 160000 and third.after["n"] == 3


@pytest.mark.parametrize("extra", ["", ", span interval"], ids=["read-directly", "rebuilt"])
async def test_an_old_row_without_full_identity_has_no_made_up_nulls(
    logical_pg: PgDatabase, extra: str
) -> None:
    """With a replica identity other than FULL (set by hand under a running feed, before its
    check sets FULL back with a gap; or on a table the feed's role does not own), pgoutput sends
    no old row for an update that keeps the key, and only the key's values for one that changes
    it and for a delete, the other columns as NULL. Those went out as `before: {"id": 2, "s":
    null, "n": null}`, values the row never had (notify mode sends the row as it was). Now
    `before` holds what came: the key's columns, or nothing."""
    db = logical_pg
    await db.conn.execute(f"CREATE TABLE public.items (id int PRIMARY KEY, s text, n int{extra})")
    await db.conn.execute(
        "INSERT INTO items (id, s, n) VALUES (1, 'a', 1), (2, 'b', 2), (3, 'c', 3)"
    )
    async with streaming(logical(db, capture_check_interval=60.0)) as stream:
        await db.conn.execute("INSERT INTO items (id, s, n) VALUES (5, 'e', 5)")
        assert [c.key for c in await stream.take(1)] == [5]  # reading: set up, FULL set
        await db.conn.execute("ALTER TABLE items REPLICA IDENTITY DEFAULT")
        await db.conn.execute("UPDATE items SET s = 'x' WHERE id = 1")
        await db.conn.execute("UPDATE items SET id = 4 WHERE id = 2")
        await db.conn.execute("DELETE FROM items WHERE id IN (1, 3)")
        got = await stream.take(4)
    assert [(c.op, c.key, c.before) for c in got] == [
        ("update", 1, None),
        ("update", 4, {"id": 2}),
        ("delete", 1, {"id": 1}),
        ("delete", 3, {"id": 3}),
    ]
    assert got[1].after is not None and got[1].after["s"] == "b"


@pytest.fixture
async def twophase_pg() -> AsyncIterator[PgDatabase]:
    """A private embedded server that allows prepared transactions (off by default)."""
    async with pg_support.private_database(max_prepared_transactions="4") as db:
        yield db


@pytest.mark.parametrize("mode", ["notify", "logical"])
async def test_a_prepared_transaction_is_delivered_at_commit_prepared(
    twophase_pg: PgDatabase, mode: str
) -> None:
    """Two-phase commit through `feed serve`'s app and a client. Notify mode's trigger
    notified on every write, and Postgres refuses to PREPARE a transaction that notified: every
    prepared transaction writing a watched table failed. With `SET LOCAL dbfeed.notify = off`
    it prepares, and its change arrives once committed (at the reader's next poll); a prepared
    transaction rolled back never arrives. Logical mode needs nothing."""
    db = twophase_pg
    if mode == "logical" and await db.server.wal_level() != "logical":
        pytest.skip("the server's wal_level is not logical")
    await db.conn.execute(CREATE)
    config = f"""
[[connectors]]
name = "main"
type = "postgres"
mode = "{mode}"
dsn = "{db.url}"
tables = ["public.items"]
auto_migrate = true
poll_interval = 0.02
heartbeat_interval = 0.3
"""
    async with running_feed(config) as feed, feed_client(feed.url) as client:
        connector = feed.hub.connectors["main"]
        await wait_until(lambda: connector.status.state.value == "up", WAIT, "reading")
        assert (await client.subscribe("main:public.items"))["ok"]
        await db.conn.execute(
            "BEGIN; SET LOCAL dbfeed.notify = off; INSERT INTO items VALUES (1, 'prepared');"
            " PREPARE TRANSACTION 'pgedge_one'"
        )
        await db.conn.execute(
            "BEGIN; SET LOCAL dbfeed.notify = off; INSERT INTO items VALUES (2, 'rolled back');"
            " PREPARE TRANSACTION 'pgedge_two'"
        )
        await db.conn.execute("ROLLBACK PREPARED 'pgedge_two'")
        with pytest.raises(TimeoutError):  # prepared, not committed: nothing yet
            await client.next_change(timeout=1.0)
        await db.conn.execute("COMMIT PREPARED 'pgedge_one'")
        got = await client.next_change()
        assert (got["op"], got["key"], got["after"]) == (
            "insert",
            1,
            {"id": 1, "note": "prepared"},
        )
        await db.conn.execute("INSERT INTO items VALUES (3, 'plain')")  # notifies as before
        assert (await client.next_change())["key"] == 3


@pytest.mark.parametrize(
    ("name", "extra", "said"),
    [
        ("a" * 60, {}, "(made from the name)"),
        ("main", {"slot": "My-Slot"}, "'My-Slot' is not"),
    ],
)
def test_a_slot_name_postgres_refuses_is_a_config_error(
    name: str, extra: dict[str, str], said: str
) -> None:
    """A 60-character connector name made a 65-character slot: the first start failed with
    a bare `identifier too long`, naming no setting."""
    with pytest.raises(ConfigError) as caught:
        make_connector("postgresql://u@h/db", ["public.t"], name=name, mode="logical", **extra)
    assert caught.value.key == f"connectors.{name}.slot" and said in str(caught.value)
    make_connector("postgresql://u@h/db", ["public.t"], name="a" * 60)  # notify: no slot


@pytest.mark.parametrize("mode", ["notify", "logical"])
async def test_a_view_in_tables_is_refused_naming_the_tables_it_reads(
    pg: PgDatabase, mode: str
) -> None:
    """A table and a view of the same name in two schemas, and the view configured: `feed
    check` sent the user to `feed migrate`, which failed with Postgres's `"orders" is a view`."""
    if mode == "logical" and await pg.server.wal_level() != "logical":
        pytest.skip("the server's wal_level is not logical")
    await pg.conn.execute(
        "CREATE SCHEMA reports; CREATE TABLE public.orders (id int PRIMARY KEY, v text);"
        " CREATE VIEW reports.orders AS SELECT id, upper(v) AS v FROM public.orders"
    )
    connector = make_connector(pg.url, ["reports.orders"], mode=mode)
    said = "reports.orders is a view, not a table"
    with pytest.raises(SourceMisconfigured, match=said) as caught:
        await connector.check()
    assert "watch the tables it reads (public.orders) instead" in str(caught.value)
    with pytest.raises(SourceMisconfigured, match=said):
        await connector.migrate()
    with pytest.raises(SourceMisconfigured, match=said):
        await make_connector(pg.url, ["reports.orders"], mode=mode).start()


async def test_a_table_swapped_out_no_longer_sends_its_writes_as_the_watched_tables(
    pg: PgDatabase,
) -> None:
    """Notify mode, a blue/green table swap: `orders` renamed to `orders_old`, `orders_new` to
    `orders`. The new table is attached with a gap; the old one kept its triggers, so its writes
    went on arriving as changes of public.orders, rows that table never held."""
    await pg.conn.execute(
        "CREATE TABLE orders (id int PRIMARY KEY, v text); CREATE TABLE orders_new (LIKE orders INCLUDING ALL)"
    )
    connector = make_connector(pg.url, ["public.orders"], capture_check_interval=0.1)
    async with streaming(connector) as stream:
        await pg.conn.execute("INSERT INTO orders VALUES (1, 'a')")
        assert [c.key for c in await stream.take(1)] == [1]
        await pg.conn.execute(
            "BEGIN; ALTER TABLE orders RENAME TO orders_old;"
            " ALTER TABLE orders_new RENAME TO orders; COMMIT"
        )
        async with asyncio.timeout(WAIT):  # the check notices the new table (a gap)
            while not isinstance(item := await stream.queue.get(), Gap):
                assert isinstance(item, Change)
        assert "dropped and re-created" in item.reason, item
        await pg.conn.execute("INSERT INTO orders_old VALUES (98, 'the old table')")
        await pg.conn.execute("INSERT INTO orders VALUES (2, 'the new table')")
        got = await stream.take(1)
        assert [(c.key, c.after) for c in got] == [(2, {"id": 2, "v": "the new table"})]
        await pg.conn.execute("UPDATE orders_old SET v = 'still old' WHERE id = 1")
        await pg.conn.execute("INSERT INTO orders VALUES (3, 'new')")
        assert [c.key for c in await stream.take(1)] == [3]
    triggers = await pg.conn.fetchval(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'orders_old'::regclass"
        " AND NOT tgisinternal"
    )
    assert triggers == 0
