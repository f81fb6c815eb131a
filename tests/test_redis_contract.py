"""The Redis connector held to the shared connector contract (tests/connector_contract.py).

Redis differs where its nature says so: keyspace events are not durable (a stopped connector
misses what happens meanwhile and announces a gap instead), snapshots are never exact, and the
value is read after the event, so a key deleted meanwhile has no after image.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar

import pytest

from connectors.redis import RedisConnector
from feed.options import Options
from tests.connector_contract import ConnectorContract
from tests.support.redis import RedisTarget, open_redis_target

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


class RedisHarness:
    """Rows are hashes under the test's own prefix; the target is the prefix's pattern."""

    def __init__(self, redis: RedisTarget) -> None:
        self.redis = redis
        self.target = redis.prefix + "*"

    def make_connector(self) -> RedisConnector:
        table = self.redis.config(patterns=[self.target], fetch_values=True)
        return RedisConnector("cache", Options(table, "connectors[0]"))

    def row_key(self, key: str) -> str:
        return self.redis.prefix + key

    async def create(self, key: str, fields: Mapping[str, Any]) -> None:
        await self.redis.admin.hset(
            self.row_key(key), mapping={k: str(v) for k, v in fields.items()}
        )

    async def modify(self, key: str, fields: Mapping[str, Any]) -> None:
        await self.create(key, fields)

    async def remove(self, key: str) -> None:
        await self.redis.admin.delete(self.row_key(key))


class TestRedisConnector(ConnectorContract):
    ops: ClassVar[dict[str, str]] = {"create": "hset", "modify": "hset", "remove": "del"}
    durable = False
    exact_snapshots = False
    images = False  # the value is read after the event: a key deleted meanwhile has none

    @pytest.fixture
    async def harness(self) -> AsyncIterator[RedisHarness]:
        async with open_redis_target() as redis:
            yield RedisHarness(redis)


class StreamHarness:
    """Streams mode with `key_field = "id"`: each entry is a change to the row it names."""

    def __init__(self, redis: RedisTarget) -> None:
        self.redis = redis
        self.target = redis.prefix + "orders"

    def make_connector(self) -> RedisConnector:
        table = self.redis.config(
            mode="streams",
            patterns=[self.target],
            key_field="id",
            offsets_key=self.redis.prefix + "offsets",
        )
        table.pop("configure")
        return RedisConnector("events", Options(table, "connectors[0]"))

    def row_key(self, key: str) -> str:
        return key

    async def create(self, key: str, fields: Mapping[str, Any]) -> None:
        await self.redis.admin.xadd(
            self.target, {"id": key, **{k: str(v) for k, v in fields.items()}}
        )

    async def modify(self, key: str, fields: Mapping[str, Any]) -> None:
        await self.create(key, fields)

    async def remove(self, key: str) -> None:
        await self.redis.admin.xadd(self.target, {"id": key, "deleted": "1"})


class TestRedisStreamsConnector(ConnectorContract):
    """Streams mode keeps the durable half of the contract: restarts lose nothing."""

    ops: ClassVar[dict[str, str]] = {"create": "xadd", "modify": "xadd", "remove": "xadd"}

    @pytest.fixture
    async def harness(self) -> AsyncIterator[StreamHarness]:
        async with open_redis_target() as redis:
            yield StreamHarness(redis)
