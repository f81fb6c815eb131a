"""The Postgres connector (notify mode) against a real server: capture, order, types, snapshots."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import uuid
from decimal import Decimal
from typing import Any

import orjson
import pytest

from connectors.base import RoomAddress
from connectors.postgres import PostgresConnector
from feed.core.change import Change, Gap, room_key, to_json
from feed.core.filters import parse_filter
from feed.errors import (
    ConfigError,
    ProtocolError,
    SnapshotNotSupported,
    SourceMisconfigured,
    SourceUnavailable,
)
from feed.options import Options
from tests.postgres_helpers import WAIT, feed_role, make_connector, streaming
from tests.support import postgres as pg_support
from tests.support.postgres import PgDatabase

pg_server = pg_support.pg_server
pg = pg_support.pg

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(90)]


async def orders(db: PgDatabase) -> None:
    await db.conn.execute(
        "CREATE TABLE public.orders (id int PRIMARY KEY, status text, amount numeric(10,2))"
    )


async def test_insert_update_delete_truncate_in_order(pg: PgDatabase) -> None:
    await orders(pg)
    async with streaming(make_connector(pg.url, ["public.orders"])) as stream:
        await pg.conn.execute("INSERT INTO orders VALUES (1, 'new', 10.50)")
        await pg.conn.execute("UPDATE orders SET status = 'paid' WHERE id = 1")
        await pg.conn.execute("DELETE FROM orders WHERE id = 1")
        await pg.conn.execute("INSERT INTO orders VALUES (2, 'new', 1)")
        await pg.conn.execute("TRUNCATE orders")
        got = await stream.take(5)
    assert [c.op for c in got] == ["insert", "update", "delete", "insert", "truncate"]
    insert, update, delete, _, truncate = got
    assert insert.key == 1 and insert.before is None
    assert insert.after == {"id": 1, "status": "new", "amount": Decimal("10.50")}
    assert update.before == {"id": 1, "status": "new", "amount": Decimal("10.50")}
    assert update.after is not None and update.after["status"] == "paid"
    assert delete.after is None and delete.before is not None and delete.key == 1
    assert truncate.key is None and truncate.before is None and truncate.after is None
    assert all(c.source == "postgres" and c.target == "public.orders" for c in got)
    assert all(c.connector == "main" and c.id.startswith("main:") for c in got)
    assert len({c.id for c in got}) == 5
    assert all(isinstance(c.ts, dt.datetime) and c.ts.tzinfo is not None for c in got)


async def test_changes_committed_while_stopped_are_delivered_after_restart(pg: PgDatabase) -> None:
    await orders(pg)
    connector = make_connector(pg.url, ["public.orders"])
    async with streaming(connector) as stream:
        await pg.conn.execute("INSERT INTO orders VALUES (1, 'a', 1)")
        first = await stream.next()
    for i in range(2, 6):
        await pg.conn.execute("INSERT INTO orders VALUES ($1, 'b', 1)", i)
    async with streaming(make_connector(pg.url, ["public.orders"])) as stream:
        got = await stream.take(4)
        await pg.conn.execute("INSERT INTO orders VALUES (6, 'c', 1)")
        got.append(await stream.next())
        assert stream.queue.empty()
    assert [c.key for c in got] == [2, 3, 4, 5, 6]
    assert first.id not in {c.id for c in got}


async def test_overlapping_transactions_committing_out_of_order(pg: PgDatabase) -> None:
    """T1 writes first (smaller journal id) but commits after T2: both delivered, T2 first."""
    await orders(pg)
    t1 = await pg.connect()
    t2 = await pg.connect()
    try:
        async with streaming(make_connector(pg.url, ["public.orders"])) as stream:
            await t1.execute("BEGIN")
            await t1.execute("INSERT INTO orders VALUES (1, 't1', 1)")
            await t2.execute("BEGIN")
            await t2.execute("INSERT INTO orders VALUES (2, 't2', 1)")
            await t2.execute("COMMIT")
            second = await stream.next()
            assert second.key == 2
            # A reader taking "id > last delivered" would now skip row 1 for ever.
            await pg.conn.execute("INSERT INTO orders VALUES (3, 'after', 1)")
            third = await stream.next()
            assert third.key == 3
            await t1.execute("COMMIT")
            first = await stream.next()
            assert first.key == 1
            assert first.position[1] < second.position[1]  # (transaction, journal row)
            # A change waits in replay buffers with its position: ints in a tuple, which the
            # garbage collector stops tracking once it has seen them (a class would not be).
            gc.collect()
            assert not gc.is_tracked(first.position) and not gc.is_tracked(second.position)
    finally:
        await t1.close()
        await t2.close()


async def test_same_row_written_by_two_transactions_keeps_row_order(pg: PgDatabase) -> None:
    """T1 (older xid) updates a row after T2 committed its update: T2's change comes first."""
    await orders(pg)
    await pg.conn.execute("INSERT INTO orders VALUES (1, 'start', 1), (9, 'other', 1)")
    t1 = await pg.connect()
    t2 = await pg.connect()
    try:
        async with streaming(make_connector(pg.url, ["public.orders"])) as stream:
            await t1.execute("BEGIN")
            await t1.execute("UPDATE orders SET status = 't1-first-write' WHERE id = 9")
            await t2.execute("BEGIN")
            await t2.execute("UPDATE orders SET status = 't2' WHERE id = 1")
            await t2.execute("COMMIT")
            await t1.execute("UPDATE orders SET status = 't1' WHERE id = 1")
            await t1.execute("COMMIT")
            got = await stream.take(3)
    finally:
        await t1.close()
        await t2.close()
    row1 = [c.after["status"] for c in got if c.key == 1 and c.after]
    assert row1 == ["t2", "t1"]


async def test_rolled_back_writes_are_not_delivered(pg: PgDatabase) -> None:
    await orders(pg)
    async with streaming(make_connector(pg.url, ["public.orders"])) as stream:
        async with pg.conn.transaction():
            await pg.conn.execute("INSERT INTO orders VALUES (1, 'kept', 1)")
        with pytest.raises(RuntimeError):
            async with pg.conn.transaction():
                await pg.conn.execute("INSERT INTO orders VALUES (2, 'rolled back', 1)")
                raise RuntimeError("roll back")
        await pg.conn.execute("INSERT INTO orders VALUES (3, 'kept', 1)")
        got = await stream.take(2)
    assert [c.key for c in got] == [1, 3]


async def test_savepoint_rolled_back_inside_a_committed_transaction(pg: PgDatabase) -> None:
    await orders(pg)
    async with streaming(make_connector(pg.url, ["public.orders"])) as stream:
        async with pg.conn.transaction():
            await pg.conn.execute("INSERT INTO orders VALUES (1, 'kept', 1)")
            await pg.conn.execute("SAVEPOINT s")
            await pg.conn.execute("INSERT INTO orders VALUES (2, 'undone', 1)")
            await pg.conn.execute("ROLLBACK TO SAVEPOINT s")
            await pg.conn.execute("INSERT INTO orders VALUES (3, 'kept', 1)")
        got = await stream.take(2)
        await pg.conn.execute("INSERT INTO orders VALUES (4, 'later', 1)")
        got += await stream.take(1)
        stream.assert_idle()
    assert [c.key for c in got] == [1, 3, 4]


@pytest.mark.parametrize("size", [7_990, 8_100, 100_000, 1_000_000])
async def test_big_rows_are_written_and_delivered_whole(pg: PgDatabase, size: int) -> None:
    await pg.conn.execute("CREATE TABLE public.docs (id int PRIMARY KEY, body text)")
    body = ("0123456789abcdef" * (size // 16 + 1))[:size]
    async with streaming(make_connector(pg.url, ["public.docs"])) as stream:
        await pg.conn.execute("INSERT INTO docs VALUES (1, $1)", body)
        await pg.conn.execute("UPDATE docs SET body = body || 'x' WHERE id = 1")
        insert, update = await stream.take(2)
    assert insert.after == {"id": 1, "body": body}
    assert update.before == {"id": 1, "body": body}
    assert update.after == {"id": 1, "body": body + "x"}


async def test_types_round_trip(pg: PgDatabase) -> None:
    await pg.conn.execute("CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')")
    await pg.conn.execute(
        """CREATE TABLE public.kinds (
            id uuid PRIMARY KEY, n numeric, big numeric, f float8, fnan float8, i8 bigint,
            at timestamptz, local timestamp, day date, doc jsonb, tags text[], nums int[],
            blob bytea, feeling mood, nothing text, yes boolean, moods mood[],
            ats timestamptz[], ns numeric[], ids uuid[])"""
    )
    row_id = uuid.UUID("12345678-1234-5678-1234-567812345678")
    at = dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)
    values: dict[str, Any] = {
        "id": row_id,
        "n": Decimal("12345.678900"),
        "big": Decimal("123456789012345678901234567890.123456789"),
        "f": 1.5,
        "fnan": float("inf"),
        "i8": 2**62,
        "at": at,
        "local": dt.datetime(2026, 1, 2, 3, 4, 5),
        "day": dt.date(2026, 2, 28),
        "doc": '{"a": [1, 2.5, {"b": null}], "s": "x"}',
        "tags": ["a", "b,c", 'd"e'],
        "nums": [1, 2, None],
        "blob": b"\x00\x01\xfe\xff",
        "feeling": "happy",
        "nothing": None,
        "yes": True,
        "moods": ["sad", "ok"],
        "ats": [at, None],
        "ns": [Decimal("123456789012345678901234567890.1"), Decimal("0.10")],
        "ids": [row_id],
    }
    columns = list(values)
    async with streaming(make_connector(pg.url, ["public.kinds"])) as stream:
        await pg.conn.execute(
            f"INSERT INTO kinds ({', '.join(columns)}) VALUES "
            f"({', '.join(f'${i}' for i in range(1, len(columns) + 1))})",
            *values.values(),
        )
        change = await stream.next()
        snapshot = await stream.connector.snapshot(
            RoomAddress("public.kinds"), lambda row: True, 10
        )
    after = change.after
    assert after is not None
    assert after["id"] == row_id and change.key == row_id
    assert after["n"] == Decimal("12345.678900")
    assert after["big"] == Decimal("123456789012345678901234567890.123456789")
    assert after["f"] == 1.5 and after["fnan"] == float("inf")
    assert after["i8"] == 2**62
    assert after["at"] == at
    assert after["local"] == dt.datetime(2026, 1, 2, 3, 4, 5)
    assert after["day"] == dt.date(2026, 2, 28)
    assert after["doc"] == {"a": [1, 2.5, {"b": None}], "s": "x"}
    assert after["tags"] == ["a", "b,c", 'd"e']
    assert after["nums"] == [1, 2, None]
    assert after["blob"] == b"\x00\x01\xfe\xff"
    assert after["feeling"] == "happy" and after["moods"] == ["sad", "ok"]
    assert after["nothing"] is None and after["yes"] is True
    # Arrays decode element by element, as their scalars do.
    assert after["ats"] == [at, None]
    assert after["ns"] == [Decimal("123456789012345678901234567890.1"), Decimal("0.10")]
    assert after["ids"] == [row_id]
    # The documented JSON forms, as clients receive them.
    wire = to_json(after)
    assert wire["n"] == "12345.678900"
    assert wire["big"] == "123456789012345678901234567890.123456789"
    assert wire["fnan"] == "Infinity"
    assert wire["at"] == "2026-01-02T03:04:05.678901Z"
    assert wire["id"] == str(row_id)
    assert wire["blob"] == "AAH+/w=="
    assert wire["doc"] == {"a": [1, 2.5, {"b": None}], "s": "x"}
    # A snapshot row and a live image of the same data are equal, so filters treat them alike.
    assert list(snapshot.rows) == [after]


async def test_a_writer_s_session_settings_do_not_change_the_image(pg: PgDatabase) -> None:
    """The capture trigger renders the row in the writer's session: with extra_float_digits
    at 0 a double lost its last digits, and the writer's time zone, interval style and bytea
    output showed in ranges, intervals and composites, so the live image differed from the
    snapshot row of the same data."""
    await pg.conn.execute(
        "CREATE TYPE pair AS (at timestamptz, b bytea);"
        "CREATE TABLE public.looks (id int PRIMARY KEY, d float8, iv interval, span tstzrange,"
        " p pair)"
    )
    async with streaming(make_connector(pg.url, ["public.looks"])) as stream:
        await pg.conn.execute(
            "SET extra_float_digits = 0; SET TimeZone = 'America/New_York';"
            " SET IntervalStyle = 'iso_8601'; SET DateStyle = 'SQL, DMY'; SET bytea_output = 'escape';"
            " INSERT INTO looks VALUES (1, 0.30000000000000004, '1 year 2 days 03:04:05',"
            " '[2024-01-01 00:00+00, 2024-02-01 00:00+00)', ROW('2024-06-01 12:00+00', '\\x01ff'));"
            " RESET ALL"
        )
        change = await stream.next()
        snapshot = await stream.connector.snapshot(RoomAddress("public.looks"), lambda r: True, 1)
    assert change.after is not None and change.after["d"] == 0.30000000000000004
    assert [dict(change.after)] == [dict(row) for row in snapshot.rows]


async def test_a_composite_s_fields_are_decoded_by_their_types(pg: PgDatabase) -> None:
    """A numeric in a composite came as a double (its digits lost), a bytea as `\\x..` text, a
    timestamptz in jsonb's form: each field is now decoded as a column of its type is, nested
    composites and arrays of them too, and a filter on a field compares by its type."""
    await pg.conn.execute(
        "CREATE TYPE inner_t AS (n numeric, at timestamptz);"
        "CREATE TYPE outer_t AS (n numeric, b bytea, at timestamptz, i inner_t, t text);"
        "CREATE TABLE public.things (id int PRIMARY KEY, c outer_t, cs inner_t[])"
    )
    async with streaming(make_connector(pg.url, ["public.things"])) as stream:
        await pg.conn.execute(
            "INSERT INTO things VALUES (1, ROW(123456789012345678901234567890.10, '\\xdeadbeef',"
            " '2024-06-01 12:00+02', ROW(1.50, '2024-01-01 00:00+00'), 'x'),"
            " ARRAY[ROW(2.50, NULL)::inner_t])"
        )
        change = await stream.next()
        snapshot = await stream.connector.snapshot(RoomAddress("public.things"), lambda r: True, 1)
    at = dt.datetime(2024, 6, 1, 10, tzinfo=dt.UTC)
    assert change.after == {
        "id": 1,
        "c": {
            "n": Decimal("123456789012345678901234567890.10"),
            "b": b"\xde\xad\xbe\xef",
            "at": at,
            "i": {"n": Decimal("1.50"), "at": dt.datetime(2024, 1, 1, tzinfo=dt.UTC)},
            "t": "x",
        },
        "cs": [{"n": Decimal("2.50"), "at": None}],
    }
    assert [dict(row) for row in snapshot.rows] == [change.after]
    assert list(to_json(change.after)["c"]) == ["n", "b", "at", "i", "t"]  # the type's order
    assert parse_filter("c.n=eq.123456789012345678901234567890.1").matches_image(change.after)


async def test_a_json_number_past_64_bits_arrives_as_a_double(pg: PgDatabase) -> None:
    """jsonb prints 1e200 as a 201-digit integer. Sent as such it took the slow encoder and
    reached Python clients as a number python-socketio refuses (over 100 digits): the message
    was dropped, with no reload. Like a decimal number in jsonb, it is a double now."""
    await pg.conn.execute(
        "CREATE TYPE wide AS (f float8);"
        "CREATE TABLE public.docs (id int PRIMARY KEY, jb jsonb, w wide)"
    )
    async with streaming(make_connector(pg.url, ["public.docs"])) as stream:
        await pg.conn.execute(
            """INSERT INTO docs VALUES (1, '{"x": 1e200, "y": -1e400, "z": 12}', ROW(1e300))"""
        )
        change = await stream.next()
    assert change.after is not None
    assert change.after["jb"] == {"x": 1e200, "y": float("-inf"), "z": 12}
    assert change.after["w"] == {"f": 1e300}
    assert orjson.loads(orjson.dumps(to_json(change.after)))["jb"] == {
        "x": 1e200,
        "y": "-Infinity",
        "z": 12,
    }


async def test_a_small_numeric_keeps_postgres_s_digits_on_the_wire(pg: PgDatabase) -> None:
    """Python's `str` of a Decimal writes an exponent past six zeros after the point: the
    numeric 0.00000001 reached clients as "1E-8" and 0.0000000000 as "0E-10", and named its
    row room `...:1E-8`, where Postgres (and the docs: every digit kept) say 0.00000001."""
    await pg.conn.execute(
        "CREATE TABLE public.rates (r numeric PRIMARY KEY, n numeric, ns numeric[], big numeric)"
    )
    async with streaming(make_connector(pg.url, ["public.rates"])) as stream:
        await pg.conn.execute(
            "INSERT INTO rates VALUES (0.00000001, 0.0000000000, ARRAY[1e-7, 120], 1e30)"
        )
        change = await stream.next()
    texts = await pg.conn.fetchrow("SELECT r::text, n::text, ns::text, big::text FROM rates")
    wire = orjson.loads(orjson.dumps(to_json(change.after)))
    assert wire == {
        "r": "0.00000001",
        "n": "0.0000000000",
        "ns": ["0.0000001", "120"],
        "big": "1000000000000000000000000000000",
    }
    assert [wire["r"], wire["n"], "{" + ",".join(wire["ns"]) + "}", wire["big"]] == list(texts)
    assert room_key(change.key) == "0.00000001"


async def test_composite_key_and_row_room_snapshot(pg: PgDatabase) -> None:
    await pg.conn.execute(
        "CREATE TABLE public.lines (order_id int, line int, sku text, PRIMARY KEY (order_id, line))"
    )
    await pg.conn.execute("INSERT INTO lines VALUES (7, 1, 'a'), (7, 2, 'b'), (8, 1, 'c')")
    connector = make_connector(pg.url, ["public.lines"])
    async with streaming(connector) as stream:
        await pg.conn.execute("UPDATE lines SET sku = 'bb' WHERE order_id = 7 AND line = 2")
        change = await stream.next()
        assert change.key == {"order_id": 7, "line": 2}
        assert change.row_key == "7,2"
        snap = await connector.snapshot(RoomAddress("public.lines", "7,2"), lambda r: True, 10)
    assert [dict(r) for r in snap.rows] == [{"order_id": 7, "line": 2, "sku": "bb"}]
    assert snap.covers(change)


async def test_a_char_key_s_row_room_snapshot_finds_its_row(pg: PgDatabase) -> None:
    """A `char(5)` key is `ab   ` in changes and row room names (padded, as on the wire), but
    `k::text` drops the padding: the row room's snapshot looked the key up in SQL that way and
    was always empty."""
    await pg.conn.execute("CREATE TABLE public.codes (k char(5) PRIMARY KEY, v int)")
    await pg.conn.execute("INSERT INTO codes VALUES ('ab', 1)")
    connector = make_connector(pg.url, ["public.codes"])
    async with streaming(connector) as stream:
        await pg.conn.execute("UPDATE codes SET v = 2")
        change = await stream.next()
        assert change.row_key == "ab   "
        snap = await connector.snapshot(RoomAddress("public.codes", "ab   "), lambda r: True, 10)
    assert [dict(r) for r in snap.rows] == [{"k": "ab   ", "v": 2}]


async def test_primary_key_change_reports_the_old_key(pg: PgDatabase) -> None:
    await orders(pg)
    await pg.conn.execute("INSERT INTO orders VALUES (1, 'a', 1)")
    async with streaming(make_connector(pg.url, ["public.orders"])) as stream:
        await pg.conn.execute("UPDATE orders SET id = 2 WHERE id = 1")
        change = await stream.next()
    assert change.key == 2 and change.meta == {"old_key": 1}


async def test_table_without_primary_key(pg: PgDatabase) -> None:
    await pg.conn.execute("CREATE TABLE public.events (kind text, n int)")
    connector = make_connector(pg.url, ["public.events"])
    async with streaming(connector) as stream:
        await pg.conn.execute("INSERT INTO events VALUES ('a', 1), ('a', 1)")
        await pg.conn.execute("DELETE FROM events WHERE kind = 'a'")
        got = await stream.take(4)
        assert [c.op for c in got] == ["insert", "insert", "delete", "delete"]
        assert all(c.key is None and c.row_key is None for c in got)
        assert got[2].before == {"kind": "a", "n": 1}
        snap = await connector.snapshot(RoomAddress("public.events"), lambda r: True, 10)
        assert list(snap.rows) == []
        with pytest.raises(SnapshotNotSupported):
            await connector.snapshot(RoomAddress("public.events", "x"), lambda r: True, 10)


async def test_keys_give_a_table_without_a_primary_key_its_rows(pg: PgDatabase) -> None:
    """`keys` names the columns that identify a row where the table has no primary key: its
    changes carry that key (and `meta.old_key` when it changes), and row rooms work."""
    await pg.conn.execute(
        "CREATE TABLE public.events (source text NOT NULL, n int NOT NULL, kind text, "
        "UNIQUE (source, n))"
    )
    await pg.conn.execute("INSERT INTO events VALUES ('a', 1, 'x'), ('b', 2, 'y')")
    connector = make_connector(pg.url, ["public.events"], keys={"public.events": ["source", "n"]})
    async with streaming(connector) as stream:
        await pg.conn.execute("UPDATE events SET kind = 'z' WHERE source = 'a'")
        await pg.conn.execute("UPDATE events SET n = 3 WHERE source = 'b'")
        await pg.conn.execute("DELETE FROM events WHERE source = 'a'")
        update, moved, delete = await stream.take(3)
        row = await connector.snapshot(RoomAddress("public.events", "b,3"), lambda r: True, 10)
    assert (update.key, update.row_key) == ({"source": "a", "n": 1}, "a,1")
    assert moved.row_key == "b,3" and moved.meta == {"old_key": {"source": "b", "n": 2}}
    assert delete.row_key == "a,1" and delete.before == {"source": "a", "n": 1, "kind": "z"}
    assert row.rows == [{"source": "b", "n": 3, "kind": "y"}] and row.keys == ["b,3"]
    wrong = make_connector(pg.url, ["public.events"], keys={"public.events": "id"})
    with pytest.raises(SourceMisconfigured) as info:
        await wrong.start()
    assert str(info.value).endswith(
        "keys: public.events has no column 'id' (its columns: source, n, kind); fix keys"
    )
    await wrong.stop()


async def test_a_column_of_a_new_type_is_decoded_by_it(pg: PgDatabase) -> None:
    """`ALTER COLUMN ... TYPE` keeps the column's name, so no image showed it: changes kept
    the old type's decoding, and filters were checked against it, until a restart. The
    capture check notices the new type and reads the table's shape again."""
    await orders(pg)
    connector = make_connector(pg.url, ["public.orders"], capture_check_interval=0.1)
    placed = parse_filter("amount=gt.2024-01-01T00:00:00Z")
    async with streaming(connector) as stream:
        await pg.conn.execute("INSERT INTO orders VALUES (1, 'a', 1)")
        await stream.take(1)
        with pytest.raises(ProtocolError, match="is numeric"):
            connector.check_filter("public.orders", placed)
        await pg.conn.execute(
            "ALTER TABLE orders ALTER COLUMN amount TYPE timestamptz"
            " USING '2024-06-01 00:00+00'::timestamptz + amount * interval '1 day'"
        )
        async with asyncio.timeout(WAIT):
            while True:
                with contextlib.suppress(ProtocolError):
                    connector.check_filter("public.orders", placed)
                    break
                await asyncio.sleep(0.05)
        gap = await stream.gap()  # every row's amount changed, unseen: clients reload
        await pg.conn.execute("UPDATE orders SET status = 'b'")
        change = (await stream.take(1))[0]
    assert "amount is now timestamp with time zone (was numeric)" in gap.reason
    assert change.after is not None
    assert change.after["amount"] == dt.datetime(2024, 6, 2, tzinfo=dt.UTC)


async def test_alter_table_add_and_drop_column(pg: PgDatabase) -> None:
    await orders(pg)
    async with streaming(make_connector(pg.url, ["public.orders"])) as stream:
        await pg.conn.execute("INSERT INTO orders VALUES (1, 'a', 1)")
        await pg.conn.execute("ALTER TABLE orders ADD COLUMN placed timestamptz")
        await pg.conn.execute("INSERT INTO orders VALUES (2, 'b', 2, '2026-03-04T05:06:07Z')")
        await pg.conn.execute("ALTER TABLE orders DROP COLUMN status")
        await pg.conn.execute("UPDATE orders SET amount = 3 WHERE id = 2")
        got = await stream.take(3)
    assert got[0].after == {"id": 1, "status": "a", "amount": Decimal("1.00")}
    assert got[1].after is not None
    assert got[1].after["placed"] == dt.datetime(2026, 3, 4, 5, 6, 7, tzinfo=dt.UTC)
    assert got[2].before == {
        "id": 2,
        "amount": Decimal("2.00"),
        "placed": dt.datetime(2026, 3, 4, 5, 6, 7, tzinfo=dt.UTC),
    }
    assert got[2].after is not None and got[2].after["amount"] == Decimal("3.00")


async def test_images_and_snapshot_rows_keep_the_tables_column_order(pg: PgDatabase) -> None:
    """Rows are captured as jsonb, which orders keys shortest first; a client that lays rows out
    by their keys (the dashboard, a table view) gets them in the table's order."""
    await pg.conn.execute(
        "CREATE TABLE public.orders (order_id int PRIMARY KEY, zone text, customer_name text,"
        " n int, placed_at timestamptz)"
    )
    columns = ["order_id", "zone", "customer_name", "n", "placed_at"]
    connector = make_connector(pg.url, ["public.orders"])
    async with streaming(connector) as stream:
        await pg.conn.execute("INSERT INTO orders VALUES (1, 'eu', 'Ada', 2, now())")
        await pg.conn.execute("UPDATE orders SET n = 3 WHERE order_id = 1")
        insert, update = await stream.take(2)
        snap = await connector.snapshot(RoomAddress("public.orders"), lambda row: True, 10)
    assert insert.after is not None and list(insert.after) == columns
    assert update.before is not None and list(update.before) == columns
    assert update.after is not None and list(update.after) == columns
    assert [list(row) for row in snap.rows] == [columns]


async def test_snapshot_is_consistent_with_the_stream(pg: PgDatabase) -> None:
    await orders(pg)
    await pg.conn.execute("INSERT INTO orders SELECT g, 'old', g FROM generate_series(1, 5) g")
    connector = make_connector(pg.url, ["public.orders"])
    async with streaming(connector) as stream:
        await pg.conn.execute("UPDATE orders SET status = 'paid' WHERE id = 2")
        before_snapshot = await stream.next()
        open_tx = await pg.connect()
        try:
            await open_tx.execute("BEGIN")
            await open_tx.execute("INSERT INTO orders VALUES (6, 'paid', 6)")
            snap = await connector.snapshot(
                RoomAddress("public.orders"), lambda row: row["status"] == "paid", 100
            )
            await open_tx.execute("COMMIT")
        finally:
            await open_tx.close()
        after_snapshot = await stream.next()
    assert [r["id"] for r in snap.rows] == [2]
    assert snap.covers(before_snapshot)
    assert not snap.covers(after_snapshot)  # committed after: the hub replays it
    assert not snap.truncated


async def test_snapshot_limit_marks_truncation(pg: PgDatabase) -> None:
    await orders(pg)
    await pg.conn.execute("INSERT INTO orders SELECT g, 'x', g FROM generate_series(1, 20) g")
    connector = make_connector(pg.url, ["public.orders"])
    async with streaming(connector):
        snap = await connector.snapshot(RoomAddress("public.orders"), lambda r: True, 5)
        one = await connector.snapshot(RoomAddress("public.orders", "7"), lambda r: True, 5)
    assert len(snap.rows) == 5 and snap.truncated
    assert [r["id"] for r in one.rows] == [7]


async def test_delivered_rows_are_pruned(pg: PgDatabase) -> None:
    await orders(pg)
    connector = make_connector(
        pg.url, ["public.orders"], journal_retention=0.0, prune_interval=0.05
    )
    async with streaming(connector) as stream:
        for i in range(10):
            await pg.conn.execute("INSERT INTO orders VALUES ($1, 'x', 1)", i)
        await stream.take(10)
        async with asyncio.timeout(WAIT):
            while await pg.conn.fetchval("SELECT count(*) FROM feed.journal"):  # noqa: ASYNC110
                await asyncio.sleep(0.05)


async def test_only_configured_tables_are_delivered(pg: PgDatabase) -> None:
    await orders(pg)
    await pg.conn.execute("CREATE TABLE public.other (id int PRIMARY KEY)")
    other = make_connector(pg.url, ["public.other"], name="other")
    async with streaming(other):
        pass  # attaches capture to public.other for a second connector
    async with streaming(make_connector(pg.url, ["public.orders"])) as stream:
        await pg.conn.execute("INSERT INTO other VALUES (1)")
        await pg.conn.execute("INSERT INTO orders VALUES (1, 'x', 1)")
        change = await stream.next()
    assert change.target == "public.orders"


# -- configuration and bad input -----------------------------------------------------------------


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"connectors.main.tables: 'orders' must be schema.table"):
        make_connector("postgresql://x/y", ["orders"])
    with pytest.raises(ConfigError, match=r"connectors.main.dsn: is required"):
        PostgresConnector("main", Options({"tables": ["public.a"]}, "connectors.main"))
    with pytest.raises(ConfigError, match=r"connectors.main.mode: must be one of"):
        make_connector("postgresql://x/y", ["public.a"], mode="wal")
    with pytest.raises(ConfigError, match=r"connectors.main.tabels: is not a known setting"):
        make_connector("postgresql://x/y", ["public.a"], tabels=[])
    with pytest.raises(ConfigError, match=r"connectors.main.keys.public.b: 'public.b' is not in"):
        make_connector("postgresql://x/y", ["public.a"], keys={"public.b": "id"})
    with pytest.raises(ConfigError, match=r"connectors.main.keys.public.a: names a column twice"):
        make_connector("postgresql://x/y", ["public.a"], keys={"public.a": ["id", "id"]})


async def test_missing_table_is_one_clear_line(pg: PgDatabase) -> None:
    connector = make_connector(pg.url, ["public.nope"])
    with pytest.raises(SourceMisconfigured) as info:
        await connector.start()
    assert str(info.value).endswith("table public.nope does not exist")
    assert "\n" not in str(info.value)
    await connector.stop()


async def test_unreachable_dsn_is_one_clear_line() -> None:
    connector = make_connector("postgresql://postgres@127.0.0.1:1/db", ["public.a"])
    with pytest.raises(SourceUnavailable) as info:
        await connector.start()
    assert "cannot connect" in str(info.value) and "127.0.0.1:1/db" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(SourceUnavailable):
        await connector.check()


async def test_missing_privileges_are_one_clear_line(pg: PgDatabase) -> None:
    await orders(pg)
    role = f"feed_weak_{uuid.uuid4().hex[:8]}"
    await pg.conn.execute(f"CREATE ROLE {role} LOGIN")
    try:
        weak_url = pg.url.replace("postgresql://postgres@", f"postgresql://{role}@")
        await make_connector(pg.url, ["public.orders"]).migrate()
        connector = make_connector(weak_url, ["public.orders"], auto_migrate=False)
        with pytest.raises(SourceMisconfigured) as info:
            await connector.start()
        assert f"permission denied: GRANT USAGE ON SCHEMA feed TO {role}" in str(info.value)
        await pg.conn.execute(f"GRANT USAGE ON SCHEMA feed TO {role}")
        with pytest.raises(SourceMisconfigured) as info:
            await connector.start()
        assert f"permission denied: GRANT SELECT ON feed.migrations TO {role}" in str(info.value)
        await pg.conn.execute(
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA feed TO {role}"
        )
        with pytest.raises(SourceMisconfigured) as info:
            await connector.start()
        assert f"permission denied: GRANT SELECT ON public.orders TO {role}" in str(info.value)
        await pg.conn.execute(f"GRANT SELECT ON orders TO {role}")
        await pg.conn.execute("CREATE TABLE public.fresh (id int PRIMARY KEY)")
        await pg.conn.execute(f"GRANT SELECT ON fresh TO {role}")
        connector = make_connector(weak_url, ["public.fresh"], auto_migrate=False)
        with pytest.raises(SourceMisconfigured) as info:
            await connector.start()
        assert "permission denied to attach capture to public.fresh" in str(info.value)
    finally:
        await pg.conn.execute(f"DROP OWNED BY {role}")
        await pg.conn.execute(f"DROP ROLE {role}")


async def test_unmigrated_schema_says_to_run_feed_migrate(pg: PgDatabase) -> None:
    await orders(pg)
    connector = make_connector(pg.url, ["public.orders"], auto_migrate=False)
    with pytest.raises(SourceMisconfigured, match="run `feed migrate"):
        await connector.start()
    with pytest.raises(SourceMisconfigured, match=r"4 migration\(s\) pending .*run `feed migrate"):
        await connector.check()
    # With auto_migrate the server applies them at start: check says so and passes.
    auto = make_connector(pg.url, ["public.orders"], auto_migrate=True)
    assert "pending, applied at start (auto_migrate)" in await auto.check()


# -- migrations, watching and unwatching ---------------------------------------------------------


async def test_migrate_twice_is_a_no_op_and_prune_detaches_unconfigured_tables(
    pg: PgDatabase,
) -> None:
    await orders(pg)
    await pg.conn.execute("CREATE TABLE public.customers (id int PRIMARY KEY)")
    both = make_connector(pg.url, ["public.orders", "public.customers"])
    first = await both.migrate()
    assert first == [
        "applied 0001_journal.sql",
        "applied 0002_partition_truncate.sql",
        "applied 0003_capture_settings.sql",
        "applied 0004_prepared_transactions.sql",
        "watching public.orders",
        "watching public.customers",
    ]
    second = await both.migrate()
    assert second == ["schema 'feed' is up to date (4 migrations applied)"]
    triggers = "SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::regclass AND NOT tgisinternal"
    assert await pg.conn.fetchval(triggers, "public.customers") == 2
    only_orders = make_connector(pg.url, ["public.orders"])
    third = await only_orders.migrate()
    assert third[-1].startswith("public.customers is still watched but not in this config's")
    assert await pg.conn.fetchval(triggers, "public.customers") == 2
    fourth = await only_orders.migrate(prune=True)
    assert fourth[-1] == "unwatched public.customers (capture triggers dropped)"
    assert await pg.conn.fetchval(triggers, "public.customers") == 0
    assert await pg.conn.fetchval(triggers, "public.orders") == 2
    assert "Postgres" in await only_orders.check()


async def test_unwatch_drops_triggers_and_position(pg: PgDatabase) -> None:
    await orders(pg)
    connector = make_connector(pg.url, ["public.orders"])
    await connector.migrate()
    lines = await connector.unwatch()
    assert lines == [
        "unwatched public.orders (capture triggers dropped)",
        "forgot the position of 'main'",
    ]
    assert await pg.conn.fetchval("SELECT count(*) FROM feed.consumers") == 0
    await pg.conn.execute("INSERT INTO orders VALUES (1, 'a', 1)")  # no trigger: no journal row
    assert await pg.conn.fetchval("SELECT count(*) FROM feed.journal") == 0


async def test_unwatch_again_says_there_is_nothing_to_unwatch(pg: PgDatabase) -> None:
    """A second `feed unwatch` claimed again that it "forgot the position" it had forgotten."""
    await orders(pg)
    connector = make_connector(pg.url, ["public.orders"])
    await connector.migrate()
    await connector.unwatch()
    assert await connector.unwatch() == ["nothing to unwatch"]


async def test_failed_migration_rolls_back_and_names_the_file(
    pg: PgDatabase, tmp_path: Any
) -> None:
    from connectors.postgres_migrate import MigrationError, apply_migrations, load_migrations

    (tmp_path / "0001_ok.sql").write_text("CREATE TABLE {{schema}}.one (id int);")
    (tmp_path / "0002_bad.sql").write_text(
        "CREATE TABLE {{schema}}.two (id int); SELECT * FROM {{schema}}.missing;"
    )
    migrations = load_migrations(tmp_path)
    with pytest.raises(MigrationError, match=r"migration 0002_bad.sql failed and was rolled back"):
        await apply_migrations(pg.conn, "custom", migrations)
    assert await pg.conn.fetchval("SELECT to_regclass('custom.one')") is not None
    assert await pg.conn.fetchval("SELECT to_regclass('custom.two')") is None
    applied = await pg.conn.fetch("SELECT name FROM custom.migrations")
    assert [r["name"] for r in applied] == ["0001_ok.sql"]


async def test_unwatch_keeps_triggers_another_connector_needs(pg: PgDatabase) -> None:
    await orders(pg)
    await make_connector(pg.url, ["public.orders"], name="a").migrate()
    await make_connector(pg.url, ["public.orders"], name="b").migrate()
    a_lines = await make_connector(pg.url, ["public.orders"], name="a").unwatch(["public.orders"])
    assert a_lines == ["stopped watching public.orders (still watched by another connector)"]
    async with streaming(make_connector(pg.url, ["public.orders"], name="b")) as stream:
        await pg.conn.execute("INSERT INTO orders VALUES (1, 'a', 1)")
        assert (await stream.next()).key == 1
    b_lines = await make_connector(pg.url, ["public.orders"], name="b").unwatch(["public.orders"])
    assert b_lines == ["unwatched public.orders (capture triggers dropped)"]


async def test_a_table_added_to_the_config_is_picked_up_on_the_next_start(
    pg: PgDatabase,
) -> None:
    await orders(pg)
    await pg.conn.execute("CREATE TABLE public.customers (id int PRIMARY KEY, name text)")
    async with streaming(make_connector(pg.url, ["public.orders"])) as stream:
        await pg.conn.execute("INSERT INTO orders VALUES (1, 'a', 1)")
        assert (await stream.next()).target == "public.orders"
    both = make_connector(pg.url, ["public.orders", "public.customers"])
    async with streaming(both) as stream:
        await pg.conn.execute("INSERT INTO customers VALUES (1, 'Ann')")
        await pg.conn.execute("INSERT INTO orders VALUES (2, 'a', 1)")
        got = await stream.take(2)
    assert [(c.target, c.key) for c in got] == [("public.customers", 1), ("public.orders", 2)]


async def test_virtual_generated_columns_have_their_values(pg: PgDatabase) -> None:
    """Postgres 18's virtual generated columns are NULL in a trigger's NEW and OLD; a snapshot
    has their values. Images now have them too (computed by the reader), so a filter on one
    matches live changes and client rows keep them."""
    if int(await pg.conn.fetchval("SHOW server_version_num")) < 180000:
        pytest.skip("virtual generated columns need Postgres 18")
    await pg.conn.execute(
        """CREATE TABLE public.v (id int PRIMARY KEY, qty int,
           twice int GENERATED ALWAYS AS (qty * 2) VIRTUAL,
           stored int GENERATED ALWAYS AS (qty + 1) STORED)"""
    )
    connector = make_connector(pg.url, ["public.v"], capture_check_interval=0.2)
    async with streaming(connector) as stream:
        await pg.conn.execute("INSERT INTO v (id, qty) VALUES (1, 2)")
        await pg.conn.execute("UPDATE v SET qty = 4 WHERE id = 1")
        await pg.conn.execute("DELETE FROM v")
        insert, update, delete = await stream.take(3)
        await pg.conn.execute("INSERT INTO v (id, qty) VALUES (2, 5)")
        await stream.next()
        snapshot = await connector.snapshot(RoomAddress("public.v"), lambda r: True, 10)
        # One added while the feed runs: computed from the next capture check on.
        await pg.conn.execute(
            "ALTER TABLE v ADD COLUMN thrice int GENERATED ALWAYS AS (qty * 3) VIRTUAL"
        )
        gaps = []
        async with asyncio.timeout(WAIT):
            for row in range(3, 1000):  # a write per try: the check has no event of its own
                await pg.conn.execute("INSERT INTO v (id, qty) VALUES ($1, 1)", row)
                item = await stream.queue.get()
                while isinstance(item, Gap):  # the new column: rows without it are stale
                    gaps.append(item)
                    item = await stream.queue.get()
                assert isinstance(item, Change), item
                if item.after == {"id": row, "qty": 1, "twice": 2, "stored": 2, "thrice": 3}:
                    break
            else:
                raise AssertionError("no change with the new column's value")
            while not gaps:  # the check that decodes the column also announces it
                item = await stream.queue.get()
                if isinstance(item, Gap):
                    gaps.append(item)
        assert "the columns of public.v changed (added thrice integer)" in gaps[0].reason
    assert insert.after == {"id": 1, "qty": 2, "twice": 4, "stored": 3}
    assert update.before == insert.after
    assert update.after == {"id": 1, "qty": 4, "twice": 8, "stored": 5}
    assert delete.before == update.after
    assert snapshot.rows == [{"id": 2, "qty": 5, "twice": 10, "stored": 6}]


async def test_columns_named_like_the_connectors_own_aliases(pg: PgDatabase) -> None:
    """The connector's queries name a table `t` and rows `u`, `g`, `r`, `n`: a table with
    columns of those names still has its snapshots (a bare `to_jsonb(t)` was the column `t`,
    and every snapshot failed) and, on Postgres 18, its virtual columns computed (a bare
    `ORDER BY n` was ambiguous, and every change failed the reader)."""
    virtual = int(await pg.conn.fetchval("SHOW server_version_num")) >= 180000
    extra = ", twice int GENERATED ALWAYS AS (n * 2) VIRTUAL" if virtual else ""
    await pg.conn.execute(
        f"CREATE TABLE public.odd (id int PRIMARY KEY, t text, u int, g int, r int, n int{extra})"
    )
    await pg.conn.execute("INSERT INTO odd (id, t, u, g, r, n) VALUES (1, 'a', 2, 3, 4, 5)")
    connector = make_connector(pg.url, ["public.odd"])
    row = {"id": 1, "t": "a", "u": 2, "g": 3, "r": 4, "n": 5} | ({"twice": 10} if virtual else {})
    async with streaming(connector) as stream:
        snapshot = await connector.snapshot(RoomAddress("public.odd"), lambda r: True, 10)
        keyed = await connector.snapshot(RoomAddress("public.odd", "1"), lambda r: True, 10)
        await pg.conn.execute("UPDATE odd SET n = 6 WHERE id = 1")
        update = await stream.next()
    assert snapshot.rows == [row] and keyed.rows == [row]
    assert update.before == row
    assert update.after == row | {"n": 6} | ({"twice": 12} if virtual else {})


async def test_row_level_security_over_the_feed_is_a_warning(
    pg: PgDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    """A table whose policies apply to the feed's role: its snapshots would hold only the rows
    the policies let it read, while changes carry every row. `feed check` and the start say so
    (the snapshot itself is as the database allows)."""
    import logging

    await orders(pg)
    await pg.conn.execute("INSERT INTO orders VALUES (1, 'mine', 1), (2, 'theirs', 2)")
    await make_connector(pg.url, ["public.orders"]).migrate()
    grants = """GRANT SELECT ON orders TO {role};
        ALTER TABLE orders ENABLE ROW LEVEL SECURITY;
        CREATE POLICY only_mine ON orders FOR SELECT TO {role} USING (status = 'mine');"""
    async with feed_role(pg.conn, pg.url, grants) as (role, url):
        owner_line = await make_connector(pg.url, ["public.orders"]).check()
        assert "row level security" not in owner_line  # the owner bypasses its policies
        connector = make_connector(url, ["public.orders"], auto_migrate=False)
        line = await connector.check()
        assert f"row level security applies to {role} on public.orders" in line, line
        assert f"ALTER ROLE {role} BYPASSRLS" in line
        caplog.set_level(logging.WARNING, logger="feed.connectors.postgres")
        async with streaming(connector):
            assert any("row level security" in r.getMessage() for r in caplog.records)
            snapshot = await connector.snapshot(RoomAddress("public.orders"), lambda r: True, 10)
        assert [row["id"] for row in snapshot.rows] == [1]  # what its policies let it read


async def test_inheritance_children_are_a_warning(pg: PgDatabase) -> None:
    """Legacy inheritance (not partitioning): a child's rows read as the parent's in a
    snapshot, but a trigger or publication of the parent does not see writes to the child."""
    await pg.conn.execute(
        """CREATE TABLE public.log (id int, note text);
           CREATE TABLE public.log_2024 () INHERITS (public.log);"""
    )
    line = await make_connector(pg.url, ["public.log"]).check()
    assert "public.log has inheritance children (log_2024)" in line, line
    assert "watch them as tables of their own" in line
