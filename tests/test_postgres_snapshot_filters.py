"""A filter room's snapshot reads only what its filter may keep (connectors/postgres_filters.py).

The filter is translated into the snapshot's WHERE clause where SQL keeps every row the filter
keeps; the filter is still applied to each row read. So the rows must be exactly those a full
read of the table keeps, for every filter: checked here over many filters drawn at random (every
operator, `in` lists, nulls, literals of another type, time zones, char padding, floats), on a
real table with a column of each translated type and a few that are not.
"""

from __future__ import annotations

import random
from typing import Any
from urllib.parse import quote

import pytest

from connectors.base import RoomAddress, Where
from connectors.postgres_filters import pushdown
from feed.core.filters import RowFilter, parse_filter
from feed.errors import ProtocolError
from tests.postgres_helpers import make_connector, streaming
from tests.support import postgres as pg_support
from tests.support.postgres import PgDatabase

pg_server = pg_support.pg_server
pg = pg_support.pg

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]

TABLE = """
CREATE TABLE public.things (
    id int PRIMARY KEY, user_id bigint, small smallint, amount numeric, score float8,
    ratio float4, status text, code varchar(8), fixed char(4), flag boolean, ref uuid,
    day date, at timestamptz, naive timestamp, tags jsonb
)
"""

ROWS = """
INSERT INTO things
SELECT g,
       CASE WHEN g % 11 = 0 THEN NULL ELSE g % 5 END,
       (g % 3)::smallint - 1,
       CASE WHEN g % 13 = 0 THEN NULL WHEN g % 4 = 0 THEN 'NaN'::numeric
            ELSE (g % 6) + 0.5 * (g % 2) END,
       (g % 4) * 0.1,
       ((g % 4) * 0.1)::float4,
       CASE WHEN g % 9 = 0 THEN NULL WHEN g % 7 = 0 THEN 'null' ELSE (ARRAY['new','paid','Paid','1'])[g % 4 + 1] END,
       (ARRAY['a','b','1.0','true'])[g % 4 + 1],
       (ARRAY['ab','ab  ','x','1'])[g % 4 + 1],
       CASE WHEN g % 10 = 0 THEN NULL ELSE g % 2 = 0 END,
       CASE WHEN g % 3 = 0 THEN NULL ELSE ('00000000-0000-0000-0000-00000000000' || (g % 3))::uuid END,
       CASE WHEN g % 8 = 0 THEN 'infinity'::date ELSE DATE '2026-01-01' + (g % 3) END,
       CASE WHEN g % 12 = 0 THEN 'infinity'::timestamptz
            ELSE TIMESTAMPTZ '2026-01-01 00:00:00+00' + (g % 3) * INTERVAL '1 hour' END,
       TIMESTAMP '2026-01-01 00:00:00' + (g % 2) * INTERVAL '1 hour',
       jsonb_build_object('tier', g % 3)
FROM generate_series(1, 60) g
"""

LITERALS: dict[str, list[str]] = {
    "id": ["1", "7", "60", "61", "0", "7.0", "7.5", "1e1", "abc", "null", "-1"],
    "user_id": ["0", "1", "4", "null", "1.0", "99999999999999999999", "x", "2e0", "-0"],
    "small": ["-1", "0", "1", "0.0", "null", "2"],
    "amount": ["0", "0.5", "1", "1.5", "5.5", "NaN", "null", "1e0", "1.50", "abc"],
    "score": ["0", "0.1", "0.2", "0.30000000000000004", "0.3", "null"],
    "ratio": ["0", "0.1", "0.2", "0.3", "null"],
    "status": ["new", "paid", "Paid", "PAID", "null", "1", "1.0", "", "a\x00b"],
    "code": ["a", "b", "1.0", "1", "true", "null", "A"],
    "fixed": ["ab", "ab  ", "x", "x   ", "1", "null"],
    "flag": ["true", "false", "null", "t", "1", "TRUE"],
    "ref": [
        "00000000-0000-0000-0000-000000000001",
        "00000000-0000-0000-0000-000000000002",
        "{00000000-0000-0000-0000-000000000001}",
        "00000000000000000000000000000002",
        "null",
        "nope",
    ],
    "day": ["2026-01-01", "2026-01-02", "2026-01-03", "infinity", "null", "2026-01-01T00:00:00"],
    "at": [
        "2026-01-01T00:00:00Z",
        "2026-01-01T01:00:00+00:00",
        "2026-01-01T03:00:00+02:00",
        "2026-01-01T02:00:00",
        "infinity",
        "null",
        "2026-01-01T00:00:00.000000+00:00",
    ],
    "naive": ["2026-01-01T00:00:00", "2026-01-01T01:00:00", "2026-01-01T01:00:00Z", "null"],
    "tags.tier": ["0", "1", "2", "null"],
}
OPS = ["eq", "neq", "lt", "lte", "gt", "gte", "in"]


def random_filter(rng: random.Random) -> RowFilter:
    parts = []
    for field in rng.sample(sorted(LITERALS), rng.choice([1, 1, 2, 3])):
        op = rng.choice(OPS)
        pool = LITERALS[field]
        if op == "in":
            values = rng.sample(pool, rng.randint(1, min(4, len(pool))))
            inner = ",".join(quote(v, safe="") for v in values)
            parts.append(f"{field}=in.({inner})")
        else:
            parts.append(f"{field}={op}.{quote(rng.choice(pool), safe='')}")
    return parse_filter("&".join(parts))


def ids(rows: Any) -> list[int]:
    return sorted(row["id"] for row in rows)


async def test_a_filtered_snapshot_keeps_exactly_the_rows_a_full_read_keeps(
    pg: PgDatabase,
) -> None:
    await pg.conn.execute(TABLE)
    await pg.conn.execute(ROWS)
    connector = make_connector(pg.url, ["public.things"])
    rng = random.Random(20261206)
    fixed = [
        "user_id=eq.1",
        "user_id=in.(1,2,null)",
        "user_id=eq.null",
        "id=in.(7.5,8.5)",
        "id=gt.7.5&id=lte.10",
        "amount=eq.1.50",
        "amount=gt.5",
        "status=in.(paid,null)",
        "status=eq.null",
        "fixed=eq.ab%20%20",
        "ratio=eq.0.1",
        "at=eq.2026-01-01T03:00:00%2B02:00",
        "ref=eq.00000000-0000-0000-0000-000000000001",
        "flag=eq.true&user_id=in.(0,2,4)",
    ]
    filters = [parse_filter(text) for text in fixed] + [random_filter(rng) for _ in range(400)]
    address = RoomAddress("public.things")
    matched = 0
    async with streaming(connector):
        for row_filter in filters:
            pushed = await connector.snapshot(address, Where(row_filter), 1000)
            full = await connector.snapshot(address, row_filter.matches_image, 1000)
            assert ids(pushed.rows) == ids(full.rows), row_filter.canonical
            matched += bool(full.rows)
    assert matched > len(filters) // 4  # the filters are not all ones that match nothing


async def test_a_per_user_snapshot_is_read_through_the_tables_index(pg: PgDatabase) -> None:
    """The point of it: `user_id=eq.<id>` reads that user's rows by the index, not the table."""
    await pg.conn.execute(
        "CREATE TABLE public.orders (id bigserial PRIMARY KEY, user_id int, tenant text,"
        " amount numeric)"
    )
    await pg.conn.execute("CREATE INDEX ON orders (user_id)")
    await pg.conn.execute("CREATE INDEX ON orders (tenant)")
    await pg.conn.execute(
        "INSERT INTO orders (user_id, tenant, amount)"
        " SELECT g % 500, 't' || (g % 7), g FROM generate_series(1, 5000) g"
    )
    connector = make_connector(pg.url, ["public.orders"])
    async with streaming(connector):
        shape = connector._shapes["public.orders"]
        for text in ["user_id=eq.7", "user_id=in.(7,8)&amount=gt.100", "tenant=eq.t3"]:
            clauses, args = pushdown(shape, parse_filter(text), 1)
            sql = "SELECT to_jsonb(t)::text FROM public.orders t WHERE " + " AND ".join(clauses)
            async with pg.conn.transaction():
                await pg.conn.execute("SET LOCAL enable_seqscan = off")
                plan = "\n".join(r[0] for r in await pg.conn.fetch("EXPLAIN " + sql, *args))
            assert "Seq Scan" not in plan, (text, plan)
            snap = await connector.snapshot(
                RoomAddress("public.orders"), Where(parse_filter(text)), 100
            )
            assert snap.rows and all(parse_filter(text).matches_image(r) for r in snap.rows)
        assert len((await connector.snapshot(
            RoomAddress("public.orders"), Where(parse_filter("user_id=eq.7")), 100
        )).rows) == 10  # fmt: skip


def test_what_is_left_to_the_row_check() -> None:
    """Conditions SQL could not judge as the filter does are not translated (they still apply
    to each row): a dotted path, `neq`, floats, char(n), text ordering, enums."""
    from connectors.postgres_types import TableShape

    types = {
        "id": "int4",
        "score": "float8",
        "fixed": "bpchar",
        "status": "text",
        "mood": "mood",
        "meta": "jsonb",
    }
    shape = TableShape("public.t", {}, ("id",), types)
    for text in [
        "meta.tier=eq.1",
        "id=neq.1",
        "score=eq.0.1",
        "fixed=eq.ab",
        "status=gt.m",
        "mood=eq.happy",
        "id=eq.abc",
    ]:
        assert pushdown(shape, parse_filter(text), 1) == ([], []), text
    assert pushdown(shape, parse_filter("id=in.(1,2.5,null)&status=eq.a"), 3) == (
        ['(t."id" = ANY($3::int8[]) OR t."id" IS NULL)', 't."status" = ANY($4::text[])'],
        [[1], ["a"]],
    )
    assert pushdown(shape, parse_filter("id=eq.2.5"), 1) == (["FALSE"], [])


async def test_a_row_rooms_snapshot_with_a_filter(pg: PgDatabase) -> None:
    """The key's parameters and the filter's are numbered in one query."""
    await pg.conn.execute(
        "CREATE TABLE public.lines (order_id int, line int, qty int, PRIMARY KEY (order_id, line))"
    )
    await pg.conn.execute("INSERT INTO lines VALUES (7, 1, 1), (7, 2, 5), (8, 2, 5)")
    connector = make_connector(pg.url, ["public.lines"])
    async with streaming(connector):
        kept = await connector.snapshot(
            RoomAddress("public.lines", "7,2"), Where(parse_filter("qty=gt.1&line=eq.2")), 10
        )
        dropped = await connector.snapshot(
            RoomAddress("public.lines", "7,1"), Where(parse_filter("qty=gt.1")), 10
        )
    assert kept.rows == [{"order_id": 7, "line": 2, "qty": 5}] and kept.keys == ["7,2"]
    assert dropped.rows == []


async def test_a_snapshot_after_the_filters_column_was_dropped(pg: PgDatabase) -> None:
    """The filter goes into the query, so a column dropped since the table's shape was read
    made the query fail (an `internal` error for the client): the shape is read again and the
    snapshot taken anew, empty as before, and the column is unknown to new filters from then."""
    await pg.conn.execute("CREATE TABLE public.orders (id int PRIMARY KEY, x int, y int)")
    await pg.conn.execute("INSERT INTO orders SELECT g, g % 3, g % 3 FROM generate_series(1, 9) g")
    connector = make_connector(pg.url, ["public.orders"])
    address = RoomAddress("public.orders")
    x_is_1 = Where(parse_filter("x=eq.1"))
    y_is_1 = Where(parse_filter("y=eq.1"))
    async with streaming(connector):
        assert len((await connector.snapshot(address, x_is_1, 100)).rows) == 3
        await pg.conn.execute("ALTER TABLE orders ALTER COLUMN y TYPE text")  # int8 = text fails
        assert len((await connector.snapshot(address, y_is_1, 100)).rows) == 3
        await pg.conn.execute("ALTER TABLE orders DROP COLUMN x")
        assert (await connector.snapshot(address, x_is_1, 100)).rows == []
        with pytest.raises(ProtocolError) as refused:
            connector.check_filter("public.orders", parse_filter("x=eq.1"))
    assert refused.value.code == "bad_filter" and "no column 'x'" in refused.value.message
