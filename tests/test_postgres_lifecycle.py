"""An operator's Postgres lifecycle: `feed migrate` run by several nodes at once, a migrate
that lacks a privilege, a table renamed before it is unwatched, and retiring the feed."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from connectors.postgres_migrate import apply_migrations, load_migrations
from feed.errors import SourceMisconfigured
from tests.postgres_helpers import make_connector, streaming
from tests.support import postgres as pg_support
from tests.support.postgres import PgDatabase

pg_server = pg_support.pg_server
pg = pg_support.pg

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]

CAPTURE_TRIGGERS = (
    "SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::regclass AND tgname LIKE 'feed%'"
)


async def test_nodes_migrating_at_once_all_succeed(pg: PgDatabase) -> None:
    """Every replica of the compose stack runs `feed migrate` as it starts: on a fresh database
    they raced, and all but one failed with `trigger "feed_capture" ... already exists` (so
    their `&& feed serve` never ran). Each round is a fresh install (its own schema)."""
    tables = [f"public.t{n}" for n in range(4)]
    for target in tables:
        await pg.conn.execute(f"CREATE TABLE {target} (id int PRIMARY KEY)")
    for round_ in range(6):
        schema = f"feed_r{round_}"
        nodes = [make_connector(pg.url, tables, schema=schema) for _ in range(3)]
        results = await asyncio.wait_for(
            asyncio.gather(*(node.migrate() for node in nodes), return_exceptions=True), 60
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        assert failures == [], failures
        lines = [line for result in results if isinstance(result, list) for line in result]
        # One node attaches each table; the others find it attached. Nobody "re-attaches".
        assert not [line for line in lines if "re-attached" in line], lines
        for target in tables:
            assert lines.count(f"watching {target}") == 1, lines
        for target in tables:
            have = await pg.conn.fetchval(
                "SELECT count(*) FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid"
                " JOIN pg_namespace n ON n.oid = p.pronamespace"
                " WHERE t.tgrelid = $1::regclass AND n.nspname = $2",
                target,
                schema,
            )
            assert have == 2, (target, schema)
        for target in tables:  # the next round installs afresh
            await pg.conn.execute(f"DROP TRIGGER {schema}_capture ON {target}")
            await pg.conn.execute(f"DROP TRIGGER {schema}_capture_truncate ON {target}")


async def test_a_migrate_refused_for_a_privilege_leaves_no_trace(pg: PgDatabase) -> None:
    """A migrate that could not attach (no TRIGGER privilege) left the table marked as watched:
    `feed check` then said its triggers "were dropped: changes made since were not captured",
    and the migrate after the GRANT "re-attached" it (a gap at the next start), though capture
    had never begun."""
    await pg.conn.execute("CREATE TABLE public.orders (id int PRIMARY KEY)")
    role = f"feed_low_{uuid.uuid4().hex[:8]}"
    await pg.conn.execute(f"CREATE ROLE {role} LOGIN")
    try:
        await pg.conn.execute(f'GRANT CREATE ON DATABASE "{pg.name}" TO {role}')
        await pg.conn.execute(f"GRANT SELECT ON public.orders TO {role}")
        low = pg.url.replace("postgresql://postgres@", f"postgresql://{role}@")
        connector = make_connector(low, ["public.orders"], auto_migrate=False)
        with pytest.raises(SourceMisconfigured) as info:
            await connector.migrate()
        assert f"GRANT TRIGGER ON public.orders TO {role}" in str(info.value)
        with pytest.raises(SourceMisconfigured) as info:
            await connector.check()
        assert "were dropped" not in str(info.value), info.value
        assert "not attached" in str(info.value), info.value
        await pg.conn.execute(f"GRANT TRIGGER ON public.orders TO {role}")
        lines = await connector.migrate()
        assert "watching public.orders" in lines, lines
        assert not [line for line in lines if "re-attached" in line], lines
    finally:
        await pg.conn.execute(f"DROP OWNED BY {role} CASCADE")
        await pg.conn.execute(f"DROP ROLE {role}")


async def test_a_create_schema_refusal_names_the_grant(pg: PgDatabase) -> None:
    await pg.conn.execute("CREATE TABLE public.orders (id int PRIMARY KEY)")
    role = f"feed_low_{uuid.uuid4().hex[:8]}"
    await pg.conn.execute(f"CREATE ROLE {role} LOGIN")
    try:
        low = pg.url.replace("postgresql://postgres@", f"postgresql://{role}@")
        with pytest.raises(SourceMisconfigured) as info:
            await make_connector(low, ["public.orders"]).migrate()
        text = str(info.value)
        assert f'GRANT CREATE ON DATABASE "{pg.name}" TO {role}' in text, text
        assert "\n" not in text
    finally:
        await pg.conn.execute(f"DROP OWNED BY {role} CASCADE")
        await pg.conn.execute(f"DROP ROLE {role}")


@pytest.mark.parametrize("how", ["prune", "unwatch"])
async def test_a_table_renamed_before_it_is_unwatched_loses_its_triggers(
    pg: PgDatabase, how: str
) -> None:
    """`customers` renamed to `clients`, then retired from the config: the detach said
    "table no longer exists" and left both triggers on `clients`, writing a journal row for
    every write to it, which nobody would ever read or prune once the feed was retired."""
    await pg.conn.execute("CREATE TABLE public.orders (id int PRIMARY KEY)")
    await pg.conn.execute("CREATE TABLE public.customers (id int PRIMARY KEY)")
    both = make_connector(pg.url, ["public.orders", "public.customers"])
    await both.migrate()
    await pg.conn.execute("ALTER TABLE public.customers RENAME TO clients")
    if how == "prune":
        lines = await make_connector(pg.url, ["public.orders"]).migrate(prune=True)
    else:
        lines = await both.unwatch()
    assert await pg.conn.fetchval(CAPTURE_TRIGGERS, "public.clients") == 0, lines
    assert any("public.customers" in line and "public.clients" in line for line in lines), lines
    await pg.conn.execute("INSERT INTO public.clients VALUES (1)")
    assert await pg.conn.fetchval("SELECT count(*) FROM feed.journal") == 0


async def test_a_database_set_up_by_the_first_release_is_brought_up_to_date(
    pg: PgDatabase,
) -> None:
    """What the first release (commit 961bad8) left: migration 0001 only, its triggers enabled
    the plain way, a position, and changes captured while no feed of the new build ran. The new
    build refuses to read until `feed migrate`, which applies the rest and keeps all of it."""
    await pg.conn.execute("CREATE TABLE public.orders (id int PRIMARY KEY, status text)")
    await apply_migrations(pg.conn, "feed", load_migrations()[:1])
    await pg.conn.execute(  # the first release's attach, as it ran then
        "INSERT INTO feed.consumers (name, snapshot) VALUES ('main', pg_current_snapshot()::text);"
        "INSERT INTO feed.watches (consumer, target) VALUES ('main', 'public.orders');"
        "CREATE TRIGGER feed_capture AFTER INSERT OR UPDATE OR DELETE ON public.orders"
        " FOR EACH ROW EXECUTE FUNCTION feed.capture('public.orders');"
        "CREATE TRIGGER feed_capture_truncate AFTER TRUNCATE ON public.orders"
        " FOR EACH STATEMENT EXECUTE FUNCTION feed.capture('public.orders')"
    )
    await pg.conn.execute("INSERT INTO public.orders VALUES (1, 'before the upgrade')")
    connector = make_connector(pg.url, ["public.orders"], auto_migrate=False)
    with pytest.raises(SourceMisconfigured, match=r"3 migration\(s\) pending"):
        await connector.check()
    lines = await connector.migrate()
    assert lines == [
        "applied 0002_partition_truncate.sql",
        "applied 0003_capture_settings.sql",
        "applied 0004_prepared_transactions.sql",
    ]
    states = await pg.conn.fetch(
        "SELECT tgenabled::text FROM pg_trigger WHERE tgrelid = 'public.orders'::regclass"
        " AND tgname LIKE 'feed%'"
    )
    assert [r["tgenabled"] for r in states] == ["A", "A"]  # made to fire always
    assert "journal 1 rows" in await connector.check()
    async with streaming(connector) as stream:
        await pg.conn.execute("INSERT INTO public.orders VALUES (2, 'after')")
        changes = await stream.take(2)
    assert [(c.op, c.key) for c in changes] == [("insert", 1), ("insert", 2)]


async def test_a_schema_migrated_by_a_newer_build_is_said(pg: PgDatabase) -> None:
    """A build gone back to (or an old node during a roll) found the newer build's migrations
    and said "schema 'feed' is up to date (3 migrations applied)"."""
    await pg.conn.execute("CREATE TABLE public.orders (id int PRIMARY KEY)")
    connector = make_connector(pg.url, ["public.orders"], auto_migrate=False)
    await connector.migrate()
    await pg.conn.execute(
        "INSERT INTO feed.migrations (version, name, checksum) VALUES (9999, '9999_later.sql', 'x')"
    )
    lines = await connector.migrate()
    assert [line for line in lines if "9999_later.sql" in line and "newer" in line], lines
    assert "9999_later.sql" in await connector.check()  # said, and still passes
