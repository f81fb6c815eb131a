"""Reads of a room's history: from this node's ring of recent payloads, else the Redis stream.

Used to fill a hole the listener saw and to replay what a resuming client missed; `None` means
Redis no longer holds all of it, which the callers turn into a `gap` or `recovered: false`.
"""

from __future__ import annotations

from typing import Any

from feed.engine.mirror import Mirror
from feed.engine.snapshots import Snapshots
from feed.engine.wire import loads


class History(Snapshots):
    """Reading a range of a room's seqs back."""

    async def _history(
        self, room: str, after: int, upto: int
    ) -> list[tuple[int, dict[str, Any]]] | None:
        """Entries after..upto from the room's stream, or None when Redis no longer holds all."""
        raw = await self._history_raw(room, after, upto)
        if raw is None:
            return None
        entries = []
        for seq, data in raw:
            payload = loads(data)
            payload["seq"] = seq
            entries.append((seq, payload))
        return entries

    async def _history_raw(
        self, room: str, after: int, upto: int
    ) -> list[tuple[int, bytes]] | None:
        """The payloads after..upto as the reader wrote them, or None when Redis no longer
        holds all of them."""
        if upto <= after:
            return []
        raw = await self.redis.xrange(self.stream_key(room), f"{after + 1}-0", f"{upto}-1")
        entries = [(int(entry_id.split(b"-")[0]), fields[b"d"]) for entry_id, fields in raw]
        if len(entries) != upto - after or (entries and entries[0][0] != after + 1):
            return None
        return entries

    async def _read(self, mirror: Mirror, after: int, upto: int) -> list[tuple[int, Any]] | None:
        ring = mirror.ring
        if ring and ring[0][0] <= after + 1 and ring[-1][0] >= upto:
            return [(s, p) for s, p in ring if after < s <= upto]
        return await self._history(mirror.room.name, after, upto)
