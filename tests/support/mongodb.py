"""A MongoDB for tests: FEED_TEST_MONGODB_URL if set (a real replica set), else the wire server.

Tests only use what both provide: ordinary commands through PyMongo, and mongod's own
`failCommand` fail point for faults (a real mongod needs `--setParameter enableTestCommands=1`;
without it those tests skip). Each test works in its own database, so a shared real server stays
usable and tests do not see each other's changes.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from pymongo import AsyncMongoClient
from pymongo.errors import OperationFailure

from connectors.mongodb import MongoConnector
from feed.core.change import Change, Gap
from feed.options import Options
from tests.mongo_wire import MongoWireServer

ENV = "FEED_TEST_MONGODB_URL"
STREAM_WAIT = 15.0


@dataclass
class MongoSource:
    url: str
    client: AsyncMongoClient[dict[str, Any]]
    wire: MongoWireServer | None
    """The wire server when no real MongoDB was given (for the few wire-only tests)."""

    @property
    def kind(self) -> str:
        return "wire" if self.wire is not None else "real"

    @staticmethod
    def unique(prefix: str = "feedtest") -> str:
        return f"{prefix}_{uuid.uuid4().hex[:10]}"

    @asynccontextmanager
    async def fail_command(self, mode: Any, data: Mapping[str, Any]) -> AsyncIterator[FailPoint]:
        """mongod's failCommand fail point, on for the block (skips if the server lacks it).

        On leaving, `count` says how many commands it failed, so a test can show its fault
        really happened.
        """
        try:
            on = await self.client.admin.command(
                {"configureFailPoint": "failCommand", "mode": mode, "data": dict(data)}
            )
        except OperationFailure as exc:
            pytest.skip(f"the MongoDB server has no failCommand fail point: {exc}")
        point = FailPoint()
        try:
            yield point
        finally:
            off = await self.client.admin.command(
                {"configureFailPoint": "failCommand", "mode": "off"}
            )
            # mongod counts entries over the fail point's whole life: take the difference.
            point.count = int(off.get("count", 0)) - int(on.get("count", 0))

    async def running(self, command: str, app_name: str) -> bool:
        """Whether a `command` of the client named `app_name` is being served right now (the
        wire server: one it is holding at a fail point; a real server: `currentOp`)."""
        if self.wire is not None:
            return self.wire.in_flight.get((command, app_name), 0) > 0
        ops = await self.client.admin.command(
            {"currentOp": True, f"command.{command}": {"$exists": True}, "appName": app_name}
        )
        return bool(ops.get("inprog"))


@dataclass
class FailPoint:
    count: int = 0


@asynccontextmanager
async def mongo_source() -> AsyncIterator[MongoSource]:
    url = os.environ.get(ENV)
    if url:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            url, tz_aware=True, uuidRepresentation="standard", serverSelectionTimeoutMS=10_000
        )
        try:
            yield MongoSource(url, client, None)
        finally:
            await client.close()
        return
    async with MongoWireServer() as server:
        client = AsyncMongoClient(
            server.url, tz_aware=True, uuidRepresentation="standard", serverSelectionTimeoutMS=5_000
        )
        try:
            yield MongoSource(server.url, client, server)
        finally:
            await client.close()


@pytest.fixture(scope="session")
async def mongodb() -> AsyncIterator[MongoSource]:
    async with mongo_source() as source:
        yield source


@pytest.fixture
async def db(mongodb: MongoSource) -> AsyncIterator[str]:
    """A fresh database with an empty `orders` collection, dropped afterwards."""
    name = MongoSource.unique()
    await mongodb.client[name].create_collection("orders")
    yield name
    await mongodb.client.drop_database(name)


def shop_connector(source: MongoSource, watch: str) -> str:
    """The `[[connectors]]` entry the feed-level tests run: `shop`, watching one namespace of
    `source`, its cursor answering within 200 ms so that a test's changes arrive promptly."""
    return f"""
[[connectors]]
name = "shop"
type = "mongodb"
uri = "{source.url}"
watch = ["{watch}"]
max_await_ms = 200
"""


def make(source: MongoSource, watch: Any, **settings: Any) -> MongoConnector:
    name = settings.pop("name", MongoSource.unique("conn"))
    raw = {"uri": source.url, "watch": watch, "connect_timeout": 5.0, **settings}
    return MongoConnector(name, Options(raw, f"connectors.{name}"))


async def take(stream: AsyncIterator[Change | Gap], count: int) -> list[Change | Gap]:
    got: list[Change | Gap] = []
    async with asyncio.timeout(STREAM_WAIT):
        while len(got) < count:
            got.append(await anext(stream))
    return got


async def changes(stream: AsyncIterator[Change | Gap], count: int) -> list[Change]:
    got = await take(stream, count)
    assert all(isinstance(c, Change) for c in got), got
    return [c for c in got if isinstance(c, Change)]
