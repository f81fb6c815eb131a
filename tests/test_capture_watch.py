"""The feed notices when its Postgres capture stops (issue 17), as an operator would break it.

Each test runs a real feed with a Postgres connector and a Socket.IO client subscribed, breaks
capture from another session while serving, and checks what a user notices: a `gap` in the room,
a `status` saying what happened and what to run, /readyz 503, a metric; and that changes flow
again once the fault is mended (by the feed itself where it can).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from feed.errors import SourceMisconfigured
from tests.postgres_helpers import make_connector
from tests.support import postgres as pg_support
from tests.support.postgres import PgDatabase
from tests.support.server import FeedClient, feed_client, http_get, running_feed
from tests.support.waiting import wait_until

pg_server = pg_support.pg_server
pg = pg_support.pg

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(90)]

CHECK = 0.3  # capture_check_interval in these tests
WAIT = 15.0


def config(dsn: str, extra: str = "", check: float = CHECK) -> str:
    return f"""
[[connectors]]
name = "main"
type = "postgres"
dsn = "{dsn}"
tables = ["public.orders"]
auto_migrate = true
heartbeat_interval = 0.5
reconnect_max = 0.5
capture_check_interval = {check}
{extra}
"""


async def orders(db: PgDatabase) -> None:
    await db.conn.execute("CREATE TABLE public.orders (id int PRIMARY KEY, note text)")


async def insert(db: PgDatabase, *ids: int) -> None:
    for i in ids:
        await db.conn.execute("INSERT INTO orders VALUES ($1, 'x')", i)


async def next_status(
    client: FeedClient,
    state: str,
    timeout: float = WAIT,
    connector: str = "main",
    saying: str = "",
) -> dict[str, Any]:
    """The next `status` event of `connector` in `state` whose detail contains `saying`
    (earlier ones are skipped)."""
    async with asyncio.timeout(timeout):
        while True:
            status: dict[str, Any] = await client.statuses.get()
            if (
                status["connector"] == connector
                and status["state"] == state
                and saying in status["detail"]
            ):
                return status


async def ready(url: str) -> int:
    code, _ = await http_get(url + "/readyz")
    return code


async def eventually(probe: Callable[[], Awaitable[object]], want: object, what: str) -> None:
    """Poll `probe` (a value over HTTP or SQL, which has no event) until it returns `want`."""
    try:
        async with asyncio.timeout(WAIT):
            while await probe() != want:  # noqa: ASYNC110 - nothing to subscribe to
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {WAIT}s waiting for {what}") from None


async def wait_ready(url: str, code: int) -> None:
    await eventually(lambda: ready(url), code, f"/readyz {code}")


async def metric(url: str, line_start: str) -> float:
    _, text = await http_get(url + "/metrics")
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def serving(db: PgDatabase, check: float = CHECK) -> Any:
    await orders(db)
    return running_feed(config(db.url, check=check))


async def subscribed(feed_url: str, client: FeedClient, db: PgDatabase) -> None:
    ack = await client.subscribe("main:public.orders")
    assert ack["ok"], ack
    await insert(db, 1)
    assert (await client.next_change())["key"] == 1


async def test_disabled_triggers_are_announced_and_the_window_closed(pg: PgDatabase) -> None:
    async with await serving(pg) as feed, feed_client(feed.url) as client:
        await wait_ready(feed.url, 200)
        await subscribed(feed.url, client, pg)
        await pg.conn.execute("ALTER TABLE orders DISABLE TRIGGER ALL")
        await insert(pg, 2, 3)  # never captured
        gap = await client.next_gap()
        assert gap["room"] == "main:public.orders"
        assert "disabled" in gap["reason"]
        down = await next_status(client, "down")
        assert "ENABLE ALWAYS TRIGGER" in down["detail"] and "public.orders" in down["detail"]
        assert await ready(feed.url) == 503
        assert (
            await metric(feed.url, 'feed_capture_faults_total{connector="main",kind="trigger_') == 1
        )
        assert await metric(feed.url, 'feed_capture_ok{connector="main"}') == 0
        await pg.conn.execute("ALTER TABLE orders ENABLE TRIGGER ALL")
        closing = await client.next_gap()
        assert "resumed" in closing["reason"]
        await next_status(client, "up")
        await wait_ready(feed.url, 200)
        await insert(pg, 4)
        assert (await client.next_change())["key"] == 4
        # Enabled the plain way, the triggers fire in the origin role only: the check sets them
        # to fire always again, so a row written as a replica is captured.
        await eventually(
            lambda: pg.conn.fetchval(
                "SELECT bool_and(tgenabled = 'A') FROM pg_trigger"
                " WHERE tgrelid = 'orders'::regclass AND NOT tgisinternal"
            ),
            True,
            "the triggers set to ENABLE ALWAYS again",
        )
        await pg.conn.execute(
            "BEGIN; SET LOCAL session_replication_role = replica;"
            " INSERT INTO orders VALUES (5, 'as a replica'); COMMIT"
        )
        assert (await client.next_change())["key"] == 5
        assert client.changes.empty()


async def test_a_dropped_and_recreated_table_is_reattached_with_a_gap(pg: PgDatabase) -> None:
    # A slower check: the feed mends this itself, and shows the window until the next check.
    async with await serving(pg, check=1.5) as feed, feed_client(feed.url) as client:
        await wait_ready(feed.url, 200)
        await subscribed(feed.url, client, pg)
        await pg.conn.execute("DROP TABLE orders")
        await pg.conn.execute("CREATE TABLE public.orders (id int PRIMARY KEY, note text)")
        await insert(pg, 2)  # before the feed re-attaches: not captured
        gap = await client.next_gap()
        assert "re-created" in gap["reason"] and "re-attached" in gap["reason"]
        down = await next_status(client, "down")
        assert "re-created" in down["detail"] and "re-attached" in down["detail"]
        assert await ready(feed.url) == 503
        await next_status(client, "up")  # the next check finds capture whole
        assert await ready(feed.url) == 200
        await insert(pg, 3)
        got = await client.next_change()
        assert got["key"] == 3
        assert await metric(feed.url, 'feed_capture_faults_total{connector="main"') == 1


async def test_unwatch_from_another_shell_is_noticed_and_mended(pg: PgDatabase) -> None:
    async with await serving(pg, check=1.5) as feed, feed_client(feed.url) as client:
        await wait_ready(feed.url, 200)
        await subscribed(feed.url, client, pg)
        lines = await make_connector(pg.url, ["public.orders"]).unwatch(force=True)
        assert "unwatched public.orders (capture triggers dropped)" in lines
        await insert(pg, 2)
        gap = await client.next_gap()
        assert "unwatch" in gap["reason"]
        down = await next_status(client, "down")
        assert "position restored" in down["detail"] and "re-attached" in down["detail"]
        assert await ready(feed.url) == 503
        await next_status(client, "up")
        assert await pg.conn.fetchval("SELECT count(*) FROM feed.consumers") == 1
        await insert(pg, 3)
        assert (await client.next_change())["key"] == 3


async def test_triggers_dropped_while_no_feed_ran_are_announced_at_start(pg: PgDatabase) -> None:
    await orders(pg)
    await make_connector(pg.url, ["public.orders"]).migrate()
    await pg.conn.execute("DROP TRIGGER feed_capture ON orders")
    await pg.conn.execute("DROP TRIGGER feed_capture_truncate ON orders")
    async with running_feed(config(pg.url)) as feed, feed_client(feed.url) as client:
        ack = await client.subscribe("main:public.orders")
        assert ack["ok"], ack
        # The start's gap may have gone out before the subscribe: the room remembers it.
        await wait_until(
            lambda: feed.hub.metrics.value("feed_gaps_total", connector="main") >= 1,
            WAIT,
            "a gap at start",
        )
        await wait_ready(feed.url, 200)
        await insert(pg, 5)
        assert (await client.next_change())["key"] == 5


async def test_journal_metrics_and_pruning_keep_up(pg: PgDatabase) -> None:
    await orders(pg)
    extra = "journal_retention = 0\nprune_interval = 0.2\njournal_warn_rows = 100"
    async with running_feed(config(pg.url, extra)) as feed, feed_client(feed.url) as client:
        await wait_ready(feed.url, 200)
        await subscribed(feed.url, client, pg)
        await pg.conn.execute(
            "INSERT INTO orders SELECT g, 'bulk' FROM generate_series(100, 30099) g"
        )
        await client.take(30_000, timeout=60)
        for name in ("rows", "bytes", "undelivered_age_seconds"):
            assert f"feed_postgres_journal_{name}" in (await http_get(feed.url + "/metrics"))[1]
        # Rows delivered are pruned in chunks well past the old 10,000 per interval.
        await eventually(
            lambda: pg.conn.fetchval("SELECT count(*) FROM feed.journal"), 0, "an empty journal"
        )
        # The metric follows at the next capture check.
        rows = 'feed_postgres_journal_rows{connector="main"}'
        await eventually(lambda: metric(feed.url, rows), 0, "journal rows metric 0")
        assert await metric(feed.url, 'feed_postgres_journal_over_ceiling{connector="main"}') == 0


async def test_the_journal_stays_bounded_on_disk_where_autovacuum_does_not_run(
    pg: PgDatabase,
) -> None:
    """Pruned rows' space is reused only after a VACUUM. Where autovacuum does not run (off
    for the server, as on a CI host, or for the journal), the journal, which every change passes
    through, grew on disk without end however well it was pruned: 2.3 MB a minute at 20
    changes/s of rows up to 1.5 KB, its rows steady at 2,000 (`python -m bench.soak`). The
    feed vacuums it itself there, every sixth prune."""
    await orders(pg)
    extra = "journal_retention = 0\nprune_interval = 0.2"
    async with running_feed(config(pg.url, extra)) as feed, feed_client(feed.url) as client:
        await wait_ready(feed.url, 200)
        await pg.conn.execute("ALTER TABLE feed.journal SET (autovacuum_enabled = false)")
        await subscribed(feed.url, client, pg)
        sizes = []
        for round_ in range(8):
            first = 1000 * (round_ + 1)
            # About 1 KB of text that does not compress per row, as real rows' does not.
            await pg.conn.execute(
                "INSERT INTO orders SELECT g, (SELECT string_agg(md5(random()::text || g || h), '')"
                " FROM generate_series(1, 30) h) FROM generate_series($1::int, $1 + 499) g",
                first,
            )
            await client.take(500, timeout=30)
            await eventually(
                lambda: pg.conn.fetchval("SELECT count(*) FROM feed.journal"), 0, "a pruned journal"
            )
            sizes.append(await pg.conn.fetchval("SELECT pg_relation_size('feed.journal')"))
        # Pruned every round: the space of the rounds before is used again, not added to.
        assert sizes[-1] <= 3 * sizes[0], sizes


async def test_a_position_nobody_moves_is_counted(pg: PgDatabase) -> None:
    await orders(pg)
    await make_connector(pg.url, ["public.orders"], name="never").migrate()
    await pg.conn.execute("UPDATE feed.consumers SET updated_at = now() - interval '1 hour'")
    extra = "journal_warn_age = 60"
    async with running_feed(config(pg.url, extra)) as feed:
        await wait_ready(feed.url, 200)
        stale = 'feed_postgres_stale_consumers{connector="main"}'
        await eventually(lambda: metric(feed.url, stale), 1, "one stale position")


async def test_migrate_and_unwatch_refuse_to_detach_a_running_feeds_table(
    pg: PgDatabase, tmp_path: Any
) -> None:
    await orders(pg)
    await pg.conn.execute("CREATE TABLE public.other (id int PRIMARY KEY)")
    both = config(pg.url).replace('["public.orders"]', '["public.orders", "public.other"]')
    async with running_feed(both) as feed:
        await wait_ready(feed.url, 200)
        # Another config with the same connector name and fewer tables (the user's accident).
        other = make_connector(pg.url, ["public.orders"])
        kept = await other.migrate()
        assert any(line.startswith("public.other is still watched") for line in kept), kept
        with pytest.raises(SourceMisconfigured, match=r"refusing to detach public.other: a runn"):
            await other.migrate(prune=True)
        with pytest.raises(SourceMisconfigured, match=r"feed:main:reader.*add --force"):
            await other.unwatch()
        # The same from the command line, as the user ran it: one line, exit 1 (the source's
        # state refuses it, not the config).
        from tests.test_postgres_cli import feed as run_feed

        other_toml = tmp_path / "other.toml"
        other_toml.write_text(
            "[[connectors]]\nname = 'main'\ntype = 'postgres'\n"
            "dsn = '${DATABASE_URL}'\ntables = ['public.orders']\n"
        )
        code, out, err = await run_feed(
            "migrate", "--config", str(other_toml), "--prune", database_url=pg.url
        )
        assert code == 1 and "refusing to detach public.other" in err, (out, err)
        code, out, err = await run_feed("unwatch", "--config", str(other_toml), database_url=pg.url)
        assert code == 1 and "refusing to unwatch" in err and "--force" in err, (out, err)
        triggers = "SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::regclass"
        assert await pg.conn.fetchval(triggers + " AND NOT tgisinternal", "public.other") == 2
        assert await pg.conn.fetchval(triggers + " AND NOT tgisinternal", "public.orders") == 2
        assert await ready(feed.url) == 200
    # With the feed stopped, the same prune goes through.
    lines = await make_connector(pg.url, ["public.orders"]).migrate(prune=True)
    assert lines[-1] == "unwatched public.other (capture triggers dropped)"


async def test_one_prune_pass_keeps_up_with_5000_rows_a_second(pg: PgDatabase) -> None:
    """A prune every `prune_interval` (10 s by default) must clear 10 s of writes at 5,000/s."""
    await orders(pg)
    connector = make_connector(pg.url, ["public.orders"], journal_retention=0)
    await connector.migrate()
    await pg.conn.execute("INSERT INTO orders SELECT g, 'x' FROM generate_series(1, 50000) g")
    # As if the reader had delivered all of it.
    await pg.conn.execute("UPDATE feed.consumers SET snapshot = pg_current_snapshot()::text")
    conn = await pg.connect()
    try:
        await connector._maybe_prune(conn)
    finally:
        await conn.close()
    assert await pg.conn.fetchval("SELECT count(*) FROM feed.journal") == 0


async def test_feed_check_fails_where_capture_cannot_work(pg: PgDatabase, tmp_path: Any) -> None:
    from tests.test_postgres_cli import feed as run_feed

    await orders(pg)
    await pg.conn.execute("CREATE TABLE public.other (id int PRIMARY KEY)")
    await make_connector(pg.url, ["public.other"], name="first").migrate()
    connector = make_connector(pg.url, ["public.orders"])
    assert "not attached to its tables yet: attached at start" in await connector.check()
    with pytest.raises(SourceMisconfigured, match="'main' is not attached to its tables yet"):
        await make_connector(pg.url, ["public.orders"], auto_migrate=False).check()
    await connector.migrate()
    assert "journal 0 rows" in await connector.check()
    await pg.conn.execute("ALTER TABLE orders DISABLE TRIGGER feed_capture")
    config = tmp_path / "feed.toml"
    config.write_text(
        "[[connectors]]\nname = 'main'\ntype = 'postgres'\n"
        "dsn = '${DATABASE_URL}'\ntables = ['public.orders']\n"
    )
    code, out, err = await run_feed("check", "--config", str(config), database_url=pg.url)
    assert code == 1, (out, err)
    assert "capture triggers on public.orders are disabled" in out
    assert "ENABLE ALWAYS TRIGGER" in out
    await pg.conn.execute("ALTER TABLE orders ENABLE TRIGGER ALL")
    await pg.conn.execute("DROP TRIGGER feed_capture ON orders")
    with pytest.raises(SourceMisconfigured, match=r"were dropped.*run `feed migrate`"):
        await connector.check()
    await connector.migrate()
    await make_connector(pg.url, ["public.orders"], name="never").migrate()
    await pg.conn.execute(
        "UPDATE feed.consumers SET updated_at = now() - interval '1 hour' WHERE name = 'never'"
    )
    assert "hold pruning: never" in await connector.check()  # ("first" moved just now)


async def test_the_check_keeps_its_interval_while_the_reader_idles(pg: PgDatabase) -> None:
    """No NOTIFY comes from a disabled trigger: the check must not wait for the heartbeat."""
    from feed.core.change import Gap
    from tests.postgres_helpers import streaming

    await orders(pg)
    connector = make_connector(
        pg.url, ["public.orders"], heartbeat_interval=20.0, capture_check_interval=0.2
    )
    async with streaming(connector) as stream:
        await pg.conn.execute("ALTER TABLE orders DISABLE TRIGGER ALL")
        gap = await asyncio.wait_for(stream.queue.get(), 6.0)  # the heartbeat is 20 s
    assert isinstance(gap, Gap) and "disabled" in gap.reason


async def test_a_repair_the_feed_cannot_make_is_retried_and_closed_by_the_operator(
    pg: PgDatabase,
) -> None:
    """A feed role without TRIGGER on the table cannot re-attach: it says what to run, tries
    again at each check, and closes the window with a second gap once the operator has."""
    import uuid

    from feed.core.change import Gap
    from tests.postgres_helpers import streaming

    await orders(pg)
    role = f"feed_weak_{uuid.uuid4().hex[:8]}"
    await pg.conn.execute(f"CREATE ROLE {role} LOGIN")
    try:
        await make_connector(pg.url, ["public.orders"]).migrate()
        await pg.conn.execute(f"GRANT USAGE ON SCHEMA feed TO {role}")
        await pg.conn.execute(
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA feed TO {role}"
        )
        await pg.conn.execute(f"GRANT SELECT ON orders TO {role}")
        weak_url = pg.url.replace("postgresql://postgres@", f"postgresql://{role}@")
        connector = make_connector(
            weak_url, ["public.orders"], auto_migrate=False, capture_check_interval=0.2
        )
        async with streaming(connector) as stream:
            await pg.conn.execute("DROP TRIGGER feed_capture ON orders")
            first = await asyncio.wait_for(stream.queue.get(), WAIT)
            assert isinstance(first, Gap) and "could not re-attach" in first.reason
            assert "run `feed migrate" in connector.status.detail
            assert connector.status.state.value == "down"
            await make_connector(pg.url, ["public.orders"]).migrate()  # the operator's fix
            closing = await asyncio.wait_for(stream.queue.get(), WAIT)
            assert isinstance(closing, Gap) and "resumed" in closing.reason
            await eventually(lambda: _state(connector), "up", "the connector up again")
            await pg.conn.execute("INSERT INTO orders VALUES (9, 'x')")
            assert (await stream.next()).key == 9
    finally:
        await pg.conn.execute(f"DROP OWNED BY {role}")
        await pg.conn.execute(f"DROP ROLE {role}")


async def _state(connector: Any) -> str:
    return str(connector.status.state.value)


async def test_a_journal_the_feed_may_not_vacuum_is_said_once(
    pg: PgDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    """Where autovacuum is off and the feed's role may not vacuum the journal, the log says so
    once, with what to do, and the reader goes on (no error, no retry every minute)."""
    from dataclasses import replace

    from connectors import postgres as pg_connector
    from connectors.postgres_capture import journal_stats

    await orders(pg)
    connector = make_connector(pg.url, ["public.orders"])
    await connector.migrate()
    conn = await pg.connect()
    try:
        stats = await journal_stats(conn, "feed", "main", 5.0, 60.0)
        assert stats.may_vacuum  # the test's role owns it
        connector._stats = replace(stats, autovacuum=False, may_vacuum=False)
        for _ in range(3 * pg_connector.VACUUM_EVERY):
            connector._prunes_unvacuumed += 1
            await connector._maybe_vacuum(conn)
    finally:
        await conn.close()
    said = [r.getMessage() for r in caplog.records if "VACUUM" in r.getMessage()]
    assert said == [
        "main: autovacuum is off for feed.journal and this role may not VACUUM it: the journal"
        " grows on disk although it is pruned; turn autovacuum on, or VACUUM it regularly as"
        " its owner"
    ]
