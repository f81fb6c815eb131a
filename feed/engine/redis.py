"""The Redis engine: several `feed serve` nodes share room numbers, history and fan-out.

Shape (modelled on Centrifugo's Redis engine and python-socketio's pub/sub manager):

- One reader per connector across the cluster: a lease (`SET NX PX`, renewed) with a fencing
  token from `INCR`. Only the holder runs the connector; every publication carries the token and
  the publish script refuses a stale one, so a paused old reader cannot write after a takeover.
  The source-side guards (Postgres's advisory lock) stay as they are.
- The reader routes each change to the rooms that exist anywhere in the cluster: target rooms
  always, row and filter rooms from a registry in Redis (a hash of room specs, a sorted set of
  expiry times refreshed by every node that has members). It learns new rooms from a control
  channel at once and re-reads the registry periodically, so a lost message costs only a delay.
- For the matched rooms, one Lua script numbers the changes of a batch (what the connector had
  ready at once, feed.engine.batch), appends each to the room's stream (`XADD ... MAXLEN ~
  history`, the stream ID being the seq) and `PUBLISH`es the room's run of the batch to the
  room's channel in one message. A room whose meta is gone (Redis restarted without persistence, `FLUSHALL`)
  gets a new epoch: a resume against the old one answers `recovered: false`, never a hole.
- Each node subscribes only to the channels of rooms its own clients follow, mirrors their seq
  and a short ring of recent payloads, and delivers to its local members. A hole in the seqs it
  receives (a dropped pub/sub connection, a reconnect) is filled from the stream, or announced
  with a `gap` when Redis no longer holds it.
- Snapshots are taken by the reader (the only node whose connector runs), on request over Redis
  pub/sub: it adds the room to its routing first, takes the snapshot, and answers which of the
  room's seqs the rows do not already reflect, so the subscriber's node replays exactly those.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from connectors.base import Connector, RoomAddress, State, Status
from feed.core.change import Change, Gap, format_ts, to_json
from feed.core.filter_index import FilterIndex
from feed.core.filters import RowFilter, parse_filter
from feed.core.rooms import Room
from feed.core.snapshots import SnapshotChunk, chunk_event, split_snapshot, visible
from feed.delivery.protocol import SubscribeRequest
from feed.engine import ClusterConfig
from feed.engine.batch import Batcher
from feed.errors import ClusterError, FeedError, ProtocolError, SnapshotNotSupported
from feed.security.access import Shape, ShapedRoom

if TYPE_CHECKING:
    from feed.routing.hub import Hub

log = logging.getLogger("feed.engine.redis")

BACKOFF_START = 0.2
BACKOFF_MAX = 2.0
SNAPSHOT_TIMEOUT = 30.0
SUBSCRIBE_TIMEOUT = 5.0
SEEN = 20_000
"""Change ids each connector remembers in Redis, so a new reader does not publish again what the
old one published after the connector's last saved position (saved at least every
`save_interval`: 20,000 ids cover 40,000 changes/s at the Postgres default of 0.5 s)."""
RING = 256
"""Recent payloads each node keeps per followed room, so most catch-ups need no Redis read."""

try:
    import orjson

    def _dumps(value: Any) -> bytes:
        return orjson.dumps(value)

    _loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover

    def _dumps(value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode()

    _loads = json.loads


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


@dataclass(eq=False)
class Mirror:
    """This node's view of one room it has members in: seq, epoch and recent payloads."""

    room: Room
    channel: bytes
    epoch: str | None = None
    seq: int | None = None
    gap: int = 0
    ready: bool = False
    ring: deque[tuple[int, dict[str, Any]]] = field(default_factory=lambda: deque(maxlen=RING))
    advanced: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held while the room is being subscribed and registered."""
    order: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held while changes are applied, so a resync and the listener never interleave."""


@dataclass(eq=False)
class Routed:
    """A room as the reader routes it: rebuilt from its registry spec on any node."""

    name: str
    key: str | None = None
    filter: RowFilter | None = None
    shape: Shape | None = None


@dataclass
class TargetIndex:
    """The routed rooms of one target at the reader (its cost grows with distinct rooms only)."""

    room: Routed
    by_key: dict[str, dict[str, Routed]] = field(default_factory=dict)
    filtered: FilterIndex[Routed] = field(default_factory=FilterIndex)
    """Filter rooms indexed by their eq/in conditions, as the hub's are (feed.core.filter_index)."""

    def add(self, room: Routed) -> None:
        if room.key is not None:
            self.by_key.setdefault(room.key, {})[room.name] = room
        else:
            self.filtered.add(room)

    def discard(self, name: str) -> None:
        self.filtered.discard(name)
        for key, rooms in list(self.by_key.items()):
            if rooms.pop(name, None) is not None and not rooms:
                del self.by_key[key]

    def names(self) -> list[str]:
        return [*self.filtered, *(n for rooms in self.by_key.values() for n in rooms)]

    def matching(self, change: Change) -> list[Routed]:
        rooms = [self.room]
        key = change.row_key
        if key is not None and self.by_key:
            for room in self.by_key.get(key, {}).values():
                if room.filter is None or room.filter.matches(change):
                    rooms.append(room)
        self.filtered.collect(change, rooms)
        return rooms


@dataclass
class SnapshotPlan:
    """What a cluster snapshot's rows already reflect: every seq up to `upto` but `uncovered`."""

    upto: int
    uncovered: frozenset[int]

    def keeps(self, seq: int) -> bool:
        return seq > self.upto or seq in self.uncovered


def room_spec(room: Room) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": room.name,
        "connector": room.connector,
        "target": room.target,
        "key": room.key,
        "filter": room.filter.canonical if room.filter is not None else None,
    }
    if isinstance(room, ShapedRoom):
        shape = room.shape
        spec["shape"] = {
            "forced": shape.forced.canonical if shape.forced is not None else None,
            "masked": [list(path) for path in shape.masked],
        }
    return spec


def routed_from_spec(spec: Mapping[str, Any]) -> Routed:
    big = 1 << 20
    row_filter = parse_filter(spec["filter"], max_length=big) if spec.get("filter") else None
    shape = None
    if spec.get("shape"):
        raw = spec["shape"]
        forced = parse_filter(raw["forced"], max_length=big) if raw.get("forced") else None
        shape = Shape(forced, tuple(tuple(p) for p in raw.get("masked", [])))
    return Routed(spec["name"], spec.get("key"), row_filter, shape)


class RedisEngine:
    """Room numbering, history and fan-out in Redis, for one node of a cluster."""

    def __init__(self, config: ClusterConfig, hub: Hub) -> None:
        self.config = config
        self.hub = hub
        self.node = config.node
        p = config.prefix
        self._p = p
        self.control = f"{p}:control".encode()
        self.inbox = f"{p}:node:{self.node}".encode()
        self.redis: Any = None
        self.up = False
        self.detail = "connecting"
        self.readers: dict[str, str | None] = {name: None for name in hub.connectors}
        self._leases: dict[str, int] = {}
        self._batchers: dict[str, Batcher] = {}
        self._index: dict[str, dict[str, TargetIndex]] = {}
        self._last_seq: dict[str, int] = {}
        self._published = 0
        """Changes this node published (numbers the ids remembered in the `seen` set)."""
        self._watching: dict[str, list[tuple[int, Change]]] = {}
        self._mirrors: dict[str, Mirror] = {}
        self._by_channel: dict[bytes, Mirror] = {}
        self._pubsub: Any = None
        self._confirm: dict[bytes, asyncio.Future[None]] = {}
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._scripts: dict[str, Any] = {}
        self._connected = asyncio.Event()
        self._overridden: dict[str, tuple[Status, Status]] = {}
        """Statuses of connectors read here, replaced by "Redis unreachable": the real one
        and the replacement (restored on reconnect unless the connector changed it since)."""
        self.ttl_ms = int(config.room_ttl * 1000)
        hub.metrics.describe(
            "feed_cluster_duplicates_dropped_total",
            "counter",
            "Changes read again after a takeover and not published twice",
        )
        self.refresh = max(0.2, min(5.0, config.lease / 4))
        """Seconds between registry refreshes (members' rooms) and re-reads (at the reader)."""

    # -- keys ----------------------------------------------------------------------------------

    def meta_key(self, room: str) -> str:
        return f"{self._p}:room:{room}:meta"

    def stream_key(self, room: str) -> str:
        return f"{self._p}:room:{room}:history"

    def channel(self, room: str) -> str:
        return f"{self._p}:room:{room}:live"

    def lease_key(self, connector: str) -> str:
        return f"{self._p}:lease:{connector}"

    def fence_key(self, connector: str) -> str:
        return f"{self._p}:fence:{connector}"

    def seen_key(self, connector: str) -> str:
        return f"{self._p}:seen:{connector}"

    def registry_key(self, connector: str) -> str:
        return f"{self._p}:rooms:{connector}"

    def live_key(self, connector: str) -> str:
        return f"{self._p}:live:{connector}"

    @property
    def status_key(self) -> str:
        return f"{self._p}:status"

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        import redis.asyncio as aioredis

        from feed.engine import scripts

        self.redis = aioredis.Redis.from_url(
            self.config.url,
            socket_connect_timeout=3.0,
            socket_timeout=max(2.0, self.config.lease / 2),
            health_check_interval=5,
        )
        for name in ("ACQUIRE", "RENEW", "RELEASE", "PUBLISH", "REGISTER", "GAP"):
            self._scripts[name] = self.redis.register_script(getattr(scripts, name))
        self._tasks = [
            asyncio.create_task(self._listen(), name="cluster:listen"),
            asyncio.create_task(self._keepalive(), name="cluster:keepalive"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await self.redis.aclose()

    def describe(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "redis": "up" if self.up else "down",
            "detail": self.detail,
            "readers": dict(self.readers),
            "reading": sorted(self._leases),
        }

    async def _script(self, name: str, keys: list[Any], args: list[Any]) -> Any:
        return await self._scripts[name](keys=keys, args=args)

    # -- the lease: one reader per connector ---------------------------------------------------

    @contextlib.asynccontextmanager
    async def reading(self, connector: Connector) -> AsyncIterator[None]:
        """Hold the connector's lease while the body runs; end the body when the lease is lost."""
        name = connector.name
        holder, token = await self._acquire(connector)
        lost: list[str] = []
        failed: list[str] = []

        def stop_reading(reason: str) -> None:  # a batch could not be published
            failed.append(reason)
            with contextlib.suppress(RuntimeError):  # the reading is over or ending already
                deadline.reschedule(asyncio.get_running_loop().time())

        try:
            async with asyncio.timeout(None) as deadline:
                renewer = asyncio.create_task(
                    self._renew(name, holder, deadline, lost), name=f"cluster:lease:{name}"
                )
                try:
                    try:
                        await self._load_index(name)
                    except Exception as exc:
                        raise ClusterError(
                            f"cannot read the room registry: {one_line(exc)}"
                        ) from None
                    self._leases[name] = token
                    # The batches carry this reading's token: a late one from an ended reading is
                    # refused by Redis once any reading (this node's next one too) has begun.
                    batcher = Batcher(
                        name,
                        lambda batch: self._publish_batch(connector, batch, token),
                        stop_reading,
                    )
                    self._batchers[name] = batcher
                    connector.settle_with(batcher.drain)
                    self.readers[name] = self.node
                    log.info("%s: reading connector %s (fencing token %d)", self.node, name, token)
                    if token > 1 and not connector.durable:
                        # Another node read it before (the token counts readers): what the
                        # source said while nobody listened is gone, and the clients must know.
                        reason = "the connector moved to another node: events in between lost"
                        with contextlib.suppress(Exception):
                            await self.publish_gap(Gap(name, reason))
                    yield
                finally:
                    self._leases.pop(name, None)
                    self._index.pop(name, None)
                    connector.settle_with(None)
                    gone = self._batchers.pop(name, None)
                    if gone is not None and not gone.close():
                        # It moved on past what was not published: from the saved position.
                        connector.forget_unsaved()
                    if self.readers.get(name) == self.node:
                        self.readers[name] = None
                    renewer.cancel()
                    with contextlib.suppress(BaseException):
                        await renewer
        except TimeoutError:
            if lost:
                raise ClusterError(f"lease on {name!r} lost: {lost[0]}") from None
            if failed:
                raise ClusterError(failed[0]) from None
            raise
        finally:
            if not lost:
                with contextlib.suppress(Exception):
                    await self._script("RELEASE", [self.lease_key(name)], [holder])

    async def _acquire(self, connector: Connector) -> tuple[str, int]:
        name = connector.name
        interval = max(0.05, min(1.0, self.config.lease / 10))
        lease_ms = int(self.config.lease * 1000)
        shown = ""
        while True:
            try:
                token = await self._script(
                    "ACQUIRE", [self.lease_key(name), self.fence_key(name)], [self.node, lease_ms]
                )
                if token is not None:
                    return f"{self.node}|{int(token)}", int(token)
                current = await self.redis.get(self.lease_key(name))
                reader = current.decode().rsplit("|", 1)[0] if current else None
                self.readers[name] = reader
                if reader and reader != shown:
                    shown = reader
                    await self._mirror_status(connector, reader)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                shown = ""
                connector.set_status(State.DOWN, f"cluster Redis unreachable: {one_line(exc)}")
            await asyncio.sleep(interval)

    async def _renew(
        self, name: str, holder: str, deadline: asyncio.Timeout, lost: list[str]
    ) -> None:
        lease = self.config.lease
        lease_ms = int(lease * 1000)
        valid_until = time.monotonic() + lease
        while True:
            await asyncio.sleep(lease / 3)
            try:
                still = await self._script("RENEW", [self.lease_key(name)], [holder, lease_ms])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if time.monotonic() < valid_until - lease / 6:
                    continue
                lost.append(f"cannot renew it: {one_line(exc)}")
            else:
                if still:
                    valid_until = time.monotonic() + lease
                    continue
                lost.append("another node holds it now")
            log.warning("%s: lease on %s lost (%s)", self.node, name, lost[0])
            deadline.reschedule(asyncio.get_running_loop().time())
            return

    async def _mirror_status(self, connector: Connector, reader: str) -> None:
        raw = await self.redis.hget(self.status_key, connector.name)
        if raw:
            self._apply_status(connector.name, _loads(raw))
        else:
            connector.set_status(State.STARTING, f"read by {reader}")

    def _apply_status(self, name: str, body: Mapping[str, Any]) -> None:
        connector = self.hub.connectors.get(name)
        if connector is None or name in self._leases:
            return
        reader = body.get("reader")
        self.readers[name] = reader
        detail = str(body.get("detail", ""))
        connector.set_status(State(body.get("state", "down")), detail)

    def status_changed(self, status: Status) -> None:
        """The reader shares its connector's status with every node."""
        if status.connector not in self._leases or self.redis is None:
            return
        body = {**status.to_json(), "reader": self.node}
        self.hub._spawn(self._share_status(status.connector, body))

    async def _share_status(self, name: str, body: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            data = _dumps(body)
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hset(self.status_key, name, data)
                pipe.publish(self.control, _dumps({"t": "status", "c": name, "s": body}))
                await pipe.execute()

    def reader_of(self, name: str) -> str | None:
        return self.readers.get(name)

    # -- routing at the reader -----------------------------------------------------------------

    def _target_index(self, connector: str, target: str) -> TargetIndex:
        targets = self._index.setdefault(connector, {})
        index = targets.get(target)
        if index is None:
            index = targets[target] = TargetIndex(Routed(f"{connector}:{target}"))
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
            index.discard(routed.name)
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
        fresh: dict[str, TargetIndex] = {}
        self._index[connector] = fresh
        for name, raw in specs.items():
            if name not in alive:
                continue
            with contextlib.suppress(ValueError):
                self._route_spec(_loads(raw))
        routed = {i.room.name for t in self._index.values() for i in t.values()}
        routed.update(n for t in self._index.values() for i in t.values() for n in i.names())
        for name in [n for n in self._last_seq if n not in routed]:
            del self._last_seq[name]  # an expired room: forget its number too
        if dead:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hdel(self.registry_key(connector), *dead)
                pipe.zrem(self.live_key(connector), *dead)
                await pipe.execute()

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

    async def _publish_batch(self, connector: Connector, changes: list[Change], token: int) -> None:
        """Number, keep and publish a batch of changes in every room each one matches, in one
        script call (feed.engine.scripts.PUBLISH) under the fencing token of the reading that
        read them, routed against the rooms known now."""
        name = connector.name
        slots: dict[str, int] = {}
        keys: list[str] = [self.fence_key(name), self.seen_key(name)]
        channels: list[str] = []
        per_change: list[Any] = []
        routed: list[list[Routed]] = []
        first = self._published
        for change in changes:
            rooms = self._target_index(name, change.target).matching(change)
            routed.append(rooms)
            per_change += [change.id, (token << 32) + self._published, len(rooms)]
            self._published += 1
            wire = change.wire
            for room in rooms:
                slot = slots.get(room.name)
                if slot is None:
                    slot = slots[room.name] = len(slots) + 1
                    keys += [self.meta_key(room.name), self.stream_key(room.name)]
                    channels.append(self.channel(room.name))
                payload = {**wire, "room": room.name}
                if room.shape is not None:
                    room.shape.apply(change, payload)
                per_change += [slot, _dumps(payload)]
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
            *channels,
            *per_change,
        ]
        try:
            seqs = await self._script("PUBLISH", keys, args)
        except Exception as exc:
            if "STALE" in str(exc):
                if self._leases.get(name) == token:
                    self._leases.pop(name, None)
                raise ClusterError(f"{name}: refused by Redis: {exc}") from None
            raise ClusterError(f"cluster Redis: cannot publish: {one_line(exc)}") from None
        at = 0
        for change, rooms in zip(changes, routed, strict=True):
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
        for target, index in self._index.get(gap.connector, {}).items():
            if gap.target is None or gap.target == target:
                names += [index.room.name, *index.names()]
        if not names:
            return
        body = _dumps({"reason": gap.reason, "ts": format_ts(gap.ts)})
        await self._script(
            "GAP", [self.meta_key(n) for n in names], [body, *(self.channel(n) for n in names)]
        )

    # -- this node's rooms ---------------------------------------------------------------------

    async def watch(self, room: Room) -> Mirror:
        """Follow a room's channel (confirmed by Redis) and register it for the reader."""
        mirror = self._mirrors.get(room.name)
        if mirror is None:
            channel = self.channel(room.name).encode()
            mirror = self._mirrors[room.name] = Mirror(room, channel)
            self._by_channel[channel] = mirror
        if mirror.ready:
            return mirror
        async with mirror.lock:
            if mirror.ready:
                return mirror
            try:
                await self._subscribe([mirror.channel])
                epoch, seq, gap = await self._register(room)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise ProtocolError(
                    "cluster_unavailable",
                    f"the cluster's Redis is unreachable ({one_line(exc)}); retry shortly",
                ) from None
            self._baseline(mirror, epoch, seq, gap)
            mirror.ready = True
        return mirror

    def _baseline(self, mirror: Mirror, epoch: str, seq: int, gap: int) -> None:
        if mirror.epoch != epoch or mirror.seq is None or mirror.seq < seq:
            if mirror.epoch != epoch:
                mirror.ring.clear()
            mirror.epoch = epoch
            mirror.seq = max(seq, mirror.seq or 0) if mirror.epoch == epoch else seq
            mirror.room.seq = mirror.seq
        mirror.gap = max(mirror.gap, gap)

    async def _register(self, room: Room) -> tuple[str, int, int]:
        spec = room_spec(room)
        expiry = int((time.time() + self._live_for()) * 1000)
        result = await self._script(
            "REGISTER",
            [self.registry_key(room.connector), self.live_key(room.connector),
             self.meta_key(room.name)],
            [room.name, _dumps(spec), expiry, secrets.token_hex(8), self.ttl_ms],
        )  # fmt: skip
        await self.redis.publish(self.control, _dumps({"t": "room", "spec": spec}))
        epoch, seq, gap = result
        return epoch.decode(), int(seq), int(gap)

    def _live_for(self) -> float:
        return self.hub.settings.filter_room_grace + 3 * self.refresh

    def forget(self, room: Room) -> None:
        """The hub dropped an expired room: stop following its channel."""
        mirror = self._mirrors.pop(room.name, None)
        if mirror is None:
            return
        self._by_channel.pop(mirror.channel, None)
        pubsub = self._pubsub
        if pubsub is not None:
            self.hub._spawn(self._quietly(pubsub.unsubscribe(mirror.channel)))

    @staticmethod
    async def _quietly(coro: Any) -> None:
        with contextlib.suppress(Exception):
            await coro

    async def _subscribe(self, channels: list[bytes]) -> None:
        await asyncio.wait_for(self._connected.wait(), SUBSCRIBE_TIMEOUT)
        pubsub = self._pubsub
        if pubsub is None:
            raise ClusterError("not connected to the cluster's Redis")
        loop = asyncio.get_running_loop()
        waits = []
        for channel in channels:
            future = self._confirm.get(channel)
            if future is None or future.done():
                future = self._confirm[channel] = loop.create_future()
            waits.append(future)
        await pubsub.subscribe(*channels)
        await asyncio.wait_for(asyncio.gather(*waits), SUBSCRIBE_TIMEOUT)

    # -- the listener: every message this node receives ----------------------------------------

    async def _listen(self) -> None:
        """Receive forever; a bad message is logged and skipped, a lost connection retried
        with doubling backoff (and what it may have cost is recovered or announced)."""
        delay = BACKOFF_START
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.control, self.inbox)
                self._pubsub = pubsub
                recovery = asyncio.create_task(self._recover())
                self._connected.set()
                try:
                    while True:
                        if recovery.done() and not self.up:
                            recovery.result()  # a failed recovery: reconnect and try again
                        message = await pubsub.get_message(timeout=0.5)
                        if message is None:
                            continue
                        try:
                            await self._on_message(message)
                        except asyncio.CancelledError:
                            raise
                        except Exception:
                            log.exception("bad cluster message on %r", message.get("channel"))
                finally:
                    recovery.cancel()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("cluster listener: %s", one_line(exc), exc_info=True)
                self._down(one_line(exc))
            finally:
                self._connected.clear()
                self._pubsub = None
                for future in self._confirm.values():
                    future.cancel()
                self._confirm.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)
            if self.up:
                delay = BACKOFF_START

    def _down(self, detail: str) -> None:
        """Redis went away: every node says so (status, /readyz); clients stay connected."""
        first = self.up or self.detail == "connecting"
        self.up = False
        self.detail = f"cluster Redis unreachable: {detail}"
        if not first:
            return
        log.warning("%s: %s", self.node, self.detail)
        for mirror in self._mirrors.values():
            mirror.ready = False
        for name, connector in self.hub.connectors.items():
            before = connector.status
            connector.set_status(State.DOWN, self.detail)
            if name in self._leases:
                self._overridden[name] = (before, connector.status)

    async def _recover(self) -> None:
        """After (re)connecting: resubscribe, restore statuses, fill or announce what was missed."""
        channels = [m.channel for m in self._mirrors.values()]
        if channels:
            await self._subscribe(channels)
        statuses = await self.redis.hgetall(self.status_key)
        was_down = not self.up
        self.up = True
        self.detail = "connected"
        if was_down:
            log.info("%s: connected to the cluster's Redis", self.node)
        for name, connector in self.hub.connectors.items():
            if name in self._leases:
                saved = self._overridden.pop(name, None)
                if saved is not None and connector.status is saved[1]:
                    connector.set_status(saved[0].state, saved[0].detail)  # ours again
                self.status_changed(connector.status)
            elif name.encode() in statuses:
                self._apply_status(name, _loads(statuses[name.encode()]))
        for mirror in list(self._mirrors.values()):
            await self._resync(mirror)
            mirror.ready = True

    async def _resync(self, mirror: Mirror) -> None:
        async with mirror.order:
            await self._resync_locked(mirror)

    async def _resync_locked(self, mirror: Mirror) -> None:
        room = mirror.room
        epoch, seq, gap = await self._register(room)
        if mirror.epoch is not None and epoch != mirror.epoch:
            await self._announce_gap(mirror, "the cluster lost this room's history", seq)
            mirror.ring.clear()
            mirror.epoch, mirror.seq, mirror.gap = epoch, seq, gap
            room.seq = seq
            return
        mirror.epoch = epoch
        if gap > mirror.gap:
            mirror.gap = gap
        if mirror.seq is not None and seq > mirror.seq:
            await self._fill(mirror, seq)

    async def _on_message(self, message: Mapping[str, Any]) -> None:
        kind = message.get("type")
        channel = message.get("channel")
        if kind == b"subscribe" or kind == "subscribe":
            future = self._confirm.pop(channel, None) if isinstance(channel, bytes) else None
            if future is not None and not future.done():
                future.set_result(None)
            return
        if kind not in (b"message", "message"):
            return
        data: bytes = message["data"]
        if channel == self.control:
            self._on_control(_loads(data))
            return
        if channel == self.inbox:
            await self._on_inbox(_loads(data))
            return
        mirror = self._by_channel.get(channel) if isinstance(channel, bytes) else None
        if mirror is None:
            return
        head, _, rest = data.partition(b"\n")
        if head == b"gap":
            seq_text, _, body = rest.partition(b"\n")
            await self._on_gap(mirror, int(seq_text), _loads(body))
            return
        epoch, _, payloads = rest.partition(b"\n")
        await self._apply(mirror, int(head), epoch.decode(), payloads.split(b"\n"))

    def _on_control(self, body: Mapping[str, Any]) -> None:
        kind = body.get("t")
        if kind == "room":
            self._route_spec(body["spec"])
        elif kind == "status":
            self._apply_status(str(body.get("c")), body.get("s") or {})

    async def _apply(self, mirror: Mirror, first: int, epoch: str, raws: list[bytes]) -> None:
        """Deliver a room's run of a batch: payloads numbered `first`, `first + 1`, ..."""
        last = first + len(raws) - 1
        async with mirror.order:
            if mirror.seq is None:  # the first message of a room being watched: the baseline
                mirror.epoch, mirror.seq = epoch, first - 1
            elif epoch != mirror.epoch:
                # Said even while a reconnect is still resyncing (not `ready`): a publication in
                # the new epoch can arrive first, and after it the resync sees nothing to tell.
                reason = "the cluster lost this room's history"
                await self._announce_gap(mirror, reason, first - 1)
                mirror.ring.clear()
                mirror.epoch, mirror.seq, mirror.gap = epoch, first - 1, 0
            if last <= mirror.seq:
                return  # already delivered (a resync read it from the history first)
            if first > mirror.seq + 1:
                await self._fill(mirror, first - 1)
                if last <= mirror.seq:
                    return
            # Sent in one loop pass, the run leaves as one `changes` frame (feed.delivery.transport).
            for seq, raw in enumerate(raws, start=first):
                if seq <= mirror.seq:
                    continue
                payload = _loads(raw)
                payload["seq"] = seq
                await self._deliver(mirror, seq, payload)

    async def _deliver(self, mirror: Mirror, seq: int, payload: dict[str, Any]) -> None:
        if mirror.seq is not None and seq <= mirror.seq:
            return
        room = mirror.room
        if mirror.ring and mirror.ring[-1][0] != seq - 1:
            mirror.ring.clear()
        mirror.ring.append((seq, payload))
        mirror.seq = seq
        room.seq = seq
        mirror.advanced.set()
        mirror.advanced = asyncio.Event()
        hub = self.hub
        receivers = len(room.members) - len(room.pending)
        if receivers > 0 and hub.transport is not None:
            await hub.transport.send_room(room.name, "change", payload, list(room.pending))
            hub._counters(room.connector)[1].inc(receivers)

    async def _fill(self, mirror: Mirror, upto: int) -> None:
        """Deliver what pub/sub did not bring (a hole up to `upto`) from the room's history."""
        start = mirror.seq or 0
        entries = await self._history(mirror.room.name, start, upto)
        if entries is None:
            await self._announce_gap(
                mirror, "changes were missed while the cluster's Redis was unreachable", upto
            )
            mirror.ring.clear()
            mirror.seq = upto
            mirror.room.seq = upto
            return
        for seq, payload in entries:
            await self._deliver(mirror, seq, payload)

    async def _history(
        self, room: str, after: int, upto: int
    ) -> list[tuple[int, dict[str, Any]]] | None:
        """Entries after..upto from the room's stream, or None when Redis no longer holds all."""
        if upto <= after:
            return []
        raw = await self.redis.xrange(self.stream_key(room), f"{after + 1}-0", f"{upto}-1")
        entries = []
        for entry_id, fields in raw:
            seq = int(entry_id.split(b"-")[0])
            payload = _loads(fields[b"d"])
            payload["seq"] = seq
            entries.append((seq, payload))
        if len(entries) != upto - after or (entries and entries[0][0] != after + 1):
            return None
        return entries

    async def _read(
        self, mirror: Mirror, after: int, upto: int
    ) -> list[tuple[int, dict[str, Any]]] | None:
        ring = mirror.ring
        if ring and ring[0][0] <= after + 1 and ring[-1][0] >= upto:
            return [(s, p) for s, p in ring if after < s <= upto]
        return await self._history(mirror.room.name, after, upto)

    async def _on_gap(self, mirror: Mirror, seq: int, body: Mapping[str, Any]) -> None:
        mirror.gap = max(mirror.gap, seq)
        await self._announce_gap(mirror, str(body.get("reason", "")), seq, body.get("ts"))

    async def _announce_gap(self, mirror: Mirror, reason: str, seq: int, ts: Any = None) -> None:
        room = mirror.room
        room.mark_gap()
        mirror.gap = max(mirror.gap, seq)
        self.hub.metrics.inc("feed_gaps_total", connector=room.connector)
        if room.members and self.hub.transport is not None:
            body = {
                "connector": room.connector,
                "room": room.name,
                "target": room.target,
                "reason": reason,
                "seq": seq,
                "ts": ts,
            }
            await self.hub.transport.send_room(room.name, "gap", body, [])

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
            recovered = same_epoch and await self._holds_after(mirror, request.since)
            if recovered:
                cursor = request.since
        hub._join(sid, room)
        ack: dict[str, Any] = {
            "ok": True,
            "room": room.name,
            "seq": seq,
            "recovered": recovered,
            "epoch": mirror.epoch,
        }
        plan: SnapshotPlan | None = None
        rest: list[SnapshotChunk] = []
        if request.snapshot and not recovered:
            try:
                answer = await self._snapshot(room, address)
            except BaseException:
                hub._leave(sid, room)
                raise
            plan = SnapshotPlan(int(answer["upto"]), frozenset(answer["uncovered"]))
            # `keys` is absent in the answer of a reading node older than snapshot keys.
            rows, keys = visible(answer["rows"], answer.get("keys"), mask)
            (first, first_keys), *rest = split_snapshot(
                rows, keys, hub.settings.snapshot_chunk_bytes
            )
            ack["snapshot"] = first
            if first_keys is not None:
                ack["snapshot_keys"] = first_keys
            ack["snapshot_truncated"] = bool(answer["truncated"])
            ack["snapshot_chunks"] = 1 + len(rest)
            ack["seq"] = cursor
        hub._spawn(self._catch_up(sid, mirror, cursor, plan, rest))
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
            first = await self.redis.xrange(
                self.stream_key(mirror.room.name), f"{since + 1}-0", "+", count=1
            )
        except Exception as exc:
            raise ProtocolError(
                "cluster_unavailable", f"the cluster's Redis is unreachable ({one_line(exc)})"
            ) from None
        return bool(first) and int(first[0][0].split(b"-")[0]) == since + 1

    async def _catch_up(
        self,
        sid: str,
        mirror: Mirror,
        cursor: int,
        plan: SnapshotPlan | None,
        chunks: list[SnapshotChunk],
    ) -> None:
        """Send a new member the rest of its snapshot and what it missed after `cursor`, then
        let it go live (as the hub's own catch-up: the member leaves `pending` in the step that
        finds nothing newer; a newer subscribe of the same client to the room supersedes it)."""
        room = mirror.room
        hub = self.hub
        transport = hub.transport
        key = (sid, room.name)
        token = hub._catch_ups[key] = object()
        try:
            if chunks and transport is not None:
                total = len(chunks) + 1
                for index, chunk in enumerate(chunks, start=2):
                    if sid not in room.pending or hub._catch_ups.get(key) is not token:
                        return
                    body = chunk_event(room.name, index, total, chunk)
                    await transport.send_paced(sid, "snapshot", body)
            while sid in room.pending and hub._catch_ups.get(key) is token:
                seq = mirror.seq or 0
                if plan is not None and seq < plan.upto:
                    advanced = mirror.advanced
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(advanced.wait(), 1.0)
                    continue
                if seq > cursor:
                    entries = await self._read(mirror, cursor, seq)
                    if entries is None:
                        if transport is not None:
                            body = {
                                "connector": room.connector,
                                "room": room.name,
                                "target": room.target,
                                "reason": "the room's history no longer holds what was missed",
                                "seq": seq,
                            }
                            await transport.send_to(sid, "gap", body)
                        cursor = seq
                        continue
                    batch = [p for s, p in entries if plan is None or plan.keeps(s)]
                    cursor = seq
                    if batch and transport is not None:
                        await transport.send_to(sid, "changes", batch)
                        hub.metrics.inc("feed_changes_replayed_total", len(batch))
                    continue
                room.pending.discard(sid)
                return
        except Exception:
            log.exception("catch-up for %s in %s failed", sid, room.name)
            room.pending.discard(sid)
        finally:
            if hub._catch_ups.get(key) is token:
                del hub._catch_ups[key]

    # -- snapshots, taken by the reader --------------------------------------------------------

    async def _snapshot(self, room: Room, address: RoomAddress) -> dict[str, Any]:
        request = {
            "t": "snapshot",
            "spec": room_spec(room),
            "target": address.target,
            "key": address.key,
            "limit": self.hub.settings.snapshot_limit,
        }
        reader = self.readers.get(room.connector)
        if room.connector in self._leases:
            answer = await self._take_snapshot(request)
        elif not reader:
            raise ProtocolError(
                "snapshot_failed", f"no node is reading connector {room.connector!r} right now"
            )
        else:
            answer = await self._ask(reader, request)
        if not answer.get("ok"):
            code = str(answer.get("code", "snapshot_failed"))
            raise ProtocolError(code, str(answer.get("message", "snapshot failed")))
        return answer

    async def _ask(self, node: str, request: dict[str, Any]) -> dict[str, Any]:
        ident = secrets.token_hex(8)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[ident] = future
        try:
            inbox = f"{self._p}:node:{node}"
            body = {**request, "id": ident, "reply": self.inbox.decode()}
            receivers = await self.redis.publish(inbox, _dumps(body))
            if not receivers:
                raise ProtocolError("snapshot_failed", f"the reading node {node} is not listening")
            return await asyncio.wait_for(future, SNAPSHOT_TIMEOUT)
        except TimeoutError:
            raise ProtocolError(
                "snapshot_failed", f"the reading node {node} did not answer in time"
            ) from None
        except ProtocolError:
            raise
        except Exception as exc:
            raise ProtocolError("snapshot_failed", f"snapshot failed: {one_line(exc)}") from None
        finally:
            self._replies.pop(ident, None)

    async def _on_inbox(self, body: Mapping[str, Any]) -> None:
        if body.get("t") == "reply":
            future = self._replies.get(str(body.get("id")))
            if future is not None and not future.done():
                future.set_result(dict(body))
            return
        if body.get("t") == "snapshot":
            self.hub._spawn(self._answer_snapshot(dict(body)))

    async def _answer_snapshot(self, request: dict[str, Any]) -> None:
        answer = await self._take_snapshot(request)
        answer.update(t="reply", id=request.get("id"))
        with contextlib.suppress(Exception):
            await self.redis.publish(str(request["reply"]), _dumps(answer))

    async def _take_snapshot(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """At the reader: route the room from now on, snapshot, say which seqs rows miss."""
        spec = request["spec"]
        name = str(spec["name"])
        connector = self.hub.connectors.get(str(spec.get("connector")))
        if connector is None or connector.name not in self._leases:
            return {"ok": False, "code": "snapshot_failed", "message": "not the reading node"}
        routed = self._route_spec(spec)
        if routed is None:
            return {"ok": False, "code": "snapshot_failed", "message": "bad room"}
        watch: list[tuple[int, Change]] = []
        self._watching[name] = watch
        try:
            where = routed.filter.matches_image if routed.filter else (lambda row: True)
            address = RoomAddress(str(request["target"]), request.get("key"))
            snapshot = await asyncio.wait_for(
                connector.snapshot(address, where, int(request["limit"])), SNAPSHOT_TIMEOUT
            )
            batcher = self._batchers.get(connector.name)
            if batcher is not None:  # what the stream yielded before the snapshot: numbered
                await asyncio.wait_for(batcher.drain(), SNAPSHOT_TIMEOUT)
            upto = self._last_seq.get(name, 0)
            uncovered = [s for s, change in watch if not snapshot.covers(change)]
            return {
                "ok": True,
                "rows": [to_json(r) for r in snapshot.rows],
                "keys": list(snapshot.keys) if snapshot.keys is not None else None,
                "truncated": snapshot.truncated,
                "upto": upto,
                "uncovered": uncovered,
            }
        except SnapshotNotSupported as exc:
            return {"ok": False, "code": "snapshot_unsupported", "message": str(exc)}
        except (FeedError, TimeoutError, OSError) as exc:
            return {"ok": False, "code": "snapshot_failed", "message": f"snapshot failed: {exc}"}
        finally:
            if self._watching.get(name) is watch:
                del self._watching[name]

    # -- upkeep --------------------------------------------------------------------------------

    async def _keepalive(self) -> None:
        """Keep this node's followed rooms registered; at the reader, re-read the registry."""
        while True:
            await asyncio.sleep(self.refresh)
            if not self.up:
                continue
            try:
                await self._refresh_rooms()
                for name in list(self._leases):
                    await self._load_index(name)
                    connector = self.hub.connectors[name]
                    body = {**connector.status.to_json(), "reader": self.node}
                    await self._share_status(name, body)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("cluster keepalive failed: %s", exc)

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
                    pipe.hset(self.registry_key(room.connector), name, _dumps(room_spec(room)))
                    pipe.zadd(self.live_key(room.connector), {name: expiry}, gt=True)
                pipe.pexpire(self.meta_key(name), self.ttl_ms)
                pipe.pexpire(self.stream_key(name), self.ttl_ms)
            await pipe.execute()


async def check(config: ClusterConfig, connectors: list[str]) -> str:
    """For `feed check`: reach the cluster's Redis, check its version, say who reads what."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(config.url, socket_connect_timeout=3.0, socket_timeout=5.0)
    try:
        info = await client.info("server")
        version = str(info.get("redis_version", "?"))
        parts = [int(p) if p.isdigit() else 0 for p in [*version.split("."), "0", "0"][:2]]
        if tuple(parts) < (6, 2):
            raise ClusterError(f"Redis {version} is too old: the cluster needs Redis 6.2+")
        readers = []
        for name in connectors:
            holder = await client.get(f"{config.prefix}:lease:{name}")
            text = holder.decode() if isinstance(holder, bytes) else str(holder or "")
            reader = text.rsplit("|", 1)[0] if text else "nobody"
            readers.append(f"{name}: {reader}")
        where = f"Redis {version}, prefix {config.prefix!r}"
        return f"{where}; readers: {', '.join(readers)}" if readers else where
    except (OSError, aioredis.RedisError) as exc:
        raise ClusterError(f"cannot reach {config.url}: {one_line(exc)}") from None
    finally:
        await client.aclose()
