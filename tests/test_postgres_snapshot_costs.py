"""What one client's snapshots may cost the others (docs/security.md, "Snapshots").

A filter the snapshot cannot put in its SQL (`neq`, text ranges, JSON paths: see
connectors/postgres_filters.py) is applied row by row in the feed, and `snapshot_limit` counts
the rows kept, not the rows read: on a 200,000-row table one such snapshot that keeps nothing
read the whole table, 1.4 s of the feed's CPU. One client sending five a second took a core,
and held both of the connector's snapshot connections, so another client's snapshot of one row
by its key failed (`snapshot_failed` after 10 s) two times out of three.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.support import postgres as pg_support
from tests.support.postgres import PgDatabase
from tests.support.server import FeedClient, feed_client, running_feed
from tests.support.waiting import wait_until

pg_server = pg_support.pg_server
pg = pg_support.pg

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]


def config(dsn: str, extra: str = "") -> str:
    return f"""
[server]
replay_buffer = 100

[[connectors]]
name = "main"
type = "postgres"
dsn = "{dsn}"
tables = ["public.notes"]
auto_migrate = true
heartbeat_interval = 0.5
{extra}
"""


async def notes(db: PgDatabase, rows: int) -> None:
    await db.conn.execute("CREATE TABLE public.notes (id int PRIMARY KEY, body text)")
    await db.conn.execute(
        "INSERT INTO notes SELECT g, 'note ' || g FROM generate_series(1, $1) g", rows
    )


async def test_a_snapshot_stops_reading_at_the_scan_limit_and_says_it_is_truncated(
    pg: PgDatabase,
) -> None:
    await notes(pg, 100_050)
    async with running_feed(config(pg.url)) as feed:
        connector = feed.hub.connectors["main"]
        await wait_until(lambda: connector.status.state.value == "up", 15, "postgres up")
        async with feed_client(feed.url) as client:
            # Text ordering is not put in SQL: every row is read and checked here.
            ack = await client.subscribe("main:public.notes", filter="body=gt.zzz", snapshot=True)
            assert ack["ok"], ack
            assert ack["snapshot"] == []
            assert ack["snapshot_truncated"] is True  # 100,000 rows read of 100,050
            # What SQL selects is not counted against it: a filter on the key reads one row.
            ack = await client.subscribe("main:public.notes", filter="id=eq.100050", snapshot=True)
            assert ack["snapshot"] == [{"id": 100050, "body": "note 100050"}]
            assert ack["snapshot_truncated"] is False


async def test_the_scan_limit_is_a_setting_of_the_connector(pg: PgDatabase) -> None:
    await notes(pg, 3000)
    async with running_feed(config(pg.url, "snapshot_scan_limit = 2500")) as feed:
        connector = feed.hub.connectors["main"]
        await wait_until(lambda: connector.status.state.value == "up", 15, "postgres up")
        async with feed_client(feed.url) as client:
            ack = await client.subscribe(
                "main:public.notes", filter="body=lt.note 11", snapshot=True
            )
            assert ack["snapshot_truncated"] is True
            # "note 1", "note 10", "note 100".."note 109", "note 1000".."note 1099": all among
            # the first 2,500 rows, but the rest were not read, so it cannot say there are none.
            assert len(ack["snapshot"]) == 112
    async with running_feed(config(pg.url, "snapshot_scan_limit = 0")) as feed:  # 0: no limit
        connector = feed.hub.connectors["main"]
        await wait_until(lambda: connector.status.state.value == "up", 15, "postgres up")
        async with feed_client(feed.url) as client:
            ack = await client.subscribe("main:public.notes", filter="body=gt.zzz", snapshot=True)
            assert ack["snapshot"] == [] and ack["snapshot_truncated"] is False


async def test_one_clients_costly_snapshots_do_not_hold_up_anothers(pg: PgDatabase) -> None:
    await notes(pg, 60_000)
    async with running_feed(config(pg.url)) as feed:
        connector = feed.hub.connectors["main"]
        await wait_until(lambda: connector.status.state.value == "up", 15, "postgres up")
        async with feed_client(feed.url) as costly, feed_client(feed.url) as other:
            answered: list[str] = []

            async def snapshot(client: FeedClient, name: str, row_filter: str) -> None:
                ack = await client.subscribe("main:public.notes", filter=row_filter, snapshot=True)
                assert ack["ok"], ack
                answered.append(name)

            # Six snapshots that read the whole table each, at once, then a cheap one.
            heavy = [
                asyncio.create_task(snapshot(costly, f"costly {i}", f"body=gt.zzz{i}"))
                for i in range(6)
            ]
            await asyncio.sleep(0.05)  # all six asked before the cheap one
            await snapshot(other, "other", "id=eq.7")
            costly_before = [name for name in answered if name != "other"]
            await asyncio.gather(*heavy)
            assert len(feed.hub.snapshot_turns) == 0  # nobody waits: no key is kept
    # They took turns for the connector's two snapshot connections: the other client's came
    # after at most one of them, not after four.
    assert len(costly_before) <= 1, answered
    assert len(answered) == 7
