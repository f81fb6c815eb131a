"""The in-memory connector held to the shared connector contract."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from connectors.memory import MemoryConnector
from feed.options import Options
from tests.connector_contract import ConnectorContract


class MemoryHarness:
    target = "public.orders"

    def __init__(self) -> None:
        self.connector: MemoryConnector | None = None

    def make_connector(self) -> MemoryConnector:
        self.connector = MemoryConnector("mem", Options({"targets": [self.target]}, "test"))
        return self.connector

    def row_key(self, key: str) -> str:
        return key

    async def create(self, key: str, fields: Mapping[str, Any]) -> None:
        assert self.connector is not None
        self.connector.write(self.target, "insert", {"id": key, **fields})

    async def modify(self, key: str, fields: Mapping[str, Any]) -> None:
        assert self.connector is not None
        self.connector.write(self.target, "update", {"id": key, **fields})

    async def remove(self, key: str) -> None:
        assert self.connector is not None
        self.connector.write(self.target, "delete", {"id": key})


class TestMemoryConnector(ConnectorContract):
    durable = False  # nothing survives a new instance: it is memory

    @pytest.fixture
    def harness(self) -> MemoryHarness:
        return MemoryHarness()
