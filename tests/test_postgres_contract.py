"""The Postgres connector held to the shared connector contract (tests/connector_contract.py),
in notify mode and, where the server has wal_level=logical, in logical mode."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest

from connectors.postgres import PostgresConnector
from tests.connector_contract import ConnectorContract
from tests.postgres_helpers import make_connector
from tests.support import postgres as pg_support
from tests.support.postgres import PgDatabase, PgServer

pg_server = pg_support.pg_server

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(90)]


class PostgresHarness:
    """Rows of public.orders keyed by text; fields land in columns and a jsonb column."""

    target = "public.orders"

    def __init__(self, db: PgDatabase, **options: Any) -> None:
        self.db = db
        self.options = options

    def make_connector(self) -> PostgresConnector:
        return make_connector(self.db.url, [self.target], **self.options)

    def row_key(self, key: str) -> str:
        return key

    async def create(self, key: str, fields: Mapping[str, Any]) -> None:
        await self.db.conn.execute(
            "INSERT INTO orders (id, status, amount, extra) VALUES ($1, $2, $3, $4::jsonb)",
            key,
            fields.get("status"),
            fields.get("amount"),
            json.dumps(dict(fields)),
        )

    async def modify(self, key: str, fields: Mapping[str, Any]) -> None:
        await self.db.conn.execute(
            "UPDATE orders SET status = $2, amount = $3, extra = $4::jsonb WHERE id = $1",
            key,
            fields.get("status"),
            fields.get("amount"),
            json.dumps(dict(fields)),
        )

    async def remove(self, key: str) -> None:
        await self.db.conn.execute("DELETE FROM orders WHERE id = $1", key)


async def open_harness(server: PgServer, **options: Any) -> tuple[PgDatabase, PostgresHarness]:
    db = await pg_support.create_database(server)
    await db.conn.execute(
        "CREATE TABLE public.orders (id text PRIMARY KEY, status text, amount numeric, extra jsonb)"
    )
    return db, PostgresHarness(db, **options)


class TestPostgresNotifyConnector(ConnectorContract):
    @pytest.fixture
    async def harness(self, pg_server: PgServer) -> AsyncIterator[PostgresHarness]:
        db, harness = await open_harness(pg_server)
        try:
            yield harness
        finally:
            await pg_support.drop_database(db)
