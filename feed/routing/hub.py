"""The hub: runs connectors, routes each change to its rooms, numbers, buffers and sends it.

Routing is synchronous and allocation-light because it runs once per change for every subscriber
at once; filter rooms are found by value through an index (feed.core.filter_index), so the
per-change cost does not grow with the number of per-user or per-tenant filter rooms.
Everything that waits (snapshots, catch-up sends) happens off the routing path.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from types import TracebackType
from typing import Any, Protocol, Self

from connectors.base import Connector, RoomAddress, State, Status, Where
from connectors.health import CAPTURE_METRICS
from feed.core.change import Change, Gap, format_ts, to_json
from feed.core.filter_index import UNSURE
from feed.core.filters import RowFilter, parse_filter
from feed.core.rooms import Room
from feed.core.snapshots import SnapshotChunk, chunk_event, gap_event, snapshot_ack
from feed.core.targets import TargetRooms as TargetRooms  # also imported from here (bench, tests)
from feed.delivery.protocol import SubscribeRequest
from feed.delivery.transport import FlushBeforeWaiting, Transport
from feed.errors import FeedError, ProtocolError, SnapshotNotSupported
from feed.metrics import Counter, Labels, Metrics
from feed.routing.settings import ServerConfig
from feed.routing.turns import Turns
from feed.security.access import Shape, ShapedRoom
from feed.security.room_budget import RoomBudget

log = logging.getLogger("feed.hub")

BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
HEALTHY_RUN = 30.0
"""A connector that ran this long before failing starts its backoff from the beginning again."""
SNAPSHOT_TIMEOUT = 30.0

RowGuard = Callable[[Mapping[str, Any]], Mapping[str, Any] | None]


STOP_GRACE = 5.0
"""Seconds a cancelled connector task gets to save its position and let go of its source."""


async def cancel_and_wait(tasks: list[asyncio.Task[Any]], grace: float | None = None) -> None:
    """Cancel `tasks` and wait for them; cancel again any still running after `grace` seconds
    (STOP_GRACE, read when called, by default).

    A driver can swallow a cancellation that lands just as its reply arrives (redis-py has done
    so), and a task that ignored its one cancel would hold shutdown up forever. The grace comes
    first so that a connector saving its position on the way out is not cut short.
    """
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=STOP_GRACE if grace is None else grace)
    for _ in range(3):
        if not pending:
            break
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)
    if pending:
        names = ", ".join(sorted(t.get_name() for t in pending))
        log.warning("left running at shutdown (they ignored cancellation): %s", names)
    for task in tasks:  # retrieve outcomes so asyncio does not log them as never retrieved
        if task.done() and not task.cancelled():
            task.exception()


SHAPED_SUFFIX = re.compile(r"@[0-9a-f]{16}$")  # what room_name appends for a shape's profile


def room_name(
    connector: str, address: RoomAddress, row_filter: RowFilter | None, shape: Shape | None = None
) -> str:
    name = f"{connector}:{address.target}"
    if address.key is not None:
        name += f":{address.key}"
    if row_filter is not None:
        name += f"?{row_filter.canonical}"
    if shape is not None:  # rooms shaped for different identities must never be shared
        name += f"@{shape.profile}"
    return name


def check_forced(connector: Connector, target: str, forced: RowFilter) -> None:
    """Refuse a room whose access rule forces a filter no row of `target` can match.

    Such a rule (a `row_filter` naming a column the table lacks, or a claim not of the
    column's type) put the client in a room that went live and heard nothing, ever: the
    operator's mistake was silent. The client is told to ask; the log says what to fix
    (the table's columns are not for the client).
    """
    try:
        connector.check_forced_filter(target, forced)
    except ProtocolError as exc:
        log.warning(
            "connector %s: the access rule's row_filter %r cannot apply to %s (%s): "
            "subscribes to it are refused; fix the rule's row_filter, or leave %s out of "
            "its allow",
            connector.name, forced.canonical, target, exc.message, target,
        )  # fmt: skip
        raise ProtocolError(
            "forbidden",
            f"the access rules give {target} a row filter that cannot apply to it; "
            "ask the feed's operator (its log says why)",
        ) from None


class CatchUp:
    """One member's catch-up under way, and how far it has sent the room's changes."""

    __slots__ = ("sent",)

    def __init__(self, sent: int) -> None:
        self.sent = sent


def shared_start(already: bool, previous: CatchUp | None, cursor: int) -> tuple[bool, int]:
    """Whether a catch-up may leave out what the subscriber's snapshot covers, and where it
    starts. A client that follows the room already (another of its subscriptions: the client
    libraries open one per call) has one stream of the room for all of them: leaving out what
    the new snapshot covers, or starting after what a catch-up it supersedes had sent, took
    changes from the other subscription with no hole in its numbers to tell (right after a
    snapshot a jump is expected), and its rows silently missed them."""
    if not already:
        return True, cursor
    return False, cursor if previous is None else min(cursor, previous.sent)


class Engine(Protocol):
    """What the hub asks of a cluster engine (feed.engine.redis.RedisEngine is the one there is).

    The hub is the layer below the engine: it names the engine only through this protocol, so the
    engine can import the hub and not the other way round (tests/test_layers.py). A new call from
    the hub into the engine is declared here too (mypy checks RedisEngine against it).
    """

    up: bool

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def describe(self) -> dict[str, Any]: ...
    def reading(self, connector: Connector) -> contextlib.AbstractAsyncContextManager[None]: ...
    def forget(self, room: Room) -> None: ...
    def idle(self, connector: Connector) -> Callable[[], None]: ...
    async def publish(self, connector: Connector, change: Change) -> None: ...
    async def publish_gap(self, gap: Gap) -> None: ...
    async def subscribe(
        self,
        sid: str,
        request: SubscribeRequest,
        room: Room,
        connector: Connector,
        address: RoomAddress,
        mask: RowGuard | None,
    ) -> dict[str, Any]: ...
    def reader_of(self, name: str) -> str | None: ...
    def status_changed(self, status: Status) -> None: ...


class Hub:
    def __init__(
        self,
        connectors: Iterable[Connector],
        settings: ServerConfig | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings or ServerConfig()
        self.connectors = {c.name: c for c in connectors}
        self.metrics = metrics or Metrics()
        self.transport: Transport | None = None
        self.engine: Engine | None = None
        """The cluster engine ([cluster]); None keeps rooms, numbers and history in memory."""
        self.epoch = secrets.token_hex(8)
        # Source types this deployment leaves out, each {"type", "detail"} saying how to get it
        # (`feed demo` names MongoDB); the catalog lists them so clients can show them as such.
        self.unconfigured: list[dict[str, str]] = []
        self.rooms: dict[str, Room] = {}
        self._evicted_by_dropped_rooms = 0
        """Replay evictions of the rooms already dropped (`feed_replay_evictions_total`)."""
        self.clients: dict[str, set[str]] = {}
        self._targets: dict[tuple[str, str], TargetRooms[Room]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._catch_ups: dict[tuple[str, str], CatchUp] = {}
        self.snapshot_turns = Turns()
        """Snapshots one at a time per identity (feed.routing.turns)."""
        self.budget = RoomBudget(per_identity=5000, total=50_000)
        """Row and filter rooms per identity and in all (feed.security.room_budget; [limits] sets
        it)."""
        self.announce_status: Callable[[dict[str, Any]], Awaitable[None]] | None = None
        """Sends a status change to clients in place of a broadcast (feed.app.server: the detail
        only to operators)."""
        self._change_counters: dict[str, tuple[Counter, Counter]] = {}
        self._describe_metrics()
        for connector in self.connectors.values():
            connector.on_status(self._status_changed)

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self.engine is not None:
            await self.engine.start()
        for connector in self.connectors.values():
            self._tasks.append(
                asyncio.create_task(self._supervise(connector), name=f"connector:{connector.name}")
            )
        self._tasks.append(asyncio.create_task(self._janitor(), name="hub:janitor"))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop connectors (they save their positions as they leave), then drop the clients."""
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        for task in list(self._background):
            task.cancel()
        if self.engine is not None:
            await self.engine.stop()
        if self.transport is not None:
            with contextlib.suppress(Exception):
                await self.transport.disconnect_all()

    async def _supervise(self, connector: Connector) -> None:
        """Run one connector forever; a crash restarts it with doubling backoff, alone."""
        delay = BACKOFF_START
        while True:
            started = time.monotonic()
            try:
                async with self._reading(connector), connector:
                    await self._follow(connector)
                reason = "change stream ended"
            except asyncio.CancelledError:
                raise
            except FeedError as exc:
                reason = str(exc)
                # Logged once per retry: by the status change below, or here when the connector
                # is already down for another reason (a repeat of the same one is not logged).
                status = connector.status
                if status.state is State.DOWN and status.detail != reason:
                    log.warning("connector %s: %s", connector.name, reason)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                log.exception("connector %s crashed", connector.name)
            connector.restarts += 1
            if connector.own_status.state is not State.DOWN:  # also while shown down by a hold
                connector.set_status(State.DOWN, reason)
            if time.monotonic() - started > HEALTHY_RUN:
                delay = BACKOFF_START
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, BACKOFF_MAX)

    async def _follow(self, connector: Connector) -> None:
        """Dispatch the connector's changes; what they routed is sent when the stream waits.

        While it waits, the connector may hand changes over in its own call (`connector.sink`,
        connectors.base): routed at once, sent at the end of that loop pass, without waking this
        task. The sink is open only while this task is parked, so a pushed change can never
        interleave with the dispatch of a yielded one.
        """
        stream = aiter(connector.changes())
        transport = self.transport
        flush = transport.flush if transport is not None else (lambda: None)
        if self.engine is not None:  # a cluster publishes what the stream had ready at once
            idle = done = self.engine.idle(connector)
        else:
            idle, done = self._parking(connector, flush), flush
        try:
            while True:
                try:
                    item = await FlushBeforeWaiting(anext(stream), idle)
                except StopAsyncIteration:
                    return
                finally:
                    connector.sink = None
                if transport is not None and self.engine is None:  # a cluster sends elsewhere
                    transport.hold()
                await self._dispatch(connector, item)
        finally:
            connector.sink = None
            done()

    def _parking(self, connector: Connector, flush: Callable[[], None]) -> Callable[[], None]:
        """What the hub does as it starts waiting for the stream: send what it routed, then
        take the connector's changes through the sink until it resumes."""
        take = self._taker(connector)

        def park() -> None:
            flush()
            connector.sink = take

        return park

    def _reading(self, connector: Connector) -> contextlib.AbstractAsyncContextManager[None]:
        """In a cluster, the connector runs only while this node holds its lease."""
        if self.engine is None:
            return contextlib.nullcontext()
        return self.engine.reading(connector)

    async def _janitor(self) -> None:
        """Drop row and filter rooms nobody has followed for the grace period."""
        interval = max(0.05, min(5.0, self.settings.filter_room_grace / 4 or 0.05))
        while True:
            await asyncio.sleep(interval)
            self.expire_rooms(time.monotonic())

    def expire_rooms(self, now: float) -> int:
        expired = [
            r for r in self.rooms.values() if r.expired(now, self.settings.filter_room_grace)
        ]
        for room in expired:
            self._drop_room(room)
        return len(expired)

    def _drop_room(self, room: Room) -> None:
        del self.rooms[room.name]
        # Its evictions stay counted: `feed_replay_evictions_total` sums the live rooms' and
        # went down (a counter!) whenever a busy row or filter room expired.
        self._evicted_by_dropped_rooms += room.evicted
        self._targets[(room.connector, room.target)].discard(room)
        self.budget.release(room.name)
        if self.engine is not None:
            self.engine.forget(room)

    def _make_room_for(self, owner: str) -> None:
        """Before `owner` creates a room: within its budget and the server's, by expiring an
        idle room early if need be (its own first), or refuse (feed.security.room_budget)."""
        budget = self.budget
        if budget.over_identity(owner) and not self._evict_idle(owner):
            self.metrics.inc("feed_rooms_refused_total", reason="identity")
            raise ProtocolError(
                "too_many_rooms",
                f"{owner!r} already has {budget.charged(owner)} row and filter rooms (the limit "
                "is [limits] rooms_per_identity); unsubscribe from some, or share filters",
            )
        if budget.over_total() and not self._evict_idle(None):
            self.metrics.inc("feed_rooms_refused_total", reason="total")
            raise ProtocolError(
                "server_busy",
                f"the server holds its maximum of {budget.total} row and filter rooms, all "
                "followed; retry later",
            )

    def _evict_idle(self, owner: str | None) -> bool:
        """Expire the oldest room nobody follows (charged to `owner`, or to anyone if None).

        From the budget's list of idle rooms, in the order they went idle: this scanned every
        room the budget held, 50,000 at its cap, on every subscribe past it."""
        budget = self.budget
        # The first few: one that is not idle after all is rare (joins mark rooms busy).
        for name in list(itertools.islice(budget.idle_of(owner), 16)):
            room = self.rooms.get(name)
            if room is None or room.members:  # not idle after all: never kept so
                budget.went_busy(name)
                continue
            if room.empty_since is None:  # held by a subscribe under way (cluster)
                continue
            self._drop_room(room)
            self.metrics.inc("feed_rooms_evicted_total")
            return True
        return False

    def _went_idle(self, room: Room) -> None:
        """The room's last member left: one idle room too many for its identity makes the
        identity's oldest idle room go now (feed.security.room_budget)."""
        if not room.ephemeral or room.members:
            return
        owner = self.budget.went_idle(room.name)
        if owner is not None:
            self._evict_idle(owner)

    # -- routing -------------------------------------------------------------------------------

    def route(self, change: Change) -> list[tuple[Room, dict[str, Any]]]:
        """Number and buffer the change in every room it matches; return what to send where
        (`_send` does the same, sending as it goes)."""
        kept = change.kept()
        return [(room, room.record(change, kept)) for room in self._rooms_for(change)]

    def _rooms_for(self, change: Change) -> Sequence[Room]:
        """The rooms the change goes to: the target room alone, without `matching`'s call and
        list, when it has no followed subroom (every change, at many target rooms)."""
        target = self._targets.get((change.connector, change.target))
        if target is None:
            target = self._target_rooms(change.connector, change.target)
        return (target.room,) if target.alone else target.matching(change)

    async def _dispatch(self, connector: Connector, item: Change | Gap) -> None:
        if isinstance(item, Gap):
            await self._gap(item)
            return
        counted_in, counted_out = self._counters(connector.name)
        counted_in.inc()
        if self.engine is not None:  # numbered in Redis; every node delivers what it follows
            await self.engine.publish(connector, item)
            return
        if self._send(item, counted_out):
            await asyncio.sleep(0)  # a source with a long backlog must not starve the writers

    def _taker(self, connector: Connector) -> Callable[[Change], None]:
        """The sink a connector may hand a change to while the hub waits for its stream."""
        counted_in, counted_out = self._counters(connector.name)
        series, key = counted_in.series, counted_in.key

        def take(change: Change) -> None:
            series[key] += 1  # counted_in.inc(), without a call: this runs per change
            self._send(change, counted_out)

        return take

    def _send(self, change: Change, counted_out: Counter) -> bool:
        """Route the change and hand each room's payload to the transport (written at once,
        or buffered until the end of the pass or the flush before the stream waits: see
        feed.delivery.transport); True when the transport's buffer filled up and was flushed.

        `route`, sending as it goes rather than building its list: per change, at one client
        per room, every Python call on this path is a measurable share of the feed's CPU
        (docs/benchmarks.md).
        """
        kept = change.kept()
        transport = self.transport
        full = False
        for room in self._rooms_for(change):
            payload = room.record(change, kept)
            receivers = len(room.members) - len(room.pending)
            if receivers > 0 and transport is not None:
                skip = list(room.pending) if room.pending else []
                full = transport.send_change(room.name, payload, skip) or full
                counted_out.series[counted_out.key] += receivers
        return full

    def _counters(self, connector: str) -> tuple[Counter, Counter]:
        counters = self._change_counters.get(connector)
        if counters is None:
            counters = self._change_counters[connector] = (
                self.metrics.counter("feed_changes_in_total", connector=connector),
                self.metrics.counter("feed_changes_out_total", connector=connector),
            )
        return counters

    async def _gap(self, gap: Gap) -> None:
        log.warning("connector %s: gap announced: %s", gap.connector, gap.reason)
        reached = self._gap_targets(gap)
        for (connector, target), rooms in self._targets.items():
            if connector == gap.connector and (reached is None or target in reached):
                rooms.filtered.forget_held()
        if self.engine is not None:
            await self.engine.publish_gap(gap)
            return
        self.metrics.inc("feed_gaps_total", connector=gap.connector)
        for room in list(self.rooms.values()):
            if (
                room.connector != gap.connector
                or (reached is not None and room.target not in reached)
                or not gap.reaches_key(room.key)
            ):
                continue
            reason = room.source_gap(gap.reason)
            room.mark_gap(reason)
            if room.members and self.transport is not None:
                body = {
                    "connector": gap.connector,
                    "room": room.name,
                    "target": room.target,
                    "reason": reason,
                    "seq": room.seq,
                    "epoch": self.epoch,
                    "ts": format_ts(gap.ts),
                }
                await self.transport.send_room(room.name, "gap", body, [])

    def _gap_targets(self, gap: Gap) -> set[str] | None:
        """The targets whose rooms a gap reaches (None: every target of its connector): its
        own, and the wider one whose rooms also receive its changes (`parent_target`)."""
        if not gap.target:
            return None
        source = self.connectors.get(gap.connector)
        wider = source.parent_target(gap.target) if source is not None else None
        return {gap.target} if wider is None else {gap.target, wider}

    def _target_rooms(self, connector: str, target: str) -> TargetRooms[Room]:
        rooms = self._targets.get((connector, target))
        if rooms is None:
            room = Room(f"{connector}:{target}", connector, target, capacity=self._capacity)
            room.empty_since = None
            self.rooms[room.name] = room
            source = self.connectors.get(connector)
            track = source is not None and not source.before_images
            wider = source.parent_target(target) if source is not None else None
            parent = self._target_rooms(connector, wider) if wider is not None else None
            rooms = TargetRooms(room, track=track, parent=parent)
            self._targets[(connector, target)] = rooms
        return rooms

    @property
    def _capacity(self) -> int:
        return self.settings.replay_buffer

    # -- subscriptions -------------------------------------------------------------------------

    def resolve(self, name: str) -> tuple[Connector, RoomAddress]:
        connector_name, colon, rest = name.partition(":")
        connector = self.connectors.get(connector_name)
        if connector is None or not colon:
            known = ", ".join(sorted(self.connectors)) or "none configured"
            raise ProtocolError(
                "unknown_connector",
                f"no connector {connector_name[:64]!r}; rooms look like <connector>:<target> "
                f"(connectors: {known})",
            )
        address = connector.resolve(rest)
        if address is None:
            targets = ", ".join(connector.targets()[:20])
            raise ProtocolError(
                "unknown_target",
                f"{connector.name!r} has no target for {rest[:128]!r} (targets: {targets})",
            )
        return connector, address

    def split_room_filter(self, request: SubscribeRequest) -> SubscribeRequest:
        """Accept a filter room's canonical name as `room` (`main:public.orders?status=eq.paid`).

        Acks return that name and clients store it, so it must work when sent back. A canonical
        filter never holds a `?` (its values are percent-encoded), so the name splits at the last
        one. The split wins over a key that holds a `?` and a filter after it: both would be
        named alike, and a room found by its name must be the room asked for (a row room keyed
        `2?status=eq.x` took the name of row 2's `status=eq.x` room, and whoever asked for that
        room next joined one that never matched anything). Any other `?` is part of the name (a
        Redis key or pattern may hold one).
        """
        base, mark, filter_text = request.room.rpartition("?")
        if not mark or not base or not filter_text:
            return request
        try:
            self.resolve(base)
        except ProtocolError:
            return request  # no room before the `?`: it belongs to the name
        if SHAPED_SUFFIX.search(filter_text):
            raise ProtocolError(
                "bad_request",
                "a room name ending in @<profile> is one the server shaped for an identity; "
                "subscribe with the room and filter you asked for",
            )
        limit = self.settings.max_filter_length
        try:
            parsed = parse_filter(filter_text, max_length=limit)
        except ProtocolError:
            with contextlib.suppress(ProtocolError):
                self.resolve(request.room)
                return request  # a key holding a `?` and no filter after it
            raise
        if request.filter is not None and (
            parse_filter(request.filter, max_length=limit).canonical != parsed.canonical
        ):
            raise ProtocolError(
                "bad_filter",
                "the room name already holds a filter; send it once, in `room` or in `filter`",
            )
        return replace(request, room=base, filter=filter_text)

    def connect(self, sid: str) -> None:
        self.clients.setdefault(sid, set())

    def disconnect(self, sid: str) -> None:
        for name in self.clients.pop(sid, set()):
            room = self.rooms.get(name)
            if room is not None:
                room.leave(sid)
                self._went_idle(room)

    async def subscribe(
        self,
        sid: str,
        request: SubscribeRequest,
        forced: RowFilter | None = None,
        mask: RowGuard | None = None,
        shape: Shape | None = None,
        owner: str = "anonymous",
        turn: str | None = None,
    ) -> dict[str, Any]:
        """Join a room; replay from `since` or answer with a snapshot; return the ack.

        `owner` (the identity's name) is charged for the row or filter room it creates or
        joins (feed.security.room_budget). Snapshots take turns by `turn` (the identity; this
        connection when None): one at a time each (feed.routing.turns).

        A `shape` (from feed.security.access) forces its filter, masks snapshot rows, and puts the
        client in a room whose live and replayed payloads are shaped the same way.
        """
        if shape is not None:
            forced, mask = shape.forced, shape.image
        request = self.split_room_filter(request)
        connector, address = self.resolve(request.room)
        if address.key is not None:
            connector.check_key(address.target, address.key)
        row_filter = (
            parse_filter(request.filter, max_length=self.settings.max_filter_length)
            if request.filter
            else None
        )
        if row_filter is not None:
            try:  # one that can never match: refused
                connector.check_filter(address.target, row_filter)
            except ProtocolError as exc:
                if shape is None or not shape.masked:
                    raise
                # The columns it lists for a mistyped name would include those masked here.
                raise ProtocolError(exc.code, exc.message.split(" (columns: ")[0]) from None
        if forced is not None:
            check_forced(connector, address.target, forced)
            row_filter = forced if row_filter is None else row_filter.merged(forced)
        subscribed = self.clients.setdefault(sid, set())
        name = room_name(connector.name, address, row_filter, shape)
        if shape is None and SHAPED_SUFFIX.search(name):
            # Its name would be that of a shaped room (a key or filter value ending in `@` and
            # 16 hex digits): whoever asked for the other one next would join this one, a
            # masked identity then receiving it unmasked.
            raise ProtocolError(
                "bad_request",
                f"{name[-80:]!r} ends like the name of a room shaped for an identity "
                "(@ and 16 hex digits); a key or filter value ending so cannot be followed",
            )
        if name not in subscribed and len(subscribed) >= self.settings.max_subscriptions:
            raise ProtocolError(
                "too_many_subscriptions",
                f"at most {self.settings.max_subscriptions} subscriptions per client; "
                "unsubscribe from a room first",
            )
        ephemeral = address.key is not None or row_filter is not None or shape is not None
        made = ephemeral and name not in self.rooms
        if made:
            self._make_room_for(owner)
        room = self._room(connector.name, address, row_filter, shape)
        if ephemeral:
            self.budget.charge(room.name, owner)
        if self.engine is not None:  # numbers, history and snapshots from the cluster
            # Held while the cluster registers it: a new room is empty until its subscriber
            # joins, and a registration slower than the grace (a burst of subscribes) let the
            # room expire under it, the subscriber then in a room nobody delivered to.
            held = room.empty_since is not None
            room.empty_since = None
            try:
                if not request.snapshot:
                    return await self.engine.subscribe(sid, request, room, connector, address, mask)
                async with self.snapshot_turns.turn(turn or sid):
                    self._still_connected(sid)
                    return await self.engine.subscribe(sid, request, room, connector, address, mask)
            finally:
                if held and not room.members:
                    room.empty_since = time.monotonic()
        recovered: bool | None = None
        cursor = room.seq
        if request.since is not None:
            same_epoch = request.epoch is None or request.epoch == self.epoch
            # A room made by this subscribe replaces one that went (its grace ended, or it was
            # evicted) after numbering who knows what: nothing can be recovered from it.
            recovered = same_epoch and not made and room.holds_after(request.since)
            if recovered:
                cursor = request.since
        already, previous = self._join(sid, room)
        gaps = room.gaps
        ack: dict[str, Any] = {
            "ok": True,
            "room": room.name,
            "seq": room.seq,
            "recovered": recovered,
            "epoch": self.epoch,
        }
        covers: Callable[[Change], bool] | None = None
        rest: list[SnapshotChunk] = []
        gap: str | None = None
        if request.snapshot and not recovered:
            target = self._target_rooms(connector.name, address.target)
            async with self.snapshot_turns.turn(turn or sid):
                self._still_connected(sid)
                # Only a filter room holds rows: the watch of a target or row room notes nothing.
                watch = target.filtered.watch(room.name)
                try:
                    snapshot = await self._snapshot(connector, address, row_filter, sid, room)
                finally:
                    target.filtered.unwatch(watch)
            covers = snapshot.covers
            # The rows the room holds, for a source that sends no before images; those that
            # left it while the snapshot was read get their change now (after the ones the
            # room had meanwhile, which is their order: each was the row's last).
            leavers = target.filtered.settle(watch, snapshot.keys, covers)
            if leavers is None:
                gap = UNSURE
            else:
                for change in leavers:
                    self._send_to_room(room, change)
            fields, rest = snapshot_ack(
                snapshot.rows,
                snapshot.keys,
                mask,
                snapshot.truncated,
                self.settings.snapshot_chunk_bytes,
                encode=to_json,
            )
            ack.update(fields)
            ack["seq"] = cursor
            # Every change the rows reflect has been numbered by now (the Snapshot contract),
            # and those are the numbers the catch-up may leave out, not only at its start: in
            # commit order a transaction still running when the snapshot was taken can come
            # before one it saw committed (Postgres makes a commit visible after writing its
            # record). Past this number every change comes.
            ack["snapshot_upto"] = room.seq
        # The ack goes out when this returns, before the catch-up task's first step: the rest of
        # the snapshot, then what the room got meanwhile, follow it in that order.
        filtered, start = shared_start(already, previous, cursor)
        self._spawn(self._catch_up(sid, room, start, covers if filtered else None, rest, gap, gaps))
        return ack

    def _still_connected(self, sid: str) -> None:
        """After waiting for a snapshot's turn: a client that left meanwhile is not read for
        (one that asked for many and left would still have had them all read)."""
        if sid not in self.clients:
            raise ProtocolError("not_connected", "this connection is closing")

    def _send_to_room(self, room: Room, change: Change) -> None:
        """Number one change in one room and send it to its live members (a row that left the
        room while a snapshot of it was read: `subscribe`); pending members get it in their
        catch-up, from the room's buffer."""
        payload = room.record(change)
        receivers = len(room.members) - len(room.pending)
        if receivers > 0 and self.transport is not None:
            self.transport.send_change(room.name, payload, list(room.pending))

    async def _snapshot(
        self,
        connector: Connector,
        address: RoomAddress,
        row_filter: RowFilter | None,
        sid: str,
        room: Room,
    ) -> Any:
        try:
            return await asyncio.wait_for(
                connector.snapshot(address, Where(row_filter), self.settings.snapshot_limit),
                SNAPSHOT_TIMEOUT,
            )
        except SnapshotNotSupported as exc:
            self._leave(sid, room)
            raise ProtocolError("snapshot_unsupported", str(exc)) from None
        except (FeedError, TimeoutError, OSError) as exc:
            self._leave(sid, room)
            raise ProtocolError(
                "snapshot_failed",
                f"snapshot failed: {str(exc) or f'no answer within {SNAPSHOT_TIMEOUT:g}s'}",
            ) from None

    def unsubscribe(self, sid: str, name: str) -> dict[str, Any]:
        room = self.rooms.get(name)
        if room is None or name not in self.clients.get(sid, set()):
            raise ProtocolError("not_subscribed", f"not subscribed to {name[:128]!r}")
        self._leave(sid, room)
        return {"ok": True, "room": name}

    def _room(
        self,
        connector: str,
        address: RoomAddress,
        row_filter: RowFilter | None,
        shape: Shape | None = None,
    ) -> Room:
        target_rooms = self._target_rooms(connector, address.target)
        if address.key is None and row_filter is None and shape is None:
            return target_rooms.room
        name = room_name(connector, address, row_filter, shape)
        room = self.rooms.get(name)
        if room is None:
            args = (name, connector, address.target, address.key, row_filter)
            room = (
                ShapedRoom(*args, capacity=self._capacity, shape=shape)
                if shape is not None
                else Room(*args, capacity=self._capacity)
            )
            self.rooms[name] = room
            target_rooms.add(room)
        return room

    def _join(self, sid: str, room: Room) -> tuple[bool, CatchUp | None]:
        """Enter the room as a pending member: live sends skip it until it is caught up.

        Returns what `shared_start` needs: whether the client was in the room already, and
        the catch-up under way for it there, if any."""
        already, previous = sid in room.members, self._catch_ups.get((sid, room.name))
        room.join(sid)
        self.budget.went_busy(room.name)
        room.pending.add(sid)
        self.clients.setdefault(sid, set()).add(room.name)
        if self.transport is not None:
            self.transport.enter(sid, room.name)
        return already, previous

    def _leave(self, sid: str, room: Room) -> None:
        room.leave(sid)
        self.clients.get(sid, set()).discard(room.name)
        if self.transport is not None:
            self.transport.leave(sid, room.name)
        self._went_idle(room)

    async def _catch_up(
        self,
        sid: str,
        room: Room,
        cursor: int,
        covers: Callable[[Change], bool] | None,
        chunks: list[SnapshotChunk] | None = None,
        gap: str | None = None,
        gaps: int = 0,
    ) -> None:
        """Send a new member the rest of its snapshot and what it missed after `cursor`, in
        order, then let it go live.

        A gap announced since it joined (`gaps`: the room's count then) is sent again: the live
        one reached it before its subscribe's answer, when a client has no room to give it to.
        One announced before it joined is not: its snapshot was read after it, or its answer
        said `recovered: false`.

        Snapshot chunks 2..N go first, each once the client has taken most of the previous one
        (`send_paced`), so a large snapshot never piles up past the outbound limit. Then each
        pass sends everything buffered so far in one `changes` frame; the member leaves the
        pending set in the same step that finds nothing newer, so no live send can overtake it.
        A newer subscribe of the same client to the same room supersedes this one.
        """
        key = (sid, room.name)
        token = self._catch_ups[key] = CatchUp(cursor)
        try:
            if chunks and self.transport is not None:
                total = len(chunks) + 1
                for index, chunk in enumerate(chunks, start=2):
                    if sid not in room.pending or self._catch_ups.get(key) is not token:
                        return
                    body = chunk_event(room.name, index, total, chunk)
                    await self.transport.send_paced(sid, "snapshot", body)
            if gap is not None and self.transport is not None:  # the snapshot's rows are unsure
                await self.transport.send_to(sid, "gap", self._gap_body(room, gap))
            while sid in room.pending and self._catch_ups.get(key) is token:
                if room.gaps != gaps and self.transport is not None:
                    gaps = room.gaps
                    reason = room.gap_reason or "the source may have lost changes"
                    await self.transport.send_to(sid, "gap", self._gap_body(room, reason))
                    continue
                if cursor < room.seq and not room.buffered_after(cursor):
                    if self.transport is not None:
                        reason = "the replay buffer no longer holds what was missed"
                        await self.transport.send_to(sid, "gap", self._gap_body(room, reason))
                    cursor = room.seq
                    continue
                batch = [
                    payload
                    for _, change, payload in room.after(cursor)
                    if covers is None or not covers(change)
                ]
                if room.seq == cursor:
                    room.pending.discard(sid)
                    return
                cursor = room.seq
                if batch and self.transport is not None:
                    await self.transport.send_to(sid, "changes", batch)
                    self.metrics.inc("feed_changes_replayed_total", len(batch))
                token.sent = cursor
        except Exception:
            log.exception("catch-up for %s in %s failed", sid, room.name)
            room.pending.discard(sid)
        finally:
            if self._catch_ups.get(key) is token:
                del self._catch_ups[key]

    def _gap_body(self, room: Room, reason: str) -> dict[str, Any]:
        return gap_event(room.connector, room.name, room.target, reason, room.seq, self.epoch)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- catalog, status, health ---------------------------------------------------------------

    def catalog(self) -> dict[str, Any]:
        return {
            "ok": True,
            "epoch": self.epoch,
            "connectors": [
                {
                    "name": c.name,
                    "type": c.kind,
                    "status": c.status.to_json(),
                    "targets": c.targets(),
                    **self._reader(c.name),
                }
                for c in self.connectors.values()
            ],
            "unconfigured": list(self.unconfigured),
        }

    def _reader(self, name: str) -> dict[str, Any]:
        """In a cluster, which node reads the connector (`reader`, None when none does)."""
        if self.engine is None:
            return {}
        return {"reader": self.engine.reader_of(name)}

    def ready(self) -> bool:
        if self.engine is not None and not self.engine.up:
            return False
        return all(c.status.state in (State.UP, State.LAGGING) for c in self.connectors.values())

    def _status_changed(self, status: Status) -> None:
        level = logging.WARNING if status.state is State.DOWN else logging.INFO
        detail = f": {status.detail}" if status.detail else ""
        log.log(level, "connector %s is %s%s", status.connector, status.state.value, detail)
        if self.engine is not None:
            self.engine.status_changed(status)
        self._announce(status)

    def reader_changed(self, name: str) -> None:
        """(Cluster) another node reads connector `name` now: its clients hear it with the
        status, whose state may not have changed."""
        connector = self.connectors.get(name)
        if connector is not None:
            self._announce(connector.status)

    def _announce(self, status: Status) -> None:
        body = {**status.to_json(), **self._reader(status.connector)}
        if self.announce_status is not None:
            self._spawn(self.announce_status(body))
        elif self.transport is not None:
            self._spawn(self.transport.broadcast("status", body))

    # -- metrics -------------------------------------------------------------------------------

    def _describe_metrics(self) -> None:
        m = self.metrics
        m.describe("feed_changes_in_total", "counter", "Changes received from each connector")
        m.describe("feed_changes_out_total", "counter", "Change deliveries to clients")
        m.describe("feed_changes_replayed_total", "counter", "Changes re-sent on resume")
        m.describe("feed_gaps_total", "counter", "Loss windows announced by connectors")
        m.describe("feed_connector_restarts_total", "counter", "Connector restarts after failure")
        m.describe("feed_connector_up", "gauge", "1 when the connector is up")
        m.describe("feed_rooms", "gauge", "Rooms by kind")
        m.describe("feed_clients", "gauge", "Connected clients")
        m.describe("feed_subscriptions", "gauge", "Subscriptions across clients")
        m.describe("feed_replay_evictions_total", "counter", "Changes dropped from replay buffers")
        m.describe("feed_errors_total", "counter", "Client requests refused, by code")
        m.describe("feed_rooms_refused_total", "counter", "New rooms refused, by limit reached")
        m.describe("feed_rooms_evicted_total", "counter", "Idle rooms expired early for new ones")
        for name, (kind, text) in CAPTURE_METRICS.items():
            m.describe(name, kind, text)
        # Counters of events, at 0 from the start: a series that first appears at 1 gives
        # `increase()` one sample, so an alert on it missed the first gap (deploy/prometheus).
        for connector in self.connectors:
            m.counter("feed_gaps_total", connector=connector)
        for reason in ("identity", "total"):
            m.counter("feed_rooms_refused_total", reason=reason)
        m.gauges(self._gauge_values)

    def _gauge_values(self) -> Iterable[tuple[str, Labels, float]]:
        for c in self.connectors.values():
            up = 1.0 if c.status.state in (State.UP, State.LAGGING) else 0.0
            yield "feed_connector_up", (("connector", c.name),), up
            yield "feed_connector_restarts_total", (("connector", c.name),), float(c.restarts)
            for name, labels, value in c.gauges():
                yield name, (("connector", c.name), *labels), value
        kinds = {"target": 0, "row": 0, "filter": 0}
        evicted = self._evicted_by_dropped_rooms
        for room in self.rooms.values():
            kinds["row" if room.key is not None else "filter" if room.filter else "target"] += 1
            evicted += room.evicted
        for kind, count in kinds.items():
            yield "feed_rooms", (("kind", kind),), float(count)
        yield "feed_clients", (), float(len(self.clients))
        yield "feed_subscriptions", (), float(sum(len(s) for s in self.clients.values()))
        yield "feed_replay_evictions_total", (), float(evicted)
