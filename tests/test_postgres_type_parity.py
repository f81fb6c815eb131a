"""Both capture modes send a client the same JSON for the same row, of every common type.

A user switching `mode` from `notify` to `logical` (or back) must see no difference in what the
client receives: notify mode's trigger renders a row with `to_jsonb`, logical mode decodes
pgoutput's text in Python or has the server rebuild it. One feed here runs both on the same
table (connector `n` in notify mode, `l` in logical mode), one client follows both rooms, and
each write must reach it as the same `key`, `before` and `after` JSON text (key order, `1` against
`1.0`, `"NaN"` included), and filters must match the same changes.

The writer's session and the database's defaults are set unlike the feed's (another time zone,
DateStyle, IntervalStyle, bytea_output, extra_float_digits), as a user's may be.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from tests.support import postgres as pg_support
from tests.support.postgres import PgDatabase
from tests.support.server import WAIT, FeedClient, feed_client, running_feed
from tests.support.waiting import wait_until

pg_server = pg_support.pg_server
pg = pg_support.pg
logical_pg = pg_support.logical_pg

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]

WRITER_SETTINGS = [
    "SET TimeZone = 'Asia/Kolkata'",
    "SET DateStyle = 'SQL, DMY'",
    "SET IntervalStyle = 'sql_standard'",
    "SET bytea_output = 'escape'",
    "SET extra_float_digits = 0",
]
DATABASE_DEFAULTS = {
    "TimeZone": "America/St_Johns",
    "DateStyle": "German, DMY",
    "IntervalStyle": "iso_8601",
    "bytea_output": "escape",
    "extra_float_digits": "-2",
}


def config(dsn: str) -> str:
    connector = """
[[connectors]]
name = "{name}"
type = "postgres"
dsn = "{dsn}"
tables = ["public.t"]
auto_migrate = true
mode = "{mode}"
poll_interval = 0.02
"""
    return "[server]\nreplay_buffer = 1000\n" + "".join(
        connector.format(name=mode[0], dsn=dsn, mode=mode) for mode in ("notify", "logical")
    )


@dataclass(frozen=True)
class Case:
    """A table `t (id int, <columns>)`, one row written, updated and deleted."""

    columns: str
    values: str  # after `INSERT INTO t VALUES (1, `
    update: str  # after `UPDATE t SET `
    key: str = "id"
    setup: str = ""
    alter: str = ""  # after the table is created

    def statements(self) -> list[str]:
        return [
            f"INSERT INTO t VALUES (1, {self.values})",
            f"UPDATE t SET {self.update}",
            "DELETE FROM t",
        ]


MD5S = "(SELECT string_agg(md5(i::text), '') FROM generate_series(1, 3000) i)"
"""96,000 characters of hex that compress badly: stored out of line (TOASTed)."""

CASES: dict[str, Case] = {
    "integers": Case(
        "a int2, b int4, c int8",
        "-32768, 2147483647, 9007199254740993",
        "c = -9223372036854775808, a = 0",
        key="id, c",
    ),
    "numeric": Case(
        "n1 numeric, n2 numeric, n3 numeric, n4 numeric, n5 numeric(20,10), n6 numeric, n7 numeric",
        "'NaN', 'Infinity', 123456789012345678901234567890.123456789012345678901234567890,"
        " 1e-30, 1.5, repeat('9', 1000)::numeric, 0.00000001",
        "n1 = '-Infinity', n2 = -0.0, n4 = 100, n7 = 1e20",
        key="id, n3",
    ),
    "floats": Case(
        "f1 real, f2 real, f3 double precision, f4 double precision, f5 double precision,"
        " f6 double precision, f7 real, f8 real",
        "'NaN', '-0', 'Infinity', '-Infinity', 1e300, 0.1::float8 + 0.2::float8, 1.1, 1e-40",
        "f3 = '-0', f5 = 5e-324, f1 = 3.4028235e38, f8 = 16777217",
    ),
    "money and bool": Case(
        "m money, m2 money, b bool, b2 bool",
        "12.34, -1234567.89, true, NULL",
        "b = false, m = 0",
    ),
    "text": Case(
        "s text, v varchar(40), c char(6), c1 char, e text",
        r"""E'caf\u00e9 \U0001F600 \\ " '' \t\n {a,b} [1] NULL \u2028 \u00a0', 'v\u00e9 "q" \\',"""
        " 'ab', 'x', ''",
        "c = 'abcdef', v = '', s = '  '",
        key="id, s",
    ),
    "bytea": Case(
        "b bytea, e bytea",
        r"'\x00ff5c27'::bytea, ''::bytea",
        r"b = '\x5c5c'::bytea",
        key="id, b",
    ),
    "uuid": Case(
        "u uuid",
        "'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11'",
        "u = '00000000-0000-0000-0000-000000000000'",
        key="u",
    ),
    "json and jsonb": Case(
        "j json, jb jsonb, j2 json, j3 json, jb2 jsonb",
        """'{"b": 1, "a": 2, "a": 3, "n": 1.0E+2, "big": 123456789012345678901234567890,
             "s": "\\u00e9\\"\\\\", "f": 0.1, "neg": -0, "e": 1e-7}',
           '{"b": 1, "a": 2, "a": 3, "n": 1.0E+2, "big": 123456789012345678901234567890,
             "s": "\\u00e9\\"\\\\", "f": 0.1, "neg": -0, "e": 1e-7}',
           '  [1, 2 ,  3 ]  ', '"scalar"', '[{"k": [null, true]}]'""",
        "j3 = 'null', jb = '{}'",
    ),
    "arrays": Case(
        "a1 int[], a2 int[][], a3 text[], a4 numeric[], a5 timestamptz[], a6 int[], a7 text[],"
        " a8 bool[], a9 float8[], a10 bytea[], a11 date[]",
        r"""'{1,NULL,3}', '{{1,2},{3,4}}',
            ARRAY['a,b', 'c"d', 'NULL', NULL, 'e\f', '', ' sp ', '{x}'],
            '{1.50,NaN}', ARRAY['2026-01-02 03:04:05+02'::timestamptz, 'infinity'],
            '[2:3]={7,8}', '{}', '{t,f,NULL}', '{NaN,-0,1e300}', ARRAY['\x00ff'::bytea],
            ARRAY['2026-01-02'::date, '0044-03-15 BC']""",
        "a2 = '{{{1}},{{2}}}', a6 = '{}'",
    ),
    "enums and domains": Case(
        "e mood, ea mood[], d1 posint, d2 label, d3 money2, d4 stamp, da posint[], db bytes",
        r"""'so "so", ok', '{sad,happy}', 5, 'lbl', 12.5, '2026-01-02 03:04:05.5+00', '{1,2}',
            '\xbeef'""",
        "e = 'happy', d3 = 0, d4 = 'infinity'",
        key="id, e",
        setup="""CREATE TYPE mood AS ENUM ('sad', 'happy', 'so "so", ok');
                 CREATE DOMAIN posint AS int CHECK (VALUE > 0);
                 CREATE DOMAIN label AS text;
                 CREATE DOMAIN money2 AS numeric(10,2);
                 CREATE DOMAIN stamp AS timestamptz;
                 CREATE DOMAIN bytes AS bytea""",
    ),
    "composites": Case(
        "c outer_t, ca outer_t[], cn inner_t",
        r"""ROW(1, 'x,"y"', 1.50, '2026-01-02 03:04:05+01', '\xff', ROW(2.50, 'infinity'),
                '{a,b}', 7, 'NaN')::outer_t,
            ARRAY[ROW(2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, -0)::outer_t],
            ROW(NULL, NULL)::inner_t""",
        "cn = NULL",
        setup="""CREATE TYPE inner_t AS (x numeric, at timestamptz);
                 CREATE TYPE outer_t AS (a int, b text, c numeric, d timestamptz, e bytea,
                                         f inner_t, g text[], "Odd Name" int, h float8)""",
    ),
    "ranges": Case(
        "r1 int4range, r2 numrange, r3 tstzrange, r4 daterange, r5 int8range, r6 int4multirange,"
        " r7 tsrange",
        """'[1,5)', '(1.5,2.50]', '[2026-01-01 00:00+05,infinity)', 'empty', '[1,)',
           '{[1,3),[5,7)}', '["2026-01-01 00:00","2026-01-02 00:00")'""",
        "r4 = '[2026-01-01,2026-02-01)'",
    ),
    "dates and times": Case(
        "d1 date, d2 date, d3 date, d4 date, t1 time, t2 time, tz1 timetz, ts1 timestamp,"
        " ts2 timestamp, ts3 timestamp, tt1 timestamptz, tt2 timestamptz, tt3 timestamptz,"
        " tt4 timestamptz, tt5 timestamptz(0)",
        """'infinity', '-infinity', '0044-03-15 BC', '10000-01-01', '24:00:00', '23:59:59.999999',
           '12:00:00.5+05:30', 'infinity', '2026-01-02 03:04:05.123456',
           '0001-01-01 00:00:00 BC', '2026-01-02 03:04:05.123456+05:30', '-infinity',
           '0044-03-15 10:00:00+00 BC', '1900-01-01 00:00:00 Europe/Amsterdam',
           '2026-06-01 12:00:00.7 America/New_York'""",
        "d1 = '2026-02-28', tt2 = '2000-01-01 00:00:00.000001+00'",
        key="id, tt1",
    ),
    "intervals": Case(
        "i1 interval, i2 interval, i3 interval, i4 interval(0)",
        "'1 year 2 mons 3 days 04:05:06.789', '-1 day +02:00', 'P1Y2M', '1.5 seconds'",
        "i2 = '0'",
    ),
    "network": Case(
        "ip inet, ip6 inet, cn cidr, mac macaddr, mac8 macaddr8",
        """'192.168.0.1/24', '::ffff:1.2.3.4', '10.0.0.0/8', '08:00:2B:01:02:03',
           '08:00:2b:01:02:03:04:05'""",
        "ip = '10.1.1.1'",
        key="id, ip",
    ),
    "text search": Case(
        "tv tsvector, tq tsquery",
        "to_tsvector('english', 'The quick brown foxes'), 'fat & (rat | cat)'",
        "tq = 'a'",
    ),
    "xml": Case(
        "x xml, x2 xml",
        """'<a b="1">x &amp; y</a>', '<?xml version="1.0"?><r/>'""",
        "x = '<b/>'",
    ),
    "geometric": Case(
        "p point, l line, ls lseg, bx box, pa path, pg polygon, ci circle",
        """'(1.5,2)', '{1,-1,0}', '[(0,0),(1,1)]', '(1,1),(0,0)', '[(0,0),(1,1),(2,0)]',
           '((0,0),(1,1),(1,0))', '<(1,1),0.5>'""",
        "p = '(0.1,-0)'",
    ),
    "bits and system types": Case(
        'b bit(4), vb varbit, b1 bit, o oid, nm name, ch "char", lsn pg_lsn',
        "B'1010', B'101', B'1', 4294967295, 'some_name', 'x', '16/B374D848'",
        "vb = B'', ch = NULL",
        key="id, b",
    ),
    "generated columns": Case(
        "qty int, price numeric,"
        " total numeric GENERATED ALWAYS AS (qty * price) STORED,"
        " label text GENERATED ALWAYS AS ('#' || qty) STORED",
        "3, 1.50",
        "qty = 4",
    ),
    "unchanged toasted values": Case(
        "big text, bj jsonb, bb bytea, small int",
        f"{MD5S}, (SELECT jsonb_agg(md5(i::text)) FROM generate_series(1, 3000) i),"
        f" decode({MD5S}, 'hex'), 1",
        "small = 2",
    ),
    "dates and times read directly": Case(
        "d1 date, d2 date, ts1 timestamp, ts2 timestamp, tt1 timestamptz, tt2 timestamptz,"
        " tt3 timestamptz, tt4 timestamptz",
        """'0001-01-01', '9999-12-31', '2026-01-02 03:04:05.5', '9999-12-31 23:59:59.999999',
           '2026-01-02 03:04:05.123456+05:30', '1900-01-01 00:00:00 Europe/Amsterdam',
           '0099-06-01 12:00:00.000001+00', '2026-06-01 12:00:00.7 America/New_York'""",
        "d2 = 'infinity', ts2 = '0044-03-15 BC', tt3 = '10000-01-01 00:00+00'",
        key="id, tt1",
    ),
    "unchanged toasted text read directly": Case(
        "big text, small int, n numeric",
        f"{MD5S}, 1, 1.50",
        "small = 2",
    ),
    "dropped and added columns": Case(
        "a int, gone text, b text",
        "1, 'x'",
        "b = 'y'",
        alter="ALTER TABLE t DROP COLUMN gone; ALTER TABLE t ADD COLUMN c numeric DEFAULT 2.50",
    ),
    "nested domains and composites": Case(
        "c item, ca item[], dc item_d, da ints, ra int4range[], nu numeric",
        """ROW('happy', 3, '{1,2}', '[1,2)')::item, ARRAY[ROW('sad', 1, '{}', 'empty')::item],
           ROW('sad', 2, NULL, NULL)::item, '{4,5}', '{"[1,2)","[3,4)"}', NULL""",
        "nu = 1, c = NULL",
        setup="""CREATE TYPE mood AS ENUM ('sad', 'happy');
                 CREATE DOMAIN posint AS int CHECK (VALUE > 0);
                 CREATE DOMAIN ints AS int[];
                 CREATE TYPE item AS (m mood, p posint, xs ints, r int4range);
                 CREATE DOMAIN item_d AS item""",
    ),
    "json in domains and arrays": Case(
        "jd jdoc, jbd jbdoc, ja jsonb[], jsa json[]",
        """'{"b": 1, "a": [1.0E+2]}', '{"b": 1, "a": 2}',
           ARRAY['{"x": 1}'::jsonb, 'null'], ARRAY['{"y": 2.50}'::json]""",
        """jbd = '{"c": 3}'""",
        setup="""CREATE DOMAIN jdoc AS json;
                 CREATE DOMAIN jbdoc AS jsonb CHECK (jsonb_typeof(VALUE) = 'object')""",
    ),
    "extension types": Case(
        "h hstore, ci citext, lt ltree",
        """'a=>1, "b c"=>NULL, "q\\"x"=>"y"', 'MiXeD', 'top.science.astronomy'""",
        "ci = 'other'",
        key="id, ci",
        setup="CREATE EXTENSION hstore; CREATE EXTENSION citext; CREATE EXTENSION ltree",
    ),
    "all null": Case(
        "n numeric, f float8, j json, jb jsonb, t timestamptz, a int[], b bytea, x interval",
        "NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL",
        "n = 1, j = 'null', jb = 'null'",
    ),
    "system types read directly": Case(
        "o oid, nm name, c char(3)",
        "4294967295, 'some_name', 'a'",
        "o = 6",
    ),
    "column names needing quoting": Case(
        '"Weird ""Col""" int, "with space" text, "UPPER" text, "ünï" text, "select" int,'
        ' "a.b" text',
        "1, 'x y', 'U', 'ü', 2, 'dot'",
        '"select" = 3',
        key='"Weird ""Col""", "with space"',
    ),
}


def wire(change: dict[str, Any]) -> str:
    """What the client received of a change that must not depend on the mode, as JSON text
    (`1` and `1.0` differ there, and key order shows)."""
    return json.dumps({k: change.get(k) for k in ("op", "key", "before", "after")})


class Rooms:
    """One client's changes, by the room they came to."""

    def __init__(self, client: FeedClient) -> None:
        self.client = client
        self.by_room: dict[str, list[dict[str, Any]]] = defaultdict(list)

    async def take(self, room: str, count: int) -> list[dict[str, Any]]:
        async with asyncio.timeout(WAIT):
            while len(self.by_room[room]) < count:
                change = await self.client.changes.get()
                self.by_room[change["room"]].append(change)
        return self.by_room[room][:count]


class RolledBack(Exception):
    """Ends a transaction that only tried a write."""


async def prepare(db: PgDatabase, case: Case, table: str = "") -> None:
    for name, value in DATABASE_DEFAULTS.items():
        await db.conn.execute(f'ALTER DATABASE "{db.name}" SET "{name}" = \'{value}\'')
    if case.setup:
        await db.conn.execute(case.setup)
    await db.conn.execute(
        table or f"CREATE TABLE public.t (id int, {case.columns}, PRIMARY KEY ({case.key}))"
    )
    if case.values:  # the row can be written here (xml needs a server built with libxml)
        try:
            async with db.conn.transaction():
                await db.conn.execute(case.statements()[0])
                raise RolledBack
        except asyncpg.FeatureNotSupportedError as exc:
            pytest.skip(str(exc))
        except RolledBack:
            pass
    if case.alter:
        await db.conn.execute(case.alter)
    for statement in WRITER_SETTINGS:
        await db.conn.execute(statement)


async def both_up(feed: Any) -> None:
    def up() -> bool:
        return all(feed.hub.connectors[name].status.state.value == "up" for name in ("n", "l"))

    await wait_until(up, 30, "both connectors up")


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
async def test_each_type_reaches_the_client_alike_in_both_modes(
    logical_pg: PgDatabase, case: Case
) -> None:
    db = logical_pg
    await prepare(db, case)
    async with running_feed(config(db.url)) as feed:
        await both_up(feed)
        async with feed_client(feed.url) as client:
            for room in ("n:public.t", "l:public.t"):
                assert (await client.subscribe(room))["ok"]
            for statement in case.statements():
                await db.conn.execute(statement)
            rooms = Rooms(client)
            via_journal = [wire(c) for c in await rooms.take("n:public.t", 3)]
            via_slot = [wire(c) for c in await rooms.take("l:public.t", 3)]
    assert [json.loads(c)["op"] for c in via_journal] == ["insert", "update", "delete"]
    for journal, slot in zip(via_journal, via_slot, strict=True):
        assert slot == journal
    update = json.loads(via_slot[1])
    if "big" in update["after"]:  # TOASTed, unchanged: the value, not null or a marker
        assert len(update["before"]["big"]) == len(update["after"]["big"]) == 96_000


FILTERED = {
    "rebuilt": """CREATE TYPE mood AS ENUM ('sad', 'happy');
        CREATE TABLE public.t (id int PRIMARY KEY, n numeric, f8 float8, big int8, c char(4),
        tz timestamptz, d date, u uuid, e mood, b bool, s text, j jsonb, o oid, m money,
        iv interval)""",
    "read-directly": """CREATE TABLE public.t (id int PRIMARY KEY, n numeric, f8 float8,
        big int8, c char(4), tz timestamptz, d date, u uuid, e text, b bool, s text, j jsonb,
        o oid, m text, iv text)""",
}
"""The same columns, but for three: of types the logical reader reads from pgoutput's text
itself, or with some the server rebuilds the row of (connectors/postgres_logical.py)."""
U1, U2 = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "00000000-0000-0000-0000-000000000001"
WRITES = [
    f"""INSERT INTO t VALUES (1, 1.50, '-0', 9007199254740993, 'ab', '2026-01-01 05:30+05:30',
        'infinity', '{U1}', 'happy', true, 'café', '{{"k": 1.0}}', 5, '$12.34', '1 day')""",
    f"""INSERT INTO t VALUES (2, 'NaN', 'NaN', 1, 'abcd', 'infinity', '2026-01-02', '{U2}',
        'sad', false, 'x', '{{"k": "1"}}', 12, 0, '-1 day')""",
    """INSERT INTO t VALUES (3, 100, 1e300, -1, NULL, '2025-12-31 23:59:59.999999+00',
        '0044-03-15 BC', NULL, NULL, NULL, NULL, '{"k": [1]}', NULL, NULL, NULL)""",
    "UPDATE t SET n = 2, o = 7 WHERE id = 1",
    "DELETE FROM t WHERE id = 2",
]
SENTINEL = "INSERT INTO t (id) VALUES (1000)"
FILTERS = {
    "n=eq.1.5": [("insert", 1), ("update", 1)],
    "n=gt.50": [("insert", 3)],
    "n=neq.NaN": None,
    "big=eq.9007199254740993": [("insert", 1), ("update", 1)],
    "big=gt.9007199254740992": [("insert", 1), ("update", 1)],
    "f8=eq.0": [("insert", 1), ("update", 1)],
    "f8=gte.0": None,
    "c=eq.ab%20%20": [("insert", 1), ("update", 1)],
    "tz=eq.2026-01-01T00:00:00Z": [("insert", 1), ("update", 1)],
    "tz=lt.2026-01-01T00:00:00Z": [("insert", 3)],
    "d=lt.2026-01-05": None,
    f"u=in.({U1},{U2})": [("insert", 1), ("insert", 2), ("update", 1), ("delete", 2)],
    "e=eq.happy": [("insert", 1), ("update", 1)],
    "b=eq.false": [("insert", 2), ("delete", 2)],
    "s=eq.café": [("insert", 1), ("update", 1)],
    "j.k=eq.1": None,
    "o=eq.5": [("insert", 1), ("update", 1)],
    "o=gt.10": [("insert", 2), ("delete", 2)],  # as numbers, not text ("5" > "10")
    "m=eq.$12.34": [("insert", 1), ("update", 1)],
    "iv=eq.1%20day": [("insert", 1), ("update", 1)],
}
"""Each filter with the changes it matches (by op and key), where a reader of the docs can
tell; None where only the two modes' agreement is asserted (text ordering of `infinity`, NaN)."""


@pytest.mark.parametrize("table", list(FILTERED))
async def test_filters_match_the_same_changes_in_both_modes(
    logical_pg: PgDatabase, table: str
) -> None:
    db = logical_pg
    await prepare(db, Case("", "", ""), table=FILTERED[table])
    async with running_feed(config(db.url)) as feed:
        await both_up(feed)
        async with feed_client(feed.url) as client:
            names: dict[tuple[str, str], str] = {}
            for mode in ("n", "l"):
                assert (await client.subscribe(f"{mode}:public.t"))["ok"]
                for text in FILTERS:
                    ack = await client.subscribe(f"{mode}:public.t", filter=text)
                    assert ack["ok"], (text, ack)
                    names[mode, text] = ack["room"]
            for statement in WRITES:
                await db.conn.execute(statement)
            rooms = Rooms(client)
            for mode in ("n", "l"):
                await rooms.take(f"{mode}:public.t", len(WRITES))
            # Written after every change above reached the client (each pass of the hub is
            # sent whole): when it arrives, so has every filter room's copy of those.
            await db.conn.execute(SENTINEL)
            for mode in ("n", "l"):
                await rooms.take(f"{mode}:public.t", len(WRITES) + 1)

    def matched(mode: str, text: str) -> list[tuple[str, Any]]:
        got = rooms.by_room[names[mode, text]]
        return [(c["op"], c["key"]) for c in got if c["key"] != 1000]

    for text, expected in FILTERS.items():
        assert matched("l", text) == matched("n", text), text
        if expected is not None:
            assert matched("n", text) == expected, text
    assert all(matched("n", text) for text in FILTERS), "a filter that matched nothing"
