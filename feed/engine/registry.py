"""The room registry in Redis: which row and filter rooms exist anywhere in the cluster.

Every node that has members in a room keeps its spec registered with an expiry time it refreshes;
the reader loads the registry into its routing index and drops entries nobody refreshed, so a
room expires when no node has members (after the grace period), without a scan.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Mapping
from typing import Any

from feed.core.rooms import Room
from feed.core.targets import TargetRooms
from feed.engine.core import EngineCore, log
from feed.engine.routes import Routed, room_spec, routed_from_spec
from feed.engine.wire import dumps, loads
from feed.errors import FeedError

REFRESH_CHUNK = 1000
"""Rooms per refresh script call: each call holds Redis a few milliseconds at most."""


class RoomRegistry(EngineCore):
    """Registering this node's rooms, and the reader's routing index built from all nodes'."""

    # -- routing at the reader -----------------------------------------------------------------

    def _target_index(self, connector: str, target: str) -> TargetRooms[Routed]:
        targets = self._index.setdefault(connector, {})
        index = targets.get(target)
        if index is None:
            source = self.hub.connectors.get(connector)
            track = source is not None and not source.before_images
            wider = source.parent_target(target) if source is not None else None
            parent = self._target_index(connector, wider) if wider is not None else None
            index = TargetRooms(Routed(f"{connector}:{target}"), track=track, parent=parent)
            targets[target] = index
        return index

    def _route_spec(self, spec: Mapping[str, Any]) -> Routed | None:
        connector = spec.get("connector")
        if connector not in self._leases and connector not in self._index:
            return None
        try:
            routed = routed_from_spec(spec)
        except (FeedError, KeyError, TypeError) as exc:
            name = str(spec.get("name"))[:200]
            if name not in self._bad_specs and len(self._bad_specs) < 10_000:
                self._bad_specs.add(name)
                log.warning("ignoring the room %s: its spec cannot be read: %s", name, exc)
            return None
        target = str(spec["target"])
        index = self._target_index(str(connector), target)
        if routed.name != index.room.name:
            index.discard(routed, forget=False)  # the same room again: the rows it holds stay
            index.add(routed)
            self._route_count += 1
            known = self._routed.setdefault(str(connector), {})
            known[routed.name.encode()] = (target, routed, self._route_count)
        return routed

    async def _load_index(self, connector: str) -> None:
        """Bring the routing index in line with the registry: every room some node has members
        in (expired entries dropped, here and in Redis, with their numbers and history: see
        scripts.LIVE).

        Only the names are read each time; a spec is read and parsed only for a room not
        routed yet. Re-reading and re-parsing every spec every `refresh` seconds cost the
        reader 0.3 s of blocked loop at 10,000 filter rooms and 2 s at 50,000 (docs/scaling.md).
        A room routed after the names were read (from the control channel) is kept.
        """
        self._index.setdefault(connector, {})
        known = self._routed.setdefault(connector, {})
        asked_at = self._route_count
        # Live by Redis's clock, as the expiries were set (scripts.NOW_MS); the expired ones
        # are dropped by the same script, with their numbers and history.
        # In a pipeline, as before: redis-py retries a pipeline on a pooled connection found
        # closed (the first call after a Redis restart), not a lone script call.
        async with self.redis.pipeline(transaction=False) as pipe:
            await self._scripts["LIVE"](
                keys=[self.live_key(connector), self.registry_key(connector)],
                args=[self.meta_key("").removesuffix(":meta")],
                client=pipe,
            )
            (live,) = await pipe.execute()
        alive = set(live)
        for name in known.keys() - alive:
            target, routed, routed_at = known[name]
            if routed_at > asked_at:
                continue  # routed while the names were read: newer than what they say
            del known[name]
            index = self._index[connector].get(target)
            if index is not None:
                index.discard(routed)
            self._last_seq.pop(routed.name, None)  # an expired room: forget its number too
        new = list(alive - known.keys())
        if new:
            specs = await self.redis.hmget(self.registry_key(connector), new)
            for raw in specs:
                if raw is not None:
                    with contextlib.suppress(ValueError):
                        self._route_spec(loads(raw))

    async def _register(
        self, room: Room, delivered: tuple[str | None, int | None] = (None, None)
    ) -> tuple[str, int, int]:
        """Register `room`; `delivered`: the epoch and seq this node has delivered it up to,
        so that a numbering Redis took back below that (it came back with older data) begins
        again, in a new epoch, instead of giving those numbers to other changes
        (scripts.REGISTER)."""
        spec = room_spec(room)
        epoch, seq = delivered
        known = [seq, epoch] if epoch is not None and seq is not None else []
        result = await self._script(
            "REGISTER",
            [self.registry_key(room.connector), self.live_key(room.connector),
             self.meta_key(room.name), self.stream_key(room.name)],
            [room.name, dumps(spec), self._live_ms(), secrets.token_hex(8), self.ttl_ms,
             self.control, self.channel(room.name), *known],
        )  # fmt: skip
        epoch, seq, gap = result
        return epoch.decode(), int(seq), int(gap)

    def _live_ms(self) -> int:
        """How long a registration keeps a room alive without a refresh, in ms; Redis adds its
        own clock's time (scripts.NOW_MS), so the nodes' clocks never meet in the registry."""
        return int((self.hub.settings.filter_room_grace + 3 * self.refresh) * 1000)

    def _keeps(self, room: Room, now: float) -> bool:
        """Whether this node keeps `room` registered: it has members, or lost them less than
        `filter_room_grace` ago (a reconnecting client may resume in it)."""
        empty = room.empty_since
        return empty is None or now - empty < self.hub.settings.filter_room_grace

    async def _refresh_rooms(self) -> None:
        """Keep this node's followed rooms alive: their registry expiry, and their history's
        and numbering's TTL. One script call per connector and `REFRESH_CHUNK` rooms: a
        redis-py pipeline of four commands a room cost the node 1.4 s of CPU per refresh at
        10,000 followed rooms (docs/scaling.md). A row or filter room the registry lost (the
        reader dropped it as expired while this node was late) is registered again at once."""
        now = time.monotonic()
        expiry = self._live_ms()
        followed: dict[str, list[Room]] = {}
        for mirror in self._mirrors.values():
            room = mirror.room
            if not self._keeps(room, now):
                continue
            followed.setdefault(room.connector, []).append(room)
        for connector, rooms in followed.items():
            for start in range(0, len(rooms), REFRESH_CHUNK):
                keys: list[str] = [self.registry_key(connector), self.live_key(connector)]
                args: list[Any] = [expiry, self.ttl_ms]
                for room in rooms[start : start + REFRESH_CHUNK]:
                    keys += [self.meta_key(room.name), self.stream_key(room.name)]
                    args += [room.name, 1 if room.ephemeral else 0]
                missing = await self._script("REFRESH", keys, args)
                lost = [self._mirrors.get(raw.decode()) for raw in missing or ()]
                await self._announce_rooms(connector, [m.room for m in lost if m is not None])

    async def _announce_rooms(self, connector: str, rooms: list[Room]) -> None:
        """Put rooms back in the registry and tell the reader to route them, in one round
        trip: one command each would make a late refresh later still, and more rooms lapse."""
        if not rooms:
            return
        specs = [room_spec(room) for room in rooms]
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(
                self.registry_key(connector),
                mapping={spec["name"]: dumps(spec) for spec in specs},
            )
            pipe.publish(self.control, dumps({"t": "rooms", "specs": specs}))
            await pipe.execute()
