"""Subscribe and resume on any node: the ack's numbers, recovery and catch-up from Redis.

A resume with `since` and `epoch` is answered `recovered: true` only when this node's ring or the
room's stream still holds everything after `since`; the catch-up then replays it (or the rest of a
snapshot) before the member goes live.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from typing import Any

from connectors.base import Connector, RoomAddress
from feed.core.rooms import Room
from feed.core.snapshots import SnapshotChunk, chunk_event, gap_event, snapshot_ack
from feed.delivery.protocol import SubscribeRequest
from feed.engine.core import log
from feed.engine.delivery import Delivery
from feed.engine.mirror import Mirror
from feed.engine.snapshots import SnapshotPlan
from feed.engine.wire import one_line
from feed.errors import ProtocolError
from feed.routing.hub import CatchUp, shared_start


class Resume(Delivery):
    """The hub's subscribe for a cluster room."""

    # -- subscribe and resume on any node ------------------------------------------------------

    async def subscribe(
        self,
        sid: str,
        request: SubscribeRequest,
        room: Room,
        connector: Connector,
        address: RoomAddress,
        mask: Callable[[Mapping[str, Any]], Mapping[str, Any] | None] | None,
    ) -> dict[str, Any]:
        """The hub's subscribe once the room exists here: numbers and history from Redis."""
        hub = self.hub
        mirror = await self.watch(room)
        seq = mirror.seq or 0
        cursor = seq
        recovered: bool | None = None
        if request.since is not None:
            same_epoch = request.epoch is None or request.epoch == mirror.epoch
            epoch = mirror.epoch
            recovered = same_epoch and await self._holds_after(mirror, request.since)
            if mirror.epoch != epoch:
                # The listener took the room into a new epoch while the history was read: the
                # answer is the new epoch's numbers, not a recovery in it from the old one's.
                recovered = False
                seq = cursor = mirror.seq or 0
            if recovered:
                cursor = request.since
        already, previous = hub._join(sid, room)
        gaps = room.gaps
        ack: dict[str, Any] = {
            "ok": True,
            "room": room.name,
            "seq": seq,
            "recovered": recovered,
            "epoch": mirror.epoch,
        }
        plan: SnapshotPlan | None = None
        rest: list[SnapshotChunk] = []
        gap: str | None = None
        if request.snapshot and not recovered:
            try:
                answer = await self._snapshot(room, address)
            except BaseException:
                hub._leave(sid, room)
                raise
            plan = SnapshotPlan(int(answer["upto"]), frozenset(answer["uncovered"]))
            gap = answer.get("gap")  # the rows are not sure (the reader says why)
            # `keys` is absent in the answer of a reading node older than snapshot keys.
            fields, rest = snapshot_ack(
                answer["rows"],
                answer.get("keys"),
                mask,
                bool(answer["truncated"]),
                hub.settings.snapshot_chunk_bytes,
            )
            ack.update(fields)
            ack["seq"] = cursor
            ack["snapshot_upto"] = max(cursor, plan.upto)  # as a single node's (Hub.subscribe)
        filtered, start = shared_start(already, previous, cursor)
        catch_up = self._catch_up(sid, mirror, start, plan if filtered else None, rest, gap, gaps)
        hub._spawn(catch_up)
        return ack

    async def _holds_after(self, mirror: Mirror, since: int) -> bool:
        seq = mirror.seq or 0
        if since > seq or since < 0 or (mirror.gap and since <= mirror.gap):
            return False
        if since == seq:
            return True
        ring = mirror.ring
        if ring and ring[0][0] <= since + 1:
            return True
        try:
            # In one step with the room's epoch: a stream of another numbering holds other
            # changes under the same seqs (feed.engine.history).
            read = await self._history_read(mirror.room.name, mirror.epoch, since, seq, count=1)
        except Exception as exc:
            raise ProtocolError(
                "cluster_unavailable", f"the cluster's Redis is unreachable ({one_line(exc)})"
            ) from None
        return bool(read.entries)

    async def _catch_up(
        self,
        sid: str,
        mirror: Mirror,
        cursor: int,
        plan: SnapshotPlan | None,
        chunks: list[SnapshotChunk],
        gap: str | None = None,
        gaps: int = 0,
    ) -> None:
        """Send a new member the rest of its snapshot and what it missed after `cursor`, then
        let it go live (as the hub's own catch-up: the member leaves `pending` in the step that
        finds nothing newer; a newer subscribe of the same client to the room supersedes it)."""
        room = mirror.room
        hub = self.hub
        transport = hub.transport
        key = (sid, room.name)
        token = hub._catch_ups[key] = CatchUp(cursor)
        try:
            if chunks and transport is not None:
                total = len(chunks) + 1
                for index, chunk in enumerate(chunks, start=2):
                    if sid not in room.pending or hub._catch_ups.get(key) is not token:
                        return
                    body = chunk_event(room.name, index, total, chunk)
                    await transport.send_paced(sid, "snapshot", body)
            if gap is not None and transport is not None:
                body = gap_event(
                    room.connector, room.name, room.target, gap, mirror.seq or 0, mirror.epoch
                )
                await transport.send_to(sid, "gap", body)
            while sid in room.pending and hub._catch_ups.get(key) is token:
                seq = mirror.seq or 0
                if room.gaps != gaps and transport is not None:
                    # Announced since it joined: heard before its answer, with no room to go
                    # to in a client (the hub's catch-up says more).
                    gaps = room.gaps
                    reason = room.gap_reason or "the source may have lost changes"
                    body = gap_event(
                        room.connector, room.name, room.target, reason, seq, mirror.epoch
                    )
                    await transport.send_to(sid, "gap", body)
                    continue
                if plan is not None and seq < plan.upto:
                    advanced = mirror.advanced
                    if advanced is None:
                        advanced = mirror.advanced = asyncio.Event()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(advanced.wait(), 1.0)
                    continue
                if seq > cursor:
                    entries = await self._read(mirror, cursor, seq)
                    if entries is None:
                        if transport is not None:
                            reason = "the room's history no longer holds what was missed"
                            body = gap_event(
                                room.connector, room.name, room.target, reason, seq, mirror.epoch
                            )
                            await transport.send_to(sid, "gap", body)
                        cursor = seq
                        continue
                    batch = [p for s, p in entries if plan is None or plan.keeps(s)]
                    cursor = seq
                    if batch and transport is not None:
                        await transport.send_to(sid, "changes", batch)
                        hub.metrics.inc("feed_changes_replayed_total", len(batch))
                    token.sent = cursor
                    continue
                room.pending.discard(sid)
                return
        except Exception:
            log.exception("catch-up for %s in %s failed", sid, room.name)
            room.pending.discard(sid)
        finally:
            if hub._catch_ups.get(key) is token:
                del hub._catch_ups[key]
