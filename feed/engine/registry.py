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


class RoomRegistry(EngineCore):
    """Registering this node's rooms, and the reader's routing index built from all nodes'."""

    # -- routing at the reader -----------------------------------------------------------------

    def _target_index(self, connector: str, target: str) -> TargetRooms[Routed]:
        targets = self._index.setdefault(connector, {})
        index = targets.get(target)
        if index is None:
            index = targets[target] = TargetRooms(Routed(f"{connector}:{target}"))
        return index

    def _route_spec(self, spec: Mapping[str, Any]) -> Routed | None:
        connector = spec.get("connector")
        if connector not in self._leases and connector not in self._index:
            return None
        try:
            routed = routed_from_spec(spec)
        except (FeedError, KeyError, TypeError) as exc:
            log.warning("ignoring a bad room spec %r: %s", spec, exc)
            return None
        index = self._target_index(str(connector), str(spec["target"]))
        if routed.name != index.room.name:
            index.discard(routed)
            index.add(routed)
        return routed

    async def _load_index(self, connector: str) -> None:
        """Read the registry: every room some node has members in (expired entries dropped)."""
        now_ms = int(time.time() * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.registry_key(connector))
            pipe.zrangebyscore(self.live_key(connector), now_ms, "+inf")
            pipe.zrangebyscore(self.live_key(connector), "-inf", f"({now_ms}")
            specs, live, dead = await pipe.execute()
        alive = set(live)
        fresh: dict[str, TargetRooms[Routed]] = {}
        self._index[connector] = fresh
        for name, raw in specs.items():
            if name not in alive:
                continue
            with contextlib.suppress(ValueError):
                self._route_spec(loads(raw))
        routed = {i.room.name for t in self._index.values() for i in t.values()}
        routed.update(n for t in self._index.values() for i in t.values() for n in i.names())
        for name in [n for n in self._last_seq if n not in routed]:
            del self._last_seq[name]  # an expired room: forget its number too
        if dead:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hdel(self.registry_key(connector), *dead)
                pipe.zrem(self.live_key(connector), *dead)
                await pipe.execute()

    async def _register(self, room: Room) -> tuple[str, int, int]:
        spec = room_spec(room)
        expiry = int((time.time() + self._live_for()) * 1000)
        result = await self._script(
            "REGISTER",
            [self.registry_key(room.connector), self.live_key(room.connector),
             self.meta_key(room.name)],
            [room.name, dumps(spec), expiry, secrets.token_hex(8), self.ttl_ms],
        )  # fmt: skip
        await self.redis.publish(self.control, dumps({"t": "room", "spec": spec}))
        epoch, seq, gap = result
        return epoch.decode(), int(seq), int(gap)

    def _live_for(self) -> float:
        return self.hub.settings.filter_room_grace + 3 * self.refresh

    async def _refresh_rooms(self) -> None:
        now = time.monotonic()
        grace = self.hub.settings.filter_room_grace
        expiry = int((time.time() + self._live_for()) * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            for mirror in self._mirrors.values():
                room = mirror.room
                if room.empty_since is not None and now - room.empty_since >= grace:
                    continue
                name = room.name
                if room.ephemeral:
                    pipe.hset(self.registry_key(room.connector), name, dumps(room_spec(room)))
                    pipe.zadd(self.live_key(room.connector), {name: expiry}, gt=True)
                pipe.pexpire(self.meta_key(name), self.ttl_ms)
                pipe.pexpire(self.stream_key(name), self.ttl_ms)
            await pipe.execute()
