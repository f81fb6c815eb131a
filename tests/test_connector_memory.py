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


@pytest.mark.parametrize(
    ("rest", "address"),
    [
        ("a", ("a", None)),
        ("a:b", ("a:b", None)),  # a whole target before a target and a key
        ("a:b:c", ("a:b", "c")),  # the longest target that leaves a key
        ("a:x:y", ("a", "x:y")),  # a key may hold colons
        ("a:", None),  # no key
        ("a:b:", ("a", "b:")),
        ("b", None),
        (":a", None),
    ],
)
def test_a_room_name_resolves_to_the_longest_target_and_its_key(
    rest: str, address: tuple[str, str | None] | None
) -> None:
    """Connector.resolve, shared by every connector but Redis: a lookup per ':' in the name."""
    connector = MemoryConnector("mem", Options({"targets": ["a", "a:b"]}, "test"))
    found = connector.resolve(rest)
    assert ((found.target, found.key) if found is not None else None) == address
