"""Reads of a room's history: from this node's ring of recent payloads, else the Redis stream.

Used to fill a hole the listener saw, to read a run published as a reference, and to replay
what a resuming client missed. Every read of the stream is checked against the epoch the node
expects, in the same step as the read (MULTI: the room's meta and the entries together): the
stream is the room's current numbering's, so once Redis lost a room's meta and a new epoch
reached the same seqs, the same ids name other changes. A read that finds another epoch, or
not all it asked for, gives nothing, which the callers turn into a `gap` or `recovered: false`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from feed.engine.mirror import Mirror
from feed.engine.snapshots import Snapshots
from feed.engine.wire import loads


@dataclass(frozen=True)
class Read:
    """What one history read found: the room's numbering in Redis as of the read, and the
    entries asked for, or None when they are not all there in the epoch expected."""

    epoch: str | None
    """The room's epoch in Redis (None: it has no numbering there now)."""
    seq: int
    gap: int
    """The seq up to which the room's history is not to be trusted (scripts.GAP), or 0."""
    entries: list[tuple[int, bytes]] | None


class History(Snapshots):
    """Reading a range of a room's seqs back."""

    async def _history(
        self, room: str, epoch: str | None, after: int, upto: int
    ) -> list[tuple[int, dict[str, Any]]] | None:
        """Entries after..upto of `epoch`, or None when Redis no longer holds all of them."""
        raw = (await self._history_read(room, epoch, after, upto)).entries
        if raw is None:
            return None
        entries = []
        for seq, data in raw:
            payload = loads(data)
            payload["seq"] = seq
            entries.append((seq, payload))
        return entries

    async def _history_read(
        self, room: str, epoch: str | None, after: int, upto: int, count: int | None = None
    ) -> Read:
        """The payloads after..upto as the reader wrote them (at most `count`, the first ones),
        read in one step with the room's epoch and seq: `entries` None unless the epoch is
        `epoch`, its seq reaches `upto` and the stream holds every entry asked for."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hmget(self.meta_key(room), "epoch", "seq", "gap")
            if upto > after:
                pipe.xrange(self.stream_key(room), f"{after + 1}-0", f"{upto}-1", count=count)
            replies = await pipe.execute()
        found, seq_text, gap_text = replies[0]
        found_epoch = found.decode() if found is not None else None
        seq, gap = int(seq_text or 0), int(gap_text or 0)
        if found_epoch is None or found_epoch != epoch or seq < upto:
            return Read(found_epoch, seq, gap, None)
        if upto <= after:
            return Read(found_epoch, seq, gap, [])
        entries = [(int(entry_id.split(b"-")[0]), fields[b"d"]) for entry_id, fields in replies[1]]
        wanted = upto - after if count is None else min(count, upto - after)
        if len(entries) != wanted or (entries and entries[0][0] != after + 1):
            return Read(found_epoch, seq, gap, None)
        return Read(found_epoch, seq, gap, entries)

    async def _read(self, mirror: Mirror, after: int, upto: int) -> list[tuple[int, Any]] | None:
        ring = mirror.ring
        if ring and ring[0][0] <= after + 1 and ring[-1][0] >= upto:
            return [(s, p) for s, p in ring if after < s <= upto]
        return await self._history(mirror.room.name, mirror.epoch, after, upto)
