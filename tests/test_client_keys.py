"""dbfeed_client's `rows` on tables not keyed by `id`: the server sends each snapshot row's key.

`rows` maps a row key, as in row room names, to the current row. Only the server knows which
columns make a table's key, so subscribe acks carry `snapshot_keys` and `snapshot` chunk events
`keys` (docs/protocol.md, "Snapshots"). These tests follow a table keyed by `sku`, one with a
composite key (order_id, line), both on the in-memory connector, a real Postgres table with a
composite primary key of other types, and the same on a cluster node that does not read the
connector (its snapshot comes from the reader over Redis).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import pytest
from dbfeed_client import FeedClient

from tests.support import postgres as pg_support
from tests.support.client_harness import ClusterHarness, Harness, harness, rows_of, snapshot_chunks
from tests.support.postgres import PgDatabase
from tests.support.server import running_feed
from tests.support.waiting import wait_until
from tests.test_client_python import Log

pg_server = pg_support.pg_server
pg = pg_support.pg

PRODUCTS = ("skus", "public.products")
LINES = ("lines", "public.lines")


def client(url: str | list[str], **options: Any) -> FeedClient:
    return FeedClient(url, reconnection_delay=0.1, reconnection_delay_max=1.0, **options)


def product(sku: str, price: int) -> dict[str, Any]:
    return {"sku": sku, "name": f"product {sku}", "price": price}


def one_change(log: Log) -> bool:
    return len(log.changes) == 1


def line(order_id: int, number: int, qty: int) -> dict[str, Any]:
    return {"order_id": order_id, "line": number, "qty": qty}


@pytest.fixture
async def feed_server() -> AsyncIterator[Harness]:
    async with harness() as h:
        yield h


async def test_rows_of_a_table_keyed_by_another_column_follow_every_change(
    feed_server: Harness,
) -> None:
    connector, target = PRODUCTS
    for i in range(1, 6):
        feed_server.write(target, "insert", product(f"A-{i}", i), connector)
    async with (
        client(feed_server.url) as feed,
        feed.subscribe(f"{connector}:{target}", snapshot=True) as sub,
    ):
        log = Log(sub)
        assert sub.rows == feed_server.rows(target, connector)
        assert set(sub.rows) == {f"A-{i}" for i in range(1, 6)}  # the sku, as in row rooms
        feed_server.write(target, "insert", product("B-1", 10), connector)
        feed_server.write(target, "update", {"sku": "A-2", "price": 99}, connector)
        feed_server.write(target, "delete", {"sku": "A-3"}, connector)
        await log.until(lambda: len(log.changes) == 3, "insert, update, delete")
        assert sub.rows == feed_server.rows(target, connector)
        assert sub.rows["A-2"]["price"] == 99 and "A-3" not in sub.rows and "B-1" in sub.rows


async def test_rows_of_a_composite_key_follow_every_change_through_a_chunked_snapshot() -> None:
    connector, target = LINES
    async with harness("[server]\nreplay_buffer = 5000\nsnapshot_chunk_bytes = 1024\n") as h:
        for order_id in range(1, 21):
            for number in (1, 2):
                h.write(target, "insert", line(order_id, number, order_id * number), connector)
        await h.delivered(connector)
        async with client(h.url) as feed:
            chunks = snapshot_chunks(feed)
            async with feed.subscribe(f"{connector}:{target}", snapshot=True) as sub:
                log = Log(sub)
                assert sub.rows is not None, "a snapshot subscription keeps the rows"
                assert chunks, "the server sent the snapshot in chunks"
                assert all(len(c["keys"]) == len(c["rows"]) for c in chunks)
                assert sub.rows == h.rows(target, connector)
                assert len(sub.rows) == 40 and sub.rows["7,2"] == line(7, 2, 14)
                h.write(target, "insert", line(21, 1, 5), connector)
                h.write(target, "update", {"order_id": 7, "line": 2, "qty": 0}, connector)
                h.write(target, "delete", {"order_id": 3, "line": 1}, connector)
                await log.until(lambda: len(log.changes) == 3, "insert, update, delete")
                assert sub.rows == h.rows(target, connector)
                assert sub.rows["7,2"]["qty"] == 0 and "3,1" not in sub.rows
                assert sub.rows["21,1"] == line(21, 1, 5)


async def test_a_row_room_of_a_composite_key_has_that_one_row(feed_server: Harness) -> None:
    connector, target = LINES
    feed_server.write(target, "insert", line(7, 2, 1), connector)
    feed_server.write(target, "insert", line(7, 3, 1), connector)
    async with (
        client(feed_server.url) as feed,
        feed.subscribe(f"{connector}:{target}:7,2", snapshot=True) as sub,
    ):
        log = Log(sub)
        assert sub.rows == {"7,2": line(7, 2, 1)}
        feed_server.write(target, "delete", {"order_id": 7, "line": 2}, connector)
        await log.until(lambda: len(log.changes) == 1, "the delete")
        assert sub.rows == {}


async def stock_table(pg: PgDatabase) -> str:
    """A table keyed by (text, date, int) with two rows, and a feed config watching it."""
    await pg.conn.execute(
        "CREATE TABLE public.stock (warehouse text, day date, item int, qty int, "
        "PRIMARY KEY (warehouse, day, item))"
    )
    await pg.conn.execute(
        "INSERT INTO stock VALUES ('north', '2026-01-01', 1, 5), ('south', '2026-01-02', 2, 7)"
    )
    return (
        '[server]\nreplay_buffer = 100\n\n[[connectors]]\nname = "main"\n'
        f'type = "postgres"\ndsn = "{pg.url}"\ntables = ["public.stock"]\n'
        "auto_migrate = true\nheartbeat_interval = 0.5\nreconnect_max = 0.5\n"
    )


@pytest.mark.postgres
@pytest.mark.timeout(90)
async def test_postgres_composite_primary_key_of_text_and_date_keeps_rows_right(
    pg: PgDatabase,
) -> None:
    config = await stock_table(pg)
    async with running_feed(config) as server:
        connector = server.hub.connectors["main"]
        await wait_until(lambda: connector.status.state.value == "up", 15, "postgres up")
        async with (
            client(server.url) as feed,
            feed.subscribe("main:public.stock", snapshot=True) as sub,
        ):
            log = Log(sub)
            assert sub.rows is not None
            assert set(sub.rows) == {"north,2026-01-01,1", "south,2026-01-02,2"}
            await pg.conn.execute("INSERT INTO stock VALUES ('east', '2026-01-03', 3, 1)")
            await pg.conn.execute("UPDATE stock SET qty = 0 WHERE warehouse = 'north'")
            await pg.conn.execute("DELETE FROM stock WHERE warehouse = 'south'")
            await log.until(lambda: len(log.changes) == 3, "insert, update, delete")
            assert set(sub.rows) == {"north,2026-01-01,1", "east,2026-01-03,3"}
            assert sub.rows["north,2026-01-01,1"]["qty"] == 0
            # The key is the one row rooms use: a row room of it has the same row.
            async with feed.subscribe(
                "main:public.stock:east,2026-01-03,3", snapshot=True
            ) as row_sub:
                assert row_sub.rows == {"east,2026-01-03,3": sub.rows["east,2026-01-03,3"]}


@pytest.mark.postgres
@pytest.mark.timeout(90)
async def test_an_update_of_a_postgres_primary_key_moves_the_row_in_every_room(
    pg: PgDatabase,
) -> None:
    """The row's old key leaves `rows` everywhere: the table's, a filter room's, and the old
    key's row room, which is told the row left it (before, it heard nothing at all)."""
    config = await stock_table(pg)
    old, new = "north,2026-01-01,1", "north,2026-03-01,1"
    async with running_feed(config) as server:
        connector = server.hub.connectors["main"]
        await wait_until(lambda: connector.status.state.value == "up", 15, "postgres up")
        async with (
            client(server.url) as feed,
            feed.subscribe("main:public.stock", snapshot=True) as every,
            feed.subscribe("main:public.stock", filter="qty=gt.0", snapshot=True) as stocked,
            feed.subscribe(f"main:public.stock:{old}", snapshot=True) as row,
            feed.subscribe(f"main:public.stock:{new}", snapshot=True) as moved_in,
        ):
            logs = [Log(sub) for sub in (every, stocked, row, moved_in)]
            assert row.rows is not None and set(row.rows) == {old}
            assert moved_in.rows == {}
            await pg.conn.execute("UPDATE stock SET day = '2026-03-01' WHERE warehouse = 'north'")
            for log in logs:
                await log.until(partial(one_change, log), "the key's update")
            rows = {
                f"{r['warehouse']},{r['day']},{r['item']}": dict(r)
                for r in await pg.conn.fetch("SELECT * FROM stock")
            }
            assert every.rows is not None and set(every.rows) == set(rows) == {
                new,
                "south,2026-01-02,2",
            }
            assert stocked.rows is not None and set(stocked.rows) == set(rows)
            assert row.rows == {}
            assert logs[2].changes[0]["left"] is True
            assert logs[2].changes[0]["meta"] == {
                "old_key": {"warehouse": "north", "day": "2026-01-01", "item": 1}
            }
            assert moved_in.rows is not None and set(moved_in.rows) == {new}
            assert moved_in.rows[new]["day"] == "2026-03-01"


@pytest.mark.postgres
@pytest.mark.timeout(90)
async def test_a_bigint_key_past_2_53_reaches_the_python_client_exactly(pg: PgDatabase) -> None:
    """Snowflake-sized ids are Python ints from the wire to `rows`: nothing goes through a
    float (9007199254740993 as a double is 9007199254740992, another row's id). The JavaScript
    library's side of this is clients/js/test/bignum.test.mjs."""
    odd, even = 9007199254740993, 9007199254740992
    await pg.conn.execute("CREATE TABLE public.t (id bigint PRIMARY KEY, n numeric, note text)")
    await pg.conn.execute(
        f"INSERT INTO t VALUES ({odd}, 12345678901234567890.5, 'odd'), ({even}, 1.5, 'even')"
    )
    config = (
        '[server]\nreplay_buffer = 100\n\n[[connectors]]\nname = "main"\n'
        f'type = "postgres"\ndsn = "{pg.url}"\ntables = ["public.t"]\nauto_migrate = true\n'
    )
    async with running_feed(config) as server:
        connector = server.hub.connectors["main"]
        await wait_until(lambda: connector.status.state.value == "up", 15, "postgres up")
        async with (
            client(server.url) as feed,
            feed.subscribe("main:public.t", snapshot=True) as table,
            feed.subscribe(f"main:public.t:{odd}", snapshot=True) as row,
            feed.subscribe("main:public.t", filter=f"id=eq.{odd}", snapshot=True) as matched,
        ):
            logs = [Log(sub) for sub in (table, row, matched)]
            assert table.rows is not None and set(table.rows) == {str(odd), str(even)}
            assert row.rows is not None and set(row.rows) == {str(odd)}
            assert matched.rows == row.rows
            await pg.conn.execute(f"UPDATE t SET note = 'changed' WHERE id = {odd}")
            for log in logs:
                await log.until(partial(one_change, log), "the update")
            change = logs[0].changes[0]
            assert change["key"] == odd and type(change["key"]) is int
            assert change["after"]["id"] == odd
            assert table.rows[str(odd)]["note"] == "changed"
            assert table.rows[str(even)]["note"] == "even"
            assert table.rows[str(odd)]["n"] == "12345678901234567890.5"
            assert row.rows[str(odd)]["note"] == "changed"


@pytest.mark.redis
async def test_on_a_cluster_node_that_does_not_read_the_connector_rows_use_its_keys() -> None:
    connector, target = LINES
    cluster = ClusterHarness()
    try:
        await cluster.start("snapshot_chunk_bytes = 1024\n")
        reader = await cluster.reader(connector)
        for order_id in range(1, 6):
            for number in range(1, 9):  # enough rows for a snapshot in several chunks
                reader.write(target, "insert", line(order_id, number, number))
        url = await cluster.follower(connector)
        async with client(url) as feed:
            chunks = snapshot_chunks(feed)
            async with feed.subscribe(f"{connector}:{target}", snapshot=True) as sub:
                log = Log(sub)
                assert chunks and all(len(c["keys"]) == len(c["rows"]) for c in chunks)
                assert sub.rows == rows_of(reader, target)
                assert len(sub.rows) == 40 and sub.rows["5,3"] == line(5, 3, 3)
                reader.write(target, "insert", line(6, 1, 1))
                reader.write(target, "update", {"order_id": 5, "line": 2, "qty": 20})
                reader.write(target, "delete", {"order_id": 5, "line": 3})
                await log.until(lambda: len(log.changes) == 3, "insert, update, delete")
                assert sub.rows == rows_of(reader, target)
                assert sub.rows["5,2"]["qty"] == 20 and "5,3" not in sub.rows
    finally:
        await cluster.stop()
