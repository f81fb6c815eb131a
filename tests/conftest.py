"""Shared fixtures. Source fixtures (Postgres, Redis, MongoDB) live in tests/support/."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.server import RunningFeed, running_feed

MEMORY_CONFIG = """
[server]
replay_buffer = 50
filter_room_grace = 0.2

[[connectors]]
name = "mem"
type = "memory"
targets = ["public.orders", "public.customers"]
"""


@pytest.fixture
async def memory_feed() -> AsyncIterator[RunningFeed]:
    async with running_feed(MEMORY_CONFIG) as feed:
        yield feed
