"""A watched table's columns changed while the feed runs (ADD, DROP, RENAME COLUMN, ALTER
COLUMN ... TYPE, another primary key): a `gap` for the table, in both modes.

Such an ALTER changes every row (a new column's default, the value in its new type, a new
name) without one row change: a client keeping rows from a snapshot went on showing the old
columns for every row not written since (20,000 rows without the new column, in a probe), with
no sign. The gap makes it reload."""

from __future__ import annotations

from typing import Any

import pytest

from feed.core.change import Gap
from tests.postgres_helpers import make_connector, streaming
from tests.support import postgres as pg_support
from tests.support.postgres import PgDatabase

pg_server = pg_support.pg_server
pg = pg_support.pg

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(90)]


@pytest.fixture(params=["notify", "logical"])
async def connector(request: pytest.FixtureRequest, pg: PgDatabase) -> Any:
    if request.param == "logical" and await pg.server.wal_level() != "logical":
        pytest.skip("the server's wal_level is not logical")
    await pg.conn.execute("CREATE TABLE public.orders (id int PRIMARY KEY, status text, n int)")
    await pg.conn.execute("INSERT INTO orders VALUES (1, 'a', 1)")
    return make_connector(
        pg.url,
        ["public.orders"],
        mode=request.param,
        poll_interval=0.02,
        capture_check_interval=0.1,
    )


@pytest.mark.parametrize(
    ("alter", "said"),
    [
        ("ADD COLUMN extra int DEFAULT 5", "added extra integer"),
        ("DROP COLUMN status", "dropped status"),
        ("RENAME COLUMN status TO state", "added state text; dropped status"),
        ("ALTER COLUMN n TYPE numeric", "n is now numeric (was integer)"),
        (
            "DROP CONSTRAINT orders_pkey, ADD PRIMARY KEY (id, status)",
            "the primary key is now (id, status) (was (id))",
        ),
    ],
)
async def test_a_column_change_is_a_gap_for_the_table(
    connector: Any, pg: PgDatabase, alter: str, said: str
) -> None:
    async with streaming(connector) as stream:
        await pg.conn.execute("UPDATE orders SET n = 2")
        assert (await stream.take(1))[0].after is not None
        await pg.conn.execute(f"ALTER TABLE orders {alter}")  # no row written after it
        gap: Gap = await stream.gap()
        assert gap.target == "public.orders"
        assert f"the columns of public.orders changed ({said})" in gap.reason, gap.reason
        assert "reload" in gap.reason
        # Counted as the capture check's other gaps are (docs/operations.md: every interruption
        # by kind): it was announced to clients but missing from feed_capture_faults_total.
        assert connector.capture_faults == {"columns_changed": 1}
        await pg.conn.execute("UPDATE orders SET n = 3")
        change = (await stream.take(1))[0]
        assert change.after is not None and str(change.after["n"]) == "3"
        if "primary key" in said:  # its rows' keys are by the new key now
            assert change.key == {"id": 1, "status": "a"}
        stream.assert_idle()  # one gap per change of columns, not one per check
