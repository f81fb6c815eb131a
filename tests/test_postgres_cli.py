"""`feed migrate` and `feed unwatch` run as a user runs them, against a real Postgres."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from tests.support import postgres as pg_support
from tests.support.postgres import PgDatabase
from tests.support.server import free_port

pg_server = pg_support.pg_server
pg = pg_support.pg

ROOT = Path(__file__).parent.parent
TRIGGERS = "SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::regclass AND NOT tgisinternal"


async def feed(*args: str, database_url: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "feed", *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT), "DATABASE_URL": database_url},
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_migrate_then_unwatch_from_the_command_line(pg: PgDatabase, tmp_path: Path) -> None:
    await pg.conn.execute("CREATE TABLE public.orders (id int PRIMARY KEY, status text)")
    config = tmp_path / "feed.toml"
    config.write_text(
        "[[connectors]]\nname = 'main'\ntype = 'postgres'\n"
        "dsn = '${DATABASE_URL}'\ntables = ['public.orders']\n"
    )
    code, out, err = await feed("migrate", "--config", str(config), database_url=pg.url)
    assert code == 0, err
    assert "main: watching public.orders" in out.splitlines()
    assert await pg.conn.fetchval(TRIGGERS, "public.orders") == 2

    code, out, err = await feed(
        "unwatch", "--config", str(config), "--connector", "nope", database_url=pg.url
    )
    assert code == 2 and err.strip().endswith("no Postgres connector named 'nope' to unwatch")

    code, out, err = await feed("unwatch", "--config", str(config), database_url=pg.url)
    assert code == 0, err
    assert "main: unwatched public.orders (capture triggers dropped)" in out.splitlines()
    assert await pg.conn.fetchval(TRIGGERS, "public.orders") == 0


async def test_an_unreachable_source_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """Exit 2 is for configuration mistakes; a database that is down is a source failing."""
    config = tmp_path / "feed.toml"
    config.write_text(
        "[[connectors]]\nname = 'main'\ntype = 'postgres'\n"
        "dsn = '${DATABASE_URL}'\ntables = ['public.orders']\nconnect_timeout = 2.0\n"
    )
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    for command in ("migrate", "unwatch", "check"):
        code, out, err = await feed(command, "--config", str(config), database_url=closed)
        assert code == 1, (command, out, err)
        assert "Traceback" not in err, err
        if command != "check":
            assert err.startswith("feed: ") and err.count("\n") == 1 and "connect" in err, err


async def test_check_fails_while_migrations_are_pending_and_names_the_command(
    pg: PgDatabase, tmp_path: Path
) -> None:
    """`feed check` must not say ok when `feed serve` would keep the connector down."""
    await pg.conn.execute("CREATE TABLE public.orders (id int PRIMARY KEY, status text)")
    config = tmp_path / "feed.toml"
    config.write_text(
        "[[connectors]]\nname = 'main'\ntype = 'postgres'\n"
        "dsn = '${DATABASE_URL}'\ntables = ['public.orders']\n"
    )
    code, out, err = await feed("check", "--config", str(config), database_url=pg.url)
    assert code == 1, out + err
    row = next(line for line in out.splitlines() if line.startswith("main"))
    assert "FAIL" in row and "migration(s) pending" in row
    assert f"run `feed migrate --config {config}`" in row

    code, out, err = await feed("migrate", "--config", str(config), database_url=pg.url)
    assert code == 0, err
    code, out, err = await feed("check", "--config", str(config), database_url=pg.url)
    assert code == 0, out + err
    assert "journal 0 rows" in out

    # A table added to `tables` since: new, not "dropped"; attached by the next migrate.
    await pg.conn.execute("CREATE TABLE public.refunds (id int PRIMARY KEY)")
    config.write_text(
        config.read_text().replace("['public.orders']", "['public.orders', 'public.refunds']")
    )
    code, out, err = await feed("check", "--config", str(config), database_url=pg.url)
    assert code == 1, out + err
    row = next(line for line in out.splitlines() if line.startswith("main"))
    assert "public.refunds not attached yet (added to `tables` since the last" in row
    assert "dropped" not in row
    code, out, err = await feed("migrate", "--config", str(config), database_url=pg.url)
    assert code == 0, err
    code, out, err = await feed("check", "--config", str(config), database_url=pg.url)
    assert code == 0, out + err


async def test_check_names_the_dsn_parameter_behind_a_refusal(
    pg: PgDatabase, tmp_path: Path
) -> None:
    """`feed check` printed asyncpg's or the server's words for a dsn parameter: "cannot
    connect: target_session_attrs is expected to be one of <built-in method values of
    mappingproxy object at 0x...>, got 'bogus'", "cannot connect: unrecognized configuration
    parameter "foo"" (as if the server were down). What asyncpg refuses is a config mistake now,
    exit 2; what only the server can judge (asyncpg sends it every parameter it does not read)
    is a FAIL row naming the connector and the parameter."""
    config = tmp_path / "feed.toml"
    config.write_text(
        "[[connectors]]\nname = 'main'\ntype = 'postgres'\n"
        "dsn = '${DATABASE_URL}'\ntables = ['public.orders']\n"
    )
    joined = "&" if "?" in pg.url else "?"
    at_start = {
        "target_session_attrs=bogus": "target_session_attrs=bogus is not one of any, primary, "
        "standby, prefer-standby, read-write, read-only",
        "connect_timeout=5": "?connect_timeout= is libpq's, which asyncpg does not read: it "
        "would reach the server as a setting it refuses; remove it (set the connector's "
        "connect_timeout)",
        "dbname=other": "gives the database in its path and again as ?dbname=, which asyncpg "
        "ignores: keep one",
    }
    for parameter, expected in at_start.items():
        url = pg.url + joined + parameter
        code, out, err = await feed("check", "--config", str(config), database_url=url)
        assert code == 2 and out == "", (parameter, out, err)
        assert err.splitlines() == [f"feed: {config}: connectors[0].dsn: {expected}"], err
    by_server = {
        "foo=bar": "dsn parameter ?foo=: Postgres refuses it as a setting (unrecognized "
        'configuration parameter "foo"); asyncpg sends each parameter it does not read to the '
        "server: fix or remove it",
        "statement_timeout=abc": "dsn parameter ?statement_timeout=: Postgres refuses it as a "
        'setting (invalid value for parameter "statement_timeout": "abc"); asyncpg sends each',
    }
    for parameter, expected in by_server.items():
        url = pg.url + joined + parameter
        code, out, err = await feed("check", "--config", str(config), database_url=url)
        assert code == 1, (parameter, out, err)
        [row] = [line for line in out.splitlines() if line.startswith("main ")]
        assert "FAIL" in row and expected in row and "cannot connect" not in row, row


async def test_check_warns_of_a_row_rule_naming_a_column_a_table_lacks(
    pg: PgDatabase, tmp_path: Path
) -> None:
    """A rule allowing `main:public.*` with `row_filter = "tenant_id=eq.{tenant}"` over a
    table without `tenant_id` refuses every subscribe to that table (`forbidden`); the
    operator heard of it only when a tenant tried. `feed check` reads the tables: it says so."""
    await pg.conn.execute("CREATE TABLE public.orders (id int PRIMARY KEY, tenant_id text)")
    await pg.conn.execute("CREATE TABLE public.customers (id int PRIMARY KEY, name text)")
    config = tmp_path / "feed.toml"
    config.write_text(
        "[[connectors]]\nname = 'main'\ntype = 'postgres'\nauto_migrate = true\n"
        "dsn = '${DATABASE_URL}'\ntables = ['public.orders', 'public.customers']\n\n"
        "[[auth.rules]]\nroles = ['admin']\nallow = ['*']\n\n"
        "[[auth.rules]]\nroles = ['tenant']\nallow = ['main:public.*']\n"
        "row_filter = 'tenant_id=eq.{tenant}'\n"
    )
    code, out, err = await feed("check", "--config", str(config), database_url=pg.url)
    assert code == 0, out + err
    assert (
        "warning: auth.rules[1] allows main:public.customers with row_filter "
        "'tenant_id=eq.{tenant}', but public.customers has no column 'tenant_id': "
        "subscribes to it are refused (forbidden)"
    ) in out, out
    assert "public.orders has no column" not in out
