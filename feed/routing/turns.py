"""Snapshots one at a time per client identity, in the order asked.

A connector reads snapshots on a few connections of its own (two for Postgres), handed out in
the order asked. One client that asked for many costly snapshots at once (a filter the source
cannot apply reads the whole table: docs/security.md) held them all, and every other client's
snapshot waited behind its queue: a snapshot of one row by its key failed after 10 s. Taking
turns per identity, each identity has at most one snapshot under way, so the others' wait
behind at most one of its snapshots, not behind all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class Turns:
    """One holder at a time per key; a key is forgotten when nobody holds or awaits it."""

    def __init__(self) -> None:
        self._keys: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    def __len__(self) -> int:
        return len(self._keys)

    @contextlib.asynccontextmanager
    async def turn(self, key: str) -> AsyncIterator[None]:
        entry = self._keys.get(key)
        if entry is None:
            entry = self._keys[key] = (asyncio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._keys[key]
