"""Partitioned tables and writes under another replication role, in both Postgres modes, through
the real server: every way rows enter or leave a watched table arrives as a change or a gap.

- A row written under `session_replication_role = replica` (how a logical replication
  subscriber applies its publisher's changes, and how some bulk loads skip foreign keys) is
  delivered: the capture triggers fire ALWAYS, not only in the origin role.
- A partitioned table is watched by its own name: rows written to any partition arrive in its
  room (logical mode publishes through the root).
- TRUNCATE of one partition, a partition detached or dropped, a table attached with rows: a
  `gap` for the table's room. A partition created empty is no gap; TRUNCATE of the whole table
  is one `truncate` change.

Logical mode needs wal_level = logical (the suite's embedded server has it; skipped elsewhere).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.support import postgres as pg_support
from tests.support.postgres import PgDatabase
from tests.support.server import FeedClient, feed_client, running_feed
from tests.test_capture_watch import eventually, wait_ready

pg_server = pg_support.pg_server
pg = pg_support.pg

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]

ROOM = "main:public.events"


def config(dsn: str, mode: str) -> str:
    return f"""
[[connectors]]
name = "main"
type = "postgres"
mode = "{mode}"
dsn = "{dsn}"
tables = ["public.events", "public.orders"]
auto_migrate = true
poll_interval = 0.02
capture_check_interval = 0.3
"""


@pytest.fixture(params=["notify", "logical"])
async def mode(request: pytest.FixtureRequest, pg: PgDatabase) -> str:
    if request.param == "logical" and await pg.server.wal_level() != "logical":
        pytest.skip("the server's wal_level is not logical")
    await pg.conn.execute(
        """CREATE TABLE public.orders (id int PRIMARY KEY, note text);
           CREATE TABLE public.events (id int, day date, note text, PRIMARY KEY (id, day))
               PARTITION BY RANGE (day);
           CREATE TABLE public.events_2025 PARTITION OF public.events
               FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
           CREATE TABLE public.events_2026 PARTITION OF public.events
               FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');"""
    )
    return str(request.param)


@pytest.fixture
async def client(pg: PgDatabase, mode: str) -> AsyncIterator[FeedClient]:
    async with running_feed(config(pg.url, mode)) as feed, feed_client(feed.url) as client:
        await wait_ready(feed.url, 200)  # capture attached
        for room in (ROOM, "main:public.orders"):
            ack = await client.subscribe(room)
            assert ack["ok"], ack
        yield client


async def settled(pg: PgDatabase, client: FeedClient, marker: int) -> dict[str, Any]:
    """Write a row to 2026 and wait for it: whatever the feed said before it has arrived."""
    await pg.conn.execute("INSERT INTO events VALUES ($1, '2026-06-01', 'marker')", marker)
    change = await client.next_change()
    assert change["key"] == {"id": marker, "day": "2026-06-01"}, change
    return change


async def capture_checked(pg: PgDatabase, mode: str, partition: str) -> None:
    """Until a capture check has seen a new partition: in notify mode it puts the truncate
    trigger on it, in logical mode its replica identity full (what the check leaves behind, in
    the catalog, which has no event to wait for)."""
    if mode == "notify":
        sql = "SELECT count(*) = 1 FROM pg_trigger WHERE tgrelid = $1::regclass AND tgname = $2"
        args: tuple[str, ...] = (partition, "feed_capture_truncate")
    else:
        sql = "SELECT relreplident = 'f' FROM pg_class WHERE oid = $1::regclass"
        args = (partition,)
    await eventually(lambda: pg.conn.fetchval(sql, *args), True, f"the check to see {partition}")


async def test_rows_written_as_a_replica_are_delivered(pg: PgDatabase, client: FeedClient) -> None:
    await pg.conn.execute(
        """BEGIN; SET LOCAL session_replication_role = replica;
           INSERT INTO orders VALUES (1, 'applied by a subscriber'); COMMIT"""
    )
    change = await client.next_change()
    assert (change["room"], change["key"], change["after"]["note"]) == (
        "main:public.orders",
        1,
        "applied by a subscriber",
    )


async def test_every_partition_s_rows_arrive_in_the_table_s_room(
    pg: PgDatabase, client: FeedClient
) -> None:
    await pg.conn.execute(
        "INSERT INTO events VALUES (1, '2025-03-01', 'a'), (2, '2026-03-01', 'b')"
    )
    await pg.conn.execute("UPDATE events SET note = 'c' WHERE id = 2")
    await pg.conn.execute("DELETE FROM events WHERE id = 1")
    got = [await client.next_change() for _ in range(4)]
    assert [(c["room"], c["op"], c["key"]["id"]) for c in got] == [
        (ROOM, "insert", 1),
        (ROOM, "insert", 2),
        (ROOM, "update", 2),
        (ROOM, "delete", 1),
    ]
    assert got[2]["before"] == {"id": 2, "day": "2026-03-01", "note": "b"}
    assert got[3]["before"] == {"id": 1, "day": "2025-03-01", "note": "a"}


async def test_a_truncated_partition_is_a_gap_and_a_truncated_table_a_truncate(
    pg: PgDatabase, client: FeedClient
) -> None:
    await pg.conn.execute(
        "INSERT INTO events VALUES (1, '2025-03-01', 'a'), (2, '2026-03-01', 'b')"
    )
    await client.take(2)
    await pg.conn.execute("TRUNCATE events_2025")
    gap = await client.next_gap()
    assert gap["room"] == ROOM and "public.events_2025" in gap["reason"], gap
    await settled(pg, client, 10)
    await pg.conn.execute("TRUNCATE events")
    truncate = await client.next_change()
    assert (truncate["room"], truncate["op"]) == (ROOM, "truncate")
    # No gap for the whole table's truncate (its partitions' triggers fired too; in logical
    # mode they have new storage): the next two gaps are two later detaches, each found by its
    # own capture check, after any check that could have judged the truncate.
    for year in (2025, 2026):
        await pg.conn.execute(f"ALTER TABLE events DETACH PARTITION events_{year}")
        gap = await client.next_gap()
        assert f"events_{year} left" in gap["reason"], gap


async def test_partitions_that_leave_or_join_with_rows_are_gaps(
    pg: PgDatabase, mode: str, client: FeedClient
) -> None:
    await pg.conn.execute("INSERT INTO events VALUES (1, '2025-03-01', 'a')")
    await client.next_change()
    # Created empty, ahead of time: no gap, and its rows and its truncate are captured.
    await pg.conn.execute(
        "CREATE TABLE events_2027 PARTITION OF events FOR VALUES FROM ('2027-01-01') TO ('2028-01-01')"
    )
    await capture_checked(pg, mode, "events_2027")
    await pg.conn.execute("INSERT INTO events VALUES (3, '2027-03-01', 'c')")
    assert (await client.next_change())["key"] == {"id": 3, "day": "2027-03-01"}
    assert client.gaps.empty(), client.gaps.get_nowait()
    await pg.conn.execute("TRUNCATE events_2027")
    assert "public.events_2027" in (await client.next_gap())["reason"]

    await pg.conn.execute("ALTER TABLE events DETACH PARTITION events_2025")
    gap = await client.next_gap()
    assert gap["room"] == ROOM and "events_2025 left" in gap["reason"], gap

    await pg.conn.execute(
        """CREATE TABLE public.events_2030 (LIKE public.events);
           INSERT INTO events_2030 VALUES (9, '2030-02-02', 'came with the attach');
           ALTER TABLE events ATTACH PARTITION events_2030
               FOR VALUES FROM ('2030-01-01') TO ('2031-01-01')"""
    )
    gap = await client.next_gap()
    assert gap["room"] == ROOM and "events_2030 joined" in gap["reason"], gap

    await pg.conn.execute("DROP TABLE events_2030")
    assert "events_2030 left" in (await client.next_gap())["reason"]
    await settled(pg, client, 22)
    assert client.gaps.empty(), client.gaps.get_nowait()


async def test_unwatch_takes_the_truncate_triggers_off_every_partition(pg: PgDatabase) -> None:
    from tests.postgres_helpers import make_connector

    await pg.conn.execute(
        """CREATE TABLE public.events (id int, day date, PRIMARY KEY (id, day))
               PARTITION BY RANGE (day);
           CREATE TABLE public.events_2025 PARTITION OF public.events
               FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');"""
    )
    count = "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'feed_capture%'"
    connector = make_connector(pg.url, ["public.events"])
    assert "capturing truncates of partition public.events_2025 of public.events" in (
        await connector.migrate()
    )
    assert await pg.conn.fetchval(count) == 4  # the table's two, the partition's clone and its own
    await connector.unwatch()
    assert await pg.conn.fetchval(count) == 0


async def test_a_partition_the_feed_may_not_touch_is_one_warning_not_a_restart(
    pg: PgDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    """A feed role with TRIGGER and SELECT on the tables it watches, but none on a partition
    created later (grants are per table): it cannot put the truncate trigger on it, says so
    once, and reads on (it used to fail its capture check on the partition, and restart)."""
    import logging

    from tests.postgres_helpers import feed_role, make_connector, streaming

    await pg.conn.execute(
        """CREATE TABLE public.events (id int, day date, PRIMARY KEY (id, day))
               PARTITION BY RANGE (day);
           CREATE TABLE public.events_2025 PARTITION OF public.events
               FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');"""
    )
    await make_connector(pg.url, ["public.events"]).migrate()
    grants = "GRANT SELECT, TRIGGER ON ALL TABLES IN SCHEMA public TO {role}"
    async with feed_role(pg.conn, pg.url, grants) as (_, weak):
        connector = make_connector(
            weak, ["public.events"], auto_migrate=False, capture_check_interval=0.1
        )
        caplog.set_level(logging.INFO, logger="feed.connectors.postgres")
        async with streaming(connector) as stream:
            await pg.conn.execute(
                "CREATE TABLE public.events_2026 PARTITION OF public.events"
                " FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')"
            )
            warned = "a TRUNCATE of partition public.events_2026 of public.events would not"
            await eventually(lambda: _logged(caplog, warned), True, "the warning")
            for i in range(3):  # checks go on meanwhile; the reader stays up
                # Into the old partition: rows in the new one could make it "joined with
                # rows" (a gap), were the check's size query later than the insert.
                await pg.conn.execute("INSERT INTO events VALUES ($1, '2025-02-02')", i)
                assert (await stream.next()).key["id"] == i
            assert sum(warned in r.getMessage() for r in caplog.records) == 1
            assert connector.status.state.value == "up", stream.history
            assert stream.states.count(connector.status.state) == 1, stream.history


async def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in record.getMessage() for record in caplog.records)


async def test_a_replica_identity_changed_by_hand_is_set_back_with_a_gap(
    pg: PgDatabase, mode: str, client: FeedClient
) -> None:
    """Logical mode: with the default replica identity an update or delete carries no old row
    (filter rooms need it to see a row leave). Changed by hand, it is set back to full at the
    next check, and the window is a gap."""
    if mode != "logical":
        pytest.skip("notify mode's triggers read OLD whatever the replica identity")
    await pg.conn.execute("INSERT INTO orders VALUES (1, 'a')")
    await client.next_change()
    await pg.conn.execute("ALTER TABLE orders REPLICA IDENTITY DEFAULT")
    gap = await client.next_gap()
    assert gap["room"] == "main:public.orders" and "replica identity" in gap["reason"], gap
    ident = "SELECT relreplident::text FROM pg_class WHERE oid = 'orders'::regclass"
    await eventually(lambda: pg.conn.fetchval(ident), "f", "replica identity full again")
    await pg.conn.execute("UPDATE orders SET note = 'b' WHERE id = 1")
    change = await client.next_change()
    assert change["before"] == {"id": 1, "note": "a"}, change


async def test_a_new_partition_truncated_before_any_check_is_a_gap(
    pg: PgDatabase, client: FeedClient
) -> None:
    """Created, written to and truncated at once: whether a capture check saw the partition
    before the truncate (its trigger, or its new storage) or only after (its storage no longer
    named by its oid), the row that was announced and then removed is a gap."""
    await pg.conn.execute(
        """CREATE TABLE events_2028 PARTITION OF events
               FOR VALUES FROM ('2028-01-01') TO ('2029-01-01');
           INSERT INTO events VALUES (5, '2028-05-05', 'short lived');"""
    )
    assert (await client.next_change())["key"] == {"id": 5, "day": "2028-05-05"}
    await pg.conn.execute("TRUNCATE events_2028")
    gap = await client.next_gap()
    assert gap["room"] == ROOM and "events_2028" in gap["reason"], gap


async def test_a_look_finds_a_new_partition_truncated_since_it_was_made(pg: PgDatabase) -> None:
    """The path the test above may take, taken for sure: two looks of the watch, the
    partition made, written to and truncated between them, before any trigger of its own."""
    from feed.core.change import Gap
    from tests.postgres_helpers import make_connector

    await pg.conn.execute(
        """CREATE TABLE public.events (id int, day date, PRIMARY KEY (id, day))
               PARTITION BY RANGE (day);"""
    )
    connector = make_connector(pg.url, ["public.events"])
    await connector.migrate()
    conn = await pg.connect()
    try:
        assert [gap async for gap in connector.partition_watch.look(conn)] == []
        await pg.conn.execute(
            """CREATE TABLE events_2028 PARTITION OF events
                   FOR VALUES FROM ('2028-01-01') TO ('2029-01-01');
               CREATE TABLE events_2029 PARTITION OF events
                   FOR VALUES FROM ('2029-01-01') TO ('2030-01-01');
               INSERT INTO events VALUES (5, '2028-05-05');"""
        )
        await pg.conn.execute("TRUNCATE events_2028")
        gaps = [gap async for gap in connector.partition_watch.look(conn)]
    finally:
        await conn.close()
    assert len(gaps) == 1 and isinstance(gaps[0], Gap), gaps  # 2029: made empty, no gap
    assert "events_2028 of public.events was truncated or rewritten since it was created" in (
        gaps[0].reason
    )


async def test_a_busy_new_partition_is_covered_at_a_later_look(pg: PgDatabase) -> None:
    """The truncate trigger waits for the partition's lock at most 1 s: a long transaction on
    a new partition delays it to a later look, and fails neither the look nor the reader."""
    from tests.postgres_helpers import make_connector

    await pg.conn.execute(
        """CREATE TABLE public.events (id int, day date, PRIMARY KEY (id, day))
               PARTITION BY RANGE (day);"""
    )
    connector = make_connector(pg.url, ["public.events"])
    await connector.migrate()
    triggers = "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'events_2028'::regclass"
    conn, holder = await pg.connect(), await pg.connect()
    try:
        assert [gap async for gap in connector.partition_watch.look(conn)] == []
        await pg.conn.execute(
            "CREATE TABLE events_2028 PARTITION OF events"
            " FOR VALUES FROM ('2028-01-01') TO ('2029-01-01')"
        )
        await holder.execute("BEGIN; LOCK TABLE events_2028 IN ROW EXCLUSIVE MODE")  # a writer
        assert [gap async for gap in connector.partition_watch.look(conn)] == []
        assert await pg.conn.fetchval(triggers) == 1  # the cloned row trigger only
        await holder.execute("COMMIT")
        assert [gap async for gap in connector.partition_watch.look(conn)] == []
        assert await pg.conn.fetchval(triggers) == 2
    finally:
        await conn.close()
        await holder.close()


async def test_a_foreign_partition_is_read_on(
    pg: PgDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    """A partition that is a foreign table (old rows moved to another server, say). On
    Postgres 15 it cannot have a TRUNCATE trigger: the check failed on it and restarted the
    reader at every look; now that is one warning and the reader reads on. Where it can have
    one (18), its truncate is a gap like any partition's."""
    import logging

    import asyncpg

    from feed.core.change import Gap
    from tests.postgres_helpers import make_connector, streaming

    try:
        await pg.conn.execute("CREATE EXTENSION postgres_fdw")
    except asyncpg.PostgresError as exc:
        pytest.skip(f"no postgres_fdw: {exc}")
    port = pg.url.rsplit(":", 1)[1].split("/")[0]
    await pg.conn.execute(
        f"""CREATE SERVER loop FOREIGN DATA WRAPPER postgres_fdw
                OPTIONS (host '127.0.0.1', port '{port}', dbname '{pg.name}');
            CREATE USER MAPPING FOR CURRENT_USER SERVER loop OPTIONS (user 'postgres');
            CREATE TABLE public.logs (id int, day date) PARTITION BY RANGE (day);
            CREATE TABLE public.logs_2026 PARTITION OF public.logs
                FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
            CREATE TABLE public.archive (id int, day date);
            CREATE FOREIGN TABLE public.logs_2000 PARTITION OF public.logs
                FOR VALUES FROM ('2000-01-01') TO ('2001-01-01')
                SERVER loop OPTIONS (table_name 'archive');"""
    )
    caplog.set_level(logging.INFO, logger="feed.connectors.postgres")
    connector = make_connector(pg.url, ["public.logs"], capture_check_interval=0.1)
    async with streaming(connector) as stream:
        for i in range(3):  # checks go on meanwhile; the reader stays up
            await pg.conn.execute("INSERT INTO logs VALUES ($1, '2026-02-02')", i)
            assert (await stream.next()).key is None  # no primary key: no row rooms
        assert connector.status.state.value == "up", stream.history
        assert stream.states.count(connector.status.state) == 1, stream.history
        covered = await pg.conn.fetchval(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'logs_2000'::regclass"
            " AND tgname = 'feed_capture_truncate'"
        )
        if covered:
            await pg.conn.execute("TRUNCATE logs_2000")
            gap = await asyncio.wait_for(stream.queue.get(), 15)
            assert isinstance(gap, Gap) and "logs_2000" in gap.reason, gap
    warned = [r.getMessage() for r in caplog.records if "warning: a TRUNCATE" in r.getMessage()]
    assert warned == ([] if covered else [warned[0]]), warned
    assert covered or ("logs_2000" in warned[0] and "foreign" in warned[0]), warned
