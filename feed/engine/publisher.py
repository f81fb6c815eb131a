"""The reader side: number, keep and publish each batch of changes in the rooms it matches.

Only the node holding a connector's lease publishes (feed.engine.lease); the batches come from
feed.engine.batch and go out in one script call each (feed.engine.scripts.PUBLISH), under the
fencing token of the reading that read them.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from connectors.base import Connector
from feed.core.change import Change, Gap, format_ts
from feed.core.rooms import leaves
from feed.engine import scripts
from feed.engine.registry import RoomRegistry
from feed.engine.relay import LEFT, room_head
from feed.engine.routes import Routed
from feed.engine.wire import dumps, one_line
from feed.errors import ClusterError

SEEN = 20_000
"""Change ids each connector remembers in Redis, so a new reader does not publish again what the
old one published after the connector's last saved position. The Postgres and MongoDB
connectors save at least every `save_every` / `token_save_every` changes (at most 4,096; logical
mode adds up to `batch_size` of whole transactions not yet confirmed) and Redis streams every
1,000 entries, so 20,000 ids cover what a killed reader leaves unsaved at any rate (for
logical mode, with a `batch_size` below about 15,000)."""

PUBLISHED_BYTES = 1024 * 1024
"""Bytes of payloads one script call publishes on rooms' channels at most; a room's run that
would pass it is published as a reference, and the nodes read it from the room's history.
Everything one call publishes sits whole in each subscriber's output buffer until the call
ends, and Redis cuts a subscriber past `client-output-buffer-limit pubsub` (32 MB, or 8 MB for
a minute, by default): one change of 40 MB (a Postgres jsonb or text row) cut every node that
followed its room, every time. A batch holds at most 256 KiB of change JSON (feed.engine.batch)
but for a single larger change, so an ordinary batch in up to three rooms goes as it did; the
reference costs each node one read of the history (`XRANGE`), small beside the change."""


class Publisher(RoomRegistry):
    """Publishing a connector's changes and gaps, at the node that reads it."""

    def idle(self, connector: Connector) -> Callable[[], None]:
        """What the hub calls when the connector's stream would wait: publish its batch."""
        batcher = self._batchers.get(connector.name)
        return batcher.idle if batcher is not None else (lambda: None)

    async def publish(self, connector: Connector, change: Change) -> None:
        """Hand one change over to be numbered, kept and published with its batch."""
        batcher = self._batchers.get(connector.name)
        if batcher is None or connector.name not in self._leases:
            raise ClusterError(f"{self.node} does not hold the lease on {connector.name!r}")
        await batcher.add(change)

    async def _publish_batch(
        self, connector: Connector, changes: list[Change], token: str, count: int
    ) -> None:
        """Number, keep and publish a batch of changes in every room each one matches, in one
        script call (feed.engine.scripts.PUBLISH) under the fencing token of the reading that
        read them, routed against the rooms known now."""
        name = connector.name
        slots: dict[str, int] = {}
        keys: list[str] = [self.fence_key(name), self.seen_key(name), self.live_key(name)]
        channels: list[str] = []
        flags: list[str] = []
        per_change: list[Any] = []
        routed: list[list[Routed]] = []
        first = self._published
        for change in changes:
            rooms = self._target_index(name, change.target).matching(change)
            routed.append(rooms)
            per_change += [change.id, (count << 32) + self._published, len(rooms)]
            self._published += 1
            tail = change.wire_tail
            for room in rooms:
                slot = slots.get(room.name)
                if slot is None:
                    slot = slots[room.name] = len(slots) + 1
                    keys += [self.meta_key(room.name), self.stream_key(room.name)]
                    channels.append(self.channel(room.name))
                    flags.append("1" if room.key is not None or room.filter is not None else "0")
                left = (room.key is not None or room.filter is not None) and leaves(
                    room.key, room.filter, change
                )
                if room.shape is None and tail is not None:
                    # The change's JSON, encoded once for all its rooms, behind the room's
                    # name: what a node sends is then this text with `seq` spliced in
                    # (feed.engine.relay), the same bytes as a node without [cluster] sends.
                    head = room_head(room.name)
                    per_change += [slot, head + LEFT + tail if left else head + tail]
                    continue
                payload = {"room": room.name, **change.wire}
                if left:
                    payload["left"] = True
                if room.shape is not None:
                    room.shape.apply(change, payload)
                per_change += [slot, dumps(payload)]
        trim = first == 0 or first // 1024 != self._published // 1024
        args: list[Any] = [
            token,
            self.config.history,
            secrets.token_hex(8),
            self.ttl_ms,
            1 if trim else 0,
            SEEN,
            len(slots),
            len(changes),
            PUBLISHED_BYTES,
            int(3 * self.refresh * 1000),
            "".join(flags),
            self.meta_key("").removesuffix(":meta"),
            # The number of the last change this node numbered in a room (numbers grow across
            # readings and readers): Redis holding none that late came back with older data
            # (scripts.PUBLISH begins every room's numbering again then).
            self._acked.get(name, ""),
            *channels,
            *per_change,
        ]
        try:
            seqs = await self._hot_script(scripts.PUBLISH, keys, args)
        except Exception as exc:
            if "STALE" in str(exc):
                if self._leases.get(name) == token:
                    self._leases.pop(name, None)
                raise ClusterError(f"{name}: refused by Redis: {exc}") from None
            raise ClusterError(f"cluster Redis: cannot publish: {one_line(exc)}") from None
        at = 0
        for index, (change, rooms) in enumerate(zip(changes, routed, strict=True)):
            if rooms and int(seqs[at]):  # numbered here: its number is the one in `seen`
                self._acked[name] = (count << 32) + first + index
            if rooms and int(seqs[at]) == 0:  # published already, before a takeover
                self.hub.metrics.inc("feed_cluster_duplicates_dropped_total", connector=name)
                at += len(rooms)
                continue
            for room in rooms:
                seq = int(seqs[at])
                at += 1
                self._last_seq[room.name] = seq
                watch = self._watching.get(room.name)
                if watch is not None:
                    watch.append((seq, change))

    async def publish_gap(self, gap: Gap) -> None:
        batcher = self._batchers.get(gap.connector)
        if batcher is not None:  # the changes before the gap reach the rooms before it
            await batcher.drain()
        names: list[str] = []
        source = self.hub.connectors.get(gap.connector)
        wider = source.parent_target(gap.target) if source and gap.target else None
        for target, index in self._index.get(gap.connector, {}).items():
            if gap.target is None or target in (gap.target, wider):
                if gap.keys is None:
                    names += [index.room.name, *index.names()]
                else:  # some rows only: not the row rooms of every other key
                    names += [index.room.name, *index.filtered]
                    for key in gap.keys:
                        names += index.by_key.get(key, {})
                index.filtered.forget_held()
        await self._gap_rooms(names, gap)

    async def publish_held_gap(self, gap: Gap) -> None:
        """A gap for the connector's filter rooms only, at a new reading of a source without
        before images: the rows they held were the last reader's memory (feed.core.filter_index),
        so a row of theirs that leaves from now on would reach no one. Their clients reload and
        the new snapshots are held here; target and row rooms get every change, and lose
        nothing."""
        names = [
            room.name
            for index in self._index.get(gap.connector, {}).values()
            for room in index.filtered.rooms()
            if room.filter is not None
        ]
        await self._gap_rooms(names, gap)

    async def _gap_rooms(self, names: list[str], gap: Gap) -> None:
        if not names:
            return
        body = dumps({"reason": gap.reason, "ts": format_ts(gap.ts)})
        await self._script(
            "GAP", [self.meta_key(n) for n in names], [body, *(self.channel(n) for n in names)]
        )
