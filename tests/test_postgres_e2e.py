"""End to end: a feed server with a Postgres connector, Socket.IO clients, SQL writes."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import urllib.error
import urllib.request

import pytest

from connectors.memory import MemoryConnector
from tests.support import postgres as pg_support
from tests.support.postgres import PgDatabase
from tests.support.server import feed_client, running_feed
from tests.support.waiting import wait_until

pg_server = pg_support.pg_server
pg = pg_support.pg

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(90)]


def config(dsn: str, tables: str = '["public.orders"]', extra: str = "") -> str:
    return f"""
[server]
replay_buffer = 100

[[connectors]]
name = "main"
type = "postgres"
dsn = "{dsn}"
tables = {tables}
auto_migrate = true
heartbeat_interval = 0.5
reconnect_max = 0.5
{extra}

[[connectors]]
name = "mem"
type = "memory"
targets = ["public.things"]
"""


async def http_get(url: str) -> tuple[int, dict[str, object]]:
    def fetch() -> tuple[int, dict[str, object]]:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    return await asyncio.to_thread(fetch)


async def orders(db: PgDatabase) -> None:
    await db.conn.execute(
        "CREATE TABLE public.orders (id int PRIMARY KEY, status text, amount numeric(10,2))"
    )


async def test_sql_writes_arrive_as_change_events(pg: PgDatabase) -> None:
    await orders(pg)
    async with running_feed(config(pg.url)) as feed:
        connector = feed.hub.connectors["main"]
        await wait_until(lambda: connector.status.state.value == "up", 15, "postgres up")
        async with feed_client(feed.url) as client, feed_client(feed.url) as row_client:
            ack = await client.subscribe("main:public.orders")
            assert ack["ok"], ack
            assert (await row_client.subscribe("main:public.orders:2"))["ok"]
            await pg.conn.execute("INSERT INTO orders VALUES (1, 'new', 12.50), (2, 'new', 1)")
            await pg.conn.execute("UPDATE orders SET status = 'paid' WHERE id = 1")
            await pg.conn.execute("DELETE FROM orders WHERE id = 2")
            got = await client.take(4)
            row = await row_client.take(2)
    assert [(c["op"], c["key"]) for c in got] == [
        ("insert", 1),
        ("insert", 2),
        ("update", 1),
        ("delete", 2),
    ]
    assert [c["seq"] for c in got] == [1, 2, 3, 4]
    assert got[0]["after"] == {"id": 1, "status": "new", "amount": "12.50"}
    assert got[2]["before"]["status"] == "new" and got[2]["after"]["status"] == "paid"
    assert all(c["source"] == "postgres" and c["room"] == "main:public.orders" for c in got)
    assert all(c["id"].startswith("main:") and c["ts"].endswith("Z") for c in got)
    assert [(c["op"], c["room"]) for c in row] == [
        ("insert", "main:public.orders:2"),
        ("delete", "main:public.orders:2"),
    ]


async def test_snapshot_with_filter_then_live(pg: PgDatabase) -> None:
    await orders(pg)
    await pg.conn.execute(
        "INSERT INTO orders VALUES (1, 'paid', 150), (2, 'new', 500), (3, 'paid', 50)"
    )
    async with running_feed(config(pg.url)) as feed:
        connector = feed.hub.connectors["main"]
        await wait_until(lambda: connector.status.state.value == "up", 15, "postgres up")
        async with feed_client(feed.url) as client:
            ack = await client.subscribe(
                "main:public.orders", filter="status=eq.paid&amount=gt.100", snapshot=True
            )
            assert ack["ok"], ack
            assert ack["snapshot"] == [{"id": 1, "status": "paid", "amount": "150.00"}]
            await pg.conn.execute("UPDATE orders SET status = 'paid' WHERE id = 2")
            await pg.conn.execute("UPDATE orders SET amount = 10 WHERE id = 1")  # stops matching
            joined, left = await client.take(2)
    assert joined["key"] == 2 and joined["after"]["status"] == "paid"
    assert left["key"] == 1 and left["after"]["amount"] == "10.00"


async def test_missing_table_shows_down_and_other_connectors_keep_serving(
    pg: PgDatabase,
) -> None:
    async with running_feed(config(pg.url, '["public.nope"]')) as feed:
        connector = feed.hub.connectors["main"]
        await wait_until(lambda: connector.status.state.value == "down", 15, "postgres down")
        assert connector.status.detail.endswith("table public.nope does not exist")
        status, body = await http_get(feed.url + "/readyz")
        assert status == 503 and body["ready"] is False
        async with feed_client(feed.url) as client:
            assert (await client.subscribe("mem:public.things"))["ok"]
            mem = feed.hub.connectors["mem"]
            assert isinstance(mem, MemoryConnector)
            mem.write("public.things", "insert", {"id": 1})
            assert (await client.next_change())["key"] == 1
        # Creating the table is enough: the hub retries and the connector comes up.
        await pg.conn.execute("CREATE TABLE public.nope (id int PRIMARY KEY)")
        await wait_until(lambda: connector.status.state.value == "up", 30, "postgres up")


async def test_unreachable_server_shows_down_and_retries(pg: PgDatabase) -> None:
    unreachable = "postgresql://postgres@127.0.0.1:1/nothing"
    async with running_feed(config(unreachable)) as feed:
        connector = feed.hub.connectors["main"]
        await wait_until(lambda: connector.status.state.value == "down", 15, "postgres down")
        assert "cannot connect" in connector.status.detail
        assert "\n" not in connector.status.detail
        status, body = await http_get(feed.url + "/readyz")
        assert status == 503 and body["ready"] is False
        async with feed_client(feed.url) as client:
            assert (await client.subscribe("mem:public.things"))["ok"]
            mem = feed.hub.connectors["mem"]
            assert isinstance(mem, MemoryConnector)
            mem.write("public.things", "insert", {"id": 1})
            assert (await client.next_change())["key"] == 1


async def test_a_source_that_is_down_is_logged_once_per_retry(
    pg: PgDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    unreachable = "postgresql://postgres@127.0.0.1:1/nothing"

    def about_main() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "feed.hub" and "main" in r.getMessage()]

    with caplog.at_level(logging.INFO, logger="feed.hub"):
        async with running_feed(config(unreachable)):
            await wait_until(
                lambda: sum("cannot connect" in r.getMessage() for r in about_main()) >= 2,
                30,
                "two failed attempts",
            )
    lines = [(r.levelname, r.getMessage().split(" connecting")[0]) for r in about_main()]
    failures = [r for r in about_main() if "cannot connect" in r.getMessage()]
    # Each attempt: one INFO line when it starts, one WARNING line when it fails; never the
    # same failure twice (it used to be a WARNING and an INFO line).
    assert all(r.levelname == "WARNING" for r in failures), lines
    kinds = ["fail" if "cannot connect" in r.getMessage() else "start" for r in about_main()]
    assert "fail" in kinds
    assert all(a != b for a, b in itertools.pairwise(kinds)), lines


async def test_filters_that_can_never_match_are_refused_naming_column_and_type(
    pg: PgDatabase,
) -> None:
    await pg.conn.execute(
        "CREATE TABLE public.orders (id int PRIMARY KEY, status text, amount numeric(10,2),"
        " paid bool, created_at timestamptz, meta jsonb, tags text[], raw bytea, fee money)"
    )
    async with running_feed(config(pg.url)) as feed:
        connector = feed.hub.connectors["main"]
        await wait_until(lambda: connector.status.state.value == "up", 15, "postgres up")
        async with feed_client(feed.url) as client:

            async def refused(filter_text: str) -> str:
                ack = await client.subscribe("main:public.orders", filter=filter_text)
                assert not ack["ok"] and ack["error"]["code"] == "bad_filter", ack
                return str(ack["error"]["message"])

            message = await refused("nosuchcol=eq.1")
            assert "public.orders has no column 'nosuchcol'" in message
            assert "columns: id, status, amount, paid, created_at, meta, tags, raw, fee" in message
            # Accepted before, and matched nothing, ever: a list or bytes equals no literal.
            assert "tags is _text (an array)" in await refused("tags=eq.{a,b}")
            assert "raw is bytea" in await refused("raw=eq.AP8=")
            assert "amount is numeric: 'abc' is not a number" in await refused("amount=gt.abc")
            assert "paid is bool" in await refused("paid=eq.yes")
            assert "id is int4: 'x'" in await refused("id=in.(1,x)")
            assert "with a UTC offset" in await refused("created_at=gt.2024-05-01T12:00:00")
            assert "status is text, not JSON" in await refused("status.x=eq.1")
            for good in (
                "status=eq.anything",
                "amount=gt.100&paid=eq.true",
                "id=in.(1,2)",
                "created_at=gte.2024-05-01T12:00:00Z",
                "meta.tier=eq.gold",
                "amount=eq.null",
                "tags=eq.null",
                "raw=neq.null",
                "fee=eq.$1,234.56",  # money is its text, as the row shows it
            ):
                ack = await client.subscribe("main:public.orders", filter=good)
                assert ack["ok"], (good, ack)


async def test_an_integer_column_refuses_equality_with_a_fraction(pg: PgDatabase) -> None:
    """`qty=eq.1.5` on an int column was accepted and then matched nothing, ever (as NaN and
    Infinity did): refused now, like any literal not of the column's type. An ordering with a
    fraction means something (`qty=lt.1.5`), and `eq.2.0` equals 2: both are kept."""
    await pg.conn.execute("CREATE TABLE public.orders (id int PRIMARY KEY, qty int8)")
    async with running_feed(config(pg.url)) as feed:
        connector = feed.hub.connectors["main"]
        await wait_until(lambda: connector.status.state.value == "up", 15, "postgres up")
        async with feed_client(feed.url) as client:
            for bad in ("qty=eq.1.5", "qty=in.(1,2.5)", "id=eq.NaN", "id=in.(Infinity)"):
                ack = await client.subscribe("main:public.orders", filter=bad)
                assert not ack["ok"] and ack["error"]["code"] == "bad_filter", (bad, ack)
                assert "is not a whole number" in ack["error"]["message"], ack
            for good in ("qty=lt.1.5", "qty=neq.1.5", "id=eq.2.0&qty=in.(1e2,3)"):
                ack = await client.subscribe("main:public.orders", filter=good)
                assert ack["ok"], (good, ack)
            room = ack["room"]
            await pg.conn.execute("INSERT INTO public.orders VALUES (2, 100)")
            change = await client.next_change()
    assert change["room"] == room and change["key"] == 2


async def test_equality_with_nan_is_refused_on_number_columns(pg: PgDatabase) -> None:
    """`x=eq.NaN` on a numeric or float column was accepted and matched nothing, ever, not
    even a row holding NaN (filters compare numbers as IEEE does: NaN equals nothing), and a
    snapshot read the table for nothing: refused now, as a fraction is on an integer column;
    `lt.NaN` and the like too (no value orders with NaN). `neq.NaN` keeps its meaning."""
    await pg.conn.execute(
        "CREATE TABLE public.readings (id int PRIMARY KEY, n numeric, f float8, r real)"
    )
    async with running_feed(config(pg.url, tables='["public.readings"]')) as feed:
        connector = feed.hub.connectors["main"]
        await wait_until(lambda: connector.status.state.value == "up", 15, "postgres up")
        async with feed_client(feed.url) as client:
            for bad in ("n=eq.NaN", "f=in.(1,NaN)", "r=eq.nan", "n=gt.NaN", "id=lt.NaN"):
                ack = await client.subscribe("main:public.readings", filter=bad)
                assert not ack["ok"] and ack["error"]["code"] == "bad_filter", (bad, ack)
                assert "NaN neither equals nor orders" in ack["error"]["message"], ack
            for good in ("n=neq.NaN", "f=lt.1e308", "n=eq.Infinity", "f=in.(1,-Infinity)"):
                ack = await client.subscribe("main:public.readings", filter=good)
                assert ack["ok"], (good, ack)


async def test_a_refused_filter_does_not_name_the_columns_masked_for_the_client(
    pg: PgDatabase,
) -> None:
    """The column list of a mistyped filter left out nothing: a client for whom `secret` is
    masked learnt that the table has such a column."""
    await pg.conn.execute(
        "CREATE TABLE public.orders (id int PRIMARY KEY, status text, secret text)"
    )
    masks = '\n[[auth.masks]]\nrooms = ["main:public.orders"]\nfields = ["secret"]\n'
    async with running_feed(config(pg.url) + masks) as feed:
        connector = feed.hub.connectors["main"]
        await wait_until(lambda: connector.status.state.value == "up", 15, "postgres up")
        async with feed_client(feed.url) as client:
            ack = await client.subscribe("main:public.orders", filter="nosuchcol=eq.1")
    assert ack["error"] == {
        "code": "bad_filter",
        "message": "public.orders has no column 'nosuchcol'",
    }, ack


async def test_the_canonical_filter_room_name_is_accepted_back_as_room(pg: PgDatabase) -> None:
    """Acks name a filter room `main:public.orders?...`; clients store that name and send it."""
    await orders(pg)
    async with running_feed(config(pg.url)) as feed:
        connector = feed.hub.connectors["main"]
        await wait_until(lambda: connector.status.state.value == "up", 15, "postgres up")
        async with feed_client(feed.url) as first, feed_client(feed.url) as again:
            ack = await first.subscribe("main:public.orders", filter="status=eq.paid&amount=gt.1")
            assert ack["ok"], ack
            name = ack["room"]
            assert name == "main:public.orders?amount=gt.1&status=eq.paid"
            back = await again.subscribe(name)
            assert back["ok"] and back["room"] == name, back
            same = await again.subscribe(name, filter="status=eq.paid&amount=gt.1")
            assert same["ok"] and same["room"] == name, same
            other = await again.subscribe(name, filter="status=eq.new")
            assert not other["ok"] and other["error"]["code"] == "bad_filter", other
            # A shaped room's name (`...@<profile>`) is the server's to assign, never a filter.
            shaped = await again.subscribe(name + "@0123456789abcdef")
            assert not shaped["ok"] and shaped["error"]["code"] == "bad_request", shaped
            await pg.conn.execute("INSERT INTO orders VALUES (1, 'paid', 5), (2, 'new', 5)")
            got_first, got_again = await first.take(1), await again.take(1)
        assert [c["key"] for c in got_first] == [c["key"] for c in got_again] == [1]
        assert got_again[0]["room"] == name
        assert (await http_get(f"{feed.url}/readyz"))[0] == 200


async def test_a_row_room_s_filter_name_sent_back_is_that_room(pg: PgDatabase) -> None:
    """`main:public.orders:2?status=eq.paid` is row 2's room with that filter, whoever sends
    it first: it used to resolve as a row keyed `2?status=eq.paid`, under the very name of
    the real room, and the client asking for the real room next joined one that never
    matched anything. A shaped row room's name is refused, as a shaped filter room's is."""
    await orders(pg)
    await pg.conn.execute("INSERT INTO orders VALUES (2, 'new', 5)")
    async with running_feed(config(pg.url)) as feed:
        connector = feed.hub.connectors["main"]
        await wait_until(lambda: connector.status.state.value == "up", 15, "postgres up")
        async with feed_client(feed.url) as by_name, feed_client(feed.url) as by_parts:
            name = "main:public.orders:2?status=eq.paid"
            first = await by_name.subscribe(name)
            second = await by_parts.subscribe("main:public.orders:2", filter="status=eq.paid")
            assert first["ok"] and second["ok"] and first["room"] == second["room"] == name
            shaped = await by_name.subscribe(name + "@0123456789abcdef")
            assert shaped["error"]["code"] == "bad_request", shaped
            await pg.conn.execute("UPDATE orders SET status = 'paid' WHERE id = 2")
            seen = [(await by_name.next_change())["key"], (await by_parts.next_change())["key"]]
    assert seen == [2, 2]


async def test_a_lost_reader_connection_counts_as_a_connector_restart(pg: PgDatabase) -> None:
    """The Postgres connector reconnects inside its change stream, not through the hub's
    restart, so `feed_connector_restarts_total` (and the documented alert on its rate) stayed
    at 0 however often the database dropped the feed; a Redis connector's outage counted."""
    await orders(pg)
    async with running_feed(config(pg.url)) as feed:
        connector = feed.hub.connectors["main"]
        await wait_until(lambda: connector.status.state.value == "up", 15, "postgres up")
        restarts = 'feed_connector_restarts_total{connector="main"}'
        assert f"{restarts} 0" in feed.hub.metrics.render()
        pid = await pg.conn.fetchval(
            "SELECT pid FROM pg_stat_activity"
            " WHERE application_name = 'feed:main:reader' AND datname = current_database()"
        )
        assert await pg.conn.fetchval("SELECT pg_terminate_backend($1, 5000)", pid)
        await wait_until(
            lambda: f"{restarts} 1" in feed.hub.metrics.render(), 15, "the restart counted"
        )
        await wait_until(lambda: connector.status.state.value == "up", 15, "postgres up again")
        assert 'feed_connector_restarts_total{connector="mem"} 0' in feed.hub.metrics.render()


async def test_a_row_rule_that_cannot_apply_to_a_table_refuses_the_subscribe(
    pg: PgDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    """A rule's `row_filter` naming a column a table it allows lacks (`tenant_id` on
    `customers`) put the client in a room that went `live` and never received anything: the
    operator's mistake was silent. Now the subscribe is refused (`forbidden`), the tenant is
    not told the table's columns, and the log says what to fix."""
    await pg.conn.execute("CREATE TABLE public.orders (id int PRIMARY KEY, tenant_id text)")
    await pg.conn.execute("CREATE TABLE public.customers (id int PRIMARY KEY, name text)")
    rules = '\n[[auth.rules]]\nallow = ["main:public.*"]\nrow_filter = "tenant_id=eq.acme"\n'
    tables = '["public.orders", "public.customers"]'
    async with running_feed(config(pg.url, tables=tables) + rules) as feed:
        connector = feed.hub.connectors["main"]
        await wait_until(lambda: connector.status.state.value == "up", 15, "postgres up")
        async with feed_client(feed.url) as client:
            first = await client.subscribe("main:public.orders")
            assert first["ok"], first
            with caplog.at_level(logging.WARNING, logger="feed.hub"):
                ack = await client.subscribe("main:public.customers")
    assert not ack["ok"] and ack["error"]["code"] == "forbidden", ack
    assert "public.customers" in ack["error"]["message"]
    assert "name" not in ack["error"]["message"]  # not the table's columns
    assert "public.customers has no column 'tenant_id'" in caplog.text
    assert "row_filter" in caplog.text
