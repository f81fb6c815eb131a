"""A real feed on a real Postgres for the JavaScript client's tests (client_harness commands).

The memory connector hands the server Python values; only a Postgres connector shows what a
`bigint` or a `numeric` column really becomes on the wire, and so what a JavaScript client reads
of it (a `bigint` past 2^53 is where JSON.parse rounds). One database of its own per start, on
FEED_TEST_POSTGRES_URL (notify mode), or on an embedded server where that is unset or where the
mode is logical and its wal_level is not.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from tests.support.postgres import (
    ENV_URL,
    PgDatabase,
    PgServer,
    create_database,
    drop_database,
    start_embedded,
)
from tests.support.server import running_feed

CONNECTOR = """
[server]
replay_buffer = 1000

[[connectors]]
name = "pg"
type = "postgres"
dsn = "{dsn}"
tables = {tables}
auto_migrate = true
mode = "{mode}"
poll_interval = 0.02
"""


class PgFeed:
    """`start` a database with the test's tables and a feed following them; `sql` writes."""

    def __init__(self) -> None:
        self.stack = contextlib.AsyncExitStack()
        self.db: PgDatabase | None = None

    async def start(self, setup: str, tables: list[str], mode: str = "notify") -> str:
        if mode not in ("notify", "logical"):
            raise ValueError(f"mode {mode!r}: notify or logical")
        server = await self._server(mode)
        db = self.db = await create_database(server)
        self.stack.push_async_callback(drop_database, db)
        await db.conn.execute(setup)
        text = CONNECTOR.format(dsn=db.url, tables=repr(tables).replace("'", '"'), mode=mode)
        feed = await self.stack.enter_async_context(running_feed(text))
        return feed.url

    async def _server(self, mode: str) -> PgServer:
        url = os.environ.get(ENV_URL)
        if url:
            server = PgServer(url)
            if mode == "notify" or await server.wal_level() == "logical":
                return server
        embedded = start_embedded()
        self.stack.callback(embedded.close)
        return PgServer(embedded.url(), embedded)

    async def sql(self, text: str) -> Any:
        assert self.db is not None, "pg_start first"
        return await self.db.conn.execute(text)

    async def stop(self) -> None:
        await self.stack.aclose()
