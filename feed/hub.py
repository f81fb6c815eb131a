"""The hub: runs connectors, routes each change to its rooms, numbers, buffers and sends it.

Routing is synchronous and allocation-light because it runs once per change for every subscriber
at once; filter rooms are found by value through an index (feed.routing), so the per-change cost
does not grow with the number of per-user or per-tenant filter rooms.
Everything that waits (snapshots, catch-up sends) happens off the routing path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from connectors.base import Connector, RoomAddress, State, Status
from feed.access import Shape, ShapedRoom
from feed.change import Change, Gap, format_ts, to_json
from feed.config import ServerConfig
from feed.errors import FeedError, ProtocolError, SnapshotNotSupported
from feed.filters import RowFilter, parse_filter
from feed.metrics import Counter, Labels, Metrics
from feed.protocol import SubscribeRequest
from feed.rooms import Room
from feed.routing import FilterIndex
from feed.transport import FlushBeforeWaiting, Transport

log = logging.getLogger("feed.hub")

BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
HEALTHY_RUN = 30.0
"""A connector that ran this long before failing starts its backoff from the beginning again."""
SNAPSHOT_TIMEOUT = 30.0

RowGuard = Callable[[Mapping[str, Any]], Mapping[str, Any] | None]


@dataclass
class TargetRooms:
    """The rooms of one connector target: the target room and the followed subrooms.

    Filter rooms are found through an index of their equality conditions (feed.routing), so a
    change costs the same with ten per-user rooms as with a hundred thousand.
    """

    room: Room
    by_key: dict[str, dict[str, Room]] = field(default_factory=dict)
    filtered: FilterIndex = field(default_factory=FilterIndex)

    def add(self, room: Room) -> None:
        if room.key is not None:
            self.by_key.setdefault(room.key, {})[room.name] = room
        else:  # a filter room, or a shaped room that sees the whole target
            self.filtered.add(room)

    def discard(self, room: Room) -> None:
        if room.key is not None:
            rooms = self.by_key.get(room.key, {})
            rooms.pop(room.name, None)
            if not rooms:
                self.by_key.pop(room.key, None)
        else:
            self.filtered.discard(room)

    def matching(self, change: Change) -> list[Room]:
        rooms = [self.room]
        key = change.row_key
        if key is not None and self.by_key:
            for room in self.by_key.get(key, {}).values():
                if room.filter is None or room.filter.matches(change):
                    rooms.append(room)
        self.filtered.collect(change, rooms)
        return rooms


STOP_GRACE = 5.0
"""Seconds a cancelled connector task gets to save its position and let go of its source."""


async def cancel_and_wait(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel `tasks` and wait for them; cancel again any still running after STOP_GRACE.

    A driver can swallow a cancellation that lands just as its reply arrives (redis-py has done
    so), and a connector task that ignored its one cancel would hold shutdown up forever. The
    grace comes first so that a connector saving its position on the way out is not cut short.
    """
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=STOP_GRACE)
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
        self.epoch = secrets.token_hex(8)
        # Source types this deployment leaves out, each {"type", "detail"} saying how to get it
        # (`feed demo` names MongoDB); the catalog lists them so clients can show them as such.
        self.unconfigured: list[dict[str, str]] = []
        self.rooms: dict[str, Room] = {}
        self.clients: dict[str, set[str]] = {}
        self._targets: dict[tuple[str, str], TargetRooms] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._change_counters: dict[str, tuple[Counter, Counter]] = {}
        self._describe_metrics()
        for connector in self.connectors.values():
            connector.on_status(self._status_changed)

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
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
        if self.transport is not None:
            with contextlib.suppress(Exception):
                await self.transport.disconnect_all()

    async def _supervise(self, connector: Connector) -> None:
        """Run one connector forever; a crash restarts it with doubling backoff, alone."""
        delay = BACKOFF_START
        while True:
            started = time.monotonic()
            try:
                async with connector:
                    await self._follow(connector)
                reason = "change stream ended"
            except asyncio.CancelledError:
                raise
            except FeedError as exc:
                reason = str(exc)
                log.warning("connector %s: %s", connector.name, reason)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                log.exception("connector %s crashed", connector.name)
            self.metrics.inc("feed_connector_restarts_total", connector=connector.name)
            if connector.status.state not in (State.DOWN,):
                connector.set_status(State.DOWN, reason)
            if time.monotonic() - started > HEALTHY_RUN:
                delay = BACKOFF_START
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, BACKOFF_MAX)

    async def _follow(self, connector: Connector) -> None:
        """Dispatch the connector's changes; what they routed is sent when the stream waits."""
        stream = aiter(connector.changes())
        transport = self.transport
        idle = transport.flush if transport is not None else (lambda: None)
        try:
            while True:
                try:
                    item = await FlushBeforeWaiting(anext(stream), idle)
                except StopAsyncIteration:
                    return
                if transport is not None:
                    transport.hold()
                await self._dispatch(connector, item)
        finally:
            idle()

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
            del self.rooms[room.name]
            self._targets[(room.connector, room.target)].discard(room)
        return len(expired)

    # -- routing -------------------------------------------------------------------------------

    def route(self, change: Change) -> list[tuple[Room, dict[str, Any]]]:
        """Number and buffer the change in every room it matches; return what to send where."""
        rooms = self._target_rooms(change.connector, change.target).matching(change)
        return [(room, room.record(change)) for room in rooms]

    async def _dispatch(self, connector: Connector, item: Change | Gap) -> None:
        if isinstance(item, Gap):
            await self._gap(item)
            return
        counted_in, counted_out = self._counters(connector.name)
        counted_in.inc()
        transport = self.transport
        for room, payload in self.route(item):
            receivers = len(room.members) - len(room.pending)
            if receivers > 0 and transport is not None:
                skip = list(room.pending) if room.pending else []
                await transport.send_room(room.name, "change", payload, skip)
                counted_out.inc(receivers)

    def _counters(self, connector: str) -> tuple[Counter, Counter]:
        counters = self._change_counters.get(connector)
        if counters is None:
            counters = self._change_counters[connector] = (
                self.metrics.counter("feed_changes_in_total", connector=connector),
                self.metrics.counter("feed_changes_out_total", connector=connector),
            )
        return counters

    async def _gap(self, gap: Gap) -> None:
        self.metrics.inc("feed_gaps_total", connector=gap.connector)
        log.warning("connector %s: gap announced: %s", gap.connector, gap.reason)
        for room in list(self.rooms.values()):
            if room.connector != gap.connector or (gap.target and room.target != gap.target):
                continue
            room.mark_gap()
            if room.members and self.transport is not None:
                body = {
                    "connector": gap.connector,
                    "room": room.name,
                    "target": room.target,
                    "reason": gap.reason,
                    "seq": room.seq,
                    "ts": format_ts(gap.ts),
                }
                await self.transport.send_room(room.name, "gap", body, [])

    def _target_rooms(self, connector: str, target: str) -> TargetRooms:
        rooms = self._targets.get((connector, target))
        if rooms is None:
            room = Room(f"{connector}:{target}", connector, target, capacity=self._capacity)
            room.empty_since = None
            self.rooms[room.name] = room
            rooms = self._targets[(connector, target)] = TargetRooms(room)
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

    def connect(self, sid: str) -> None:
        self.clients.setdefault(sid, set())

    def disconnect(self, sid: str) -> None:
        for name in self.clients.pop(sid, set()):
            room = self.rooms.get(name)
            if room is not None:
                room.leave(sid)

    async def subscribe(
        self,
        sid: str,
        request: SubscribeRequest,
        forced: RowFilter | None = None,
        mask: RowGuard | None = None,
        shape: Shape | None = None,
    ) -> dict[str, Any]:
        """Join a room; replay from `since` or answer with a snapshot; return the ack.

        A `shape` (from feed.access) forces its filter, masks snapshot rows, and puts the client
        in a room whose live and replayed payloads are shaped the same way.
        """
        if shape is not None:
            forced, mask = shape.forced, shape.image
        connector, address = self.resolve(request.room)
        row_filter = (
            parse_filter(request.filter, max_length=self.settings.max_filter_length)
            if request.filter
            else None
        )
        if forced is not None:
            row_filter = forced if row_filter is None else row_filter.merged(forced)
        subscribed = self.clients.setdefault(sid, set())
        name = room_name(connector.name, address, row_filter, shape)
        if name not in subscribed and len(subscribed) >= self.settings.max_subscriptions:
            raise ProtocolError(
                "too_many_subscriptions",
                f"at most {self.settings.max_subscriptions} subscriptions per client; "
                "unsubscribe from a room first",
            )
        room = self._room(connector.name, address, row_filter, shape)
        recovered: bool | None = None
        cursor = room.seq
        if request.since is not None:
            same_epoch = request.epoch is None or request.epoch == self.epoch
            recovered = same_epoch and room.holds_after(request.since)
            if recovered:
                cursor = request.since
        self._join(sid, room)
        ack: dict[str, Any] = {
            "ok": True,
            "room": room.name,
            "seq": room.seq,
            "recovered": recovered,
            "epoch": self.epoch,
        }
        covers: Callable[[Change], bool] | None = None
        if request.snapshot and not recovered:
            snapshot = await self._snapshot(connector, address, row_filter, sid, room)
            covers = snapshot.covers
            rows = [mask(r) if mask else r for r in snapshot.rows]
            ack["snapshot"] = [to_json(r) for r in rows if r is not None]
            ack["snapshot_truncated"] = snapshot.truncated
            ack["seq"] = cursor
        self._spawn(self._catch_up(sid, room, cursor, covers))
        return ack

    async def _snapshot(
        self,
        connector: Connector,
        address: RoomAddress,
        row_filter: RowFilter | None,
        sid: str,
        room: Room,
    ) -> Any:
        where = row_filter.matches_image if row_filter else (lambda row: True)
        try:
            return await asyncio.wait_for(
                connector.snapshot(address, where, self.settings.snapshot_limit), SNAPSHOT_TIMEOUT
            )
        except SnapshotNotSupported as exc:
            self._leave(sid, room)
            raise ProtocolError("snapshot_unsupported", str(exc)) from None
        except (FeedError, TimeoutError, OSError) as exc:
            self._leave(sid, room)
            raise ProtocolError("snapshot_failed", f"snapshot failed: {exc}") from None

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

    def _join(self, sid: str, room: Room) -> None:
        """Enter the room as a pending member: live sends skip it until it is caught up."""
        room.join(sid)
        room.pending.add(sid)
        self.clients.setdefault(sid, set()).add(room.name)
        if self.transport is not None:
            self.transport.enter(sid, room.name)

    def _leave(self, sid: str, room: Room) -> None:
        room.leave(sid)
        self.clients.get(sid, set()).discard(room.name)
        if self.transport is not None:
            self.transport.leave(sid, room.name)

    async def _catch_up(
        self, sid: str, room: Room, cursor: int, covers: Callable[[Change], bool] | None
    ) -> None:
        """Send a new member what it missed after `cursor`, in order, then let it go live.

        Each pass sends everything buffered so far in one `changes` frame; the member leaves the
        pending set in the same step that finds nothing newer, so no live send can overtake it.
        """
        try:
            while sid in room.pending:
                if cursor < room.seq and not room.holds_after(cursor):
                    if self.transport is not None:
                        body = {
                            "connector": room.connector,
                            "room": room.name,
                            "target": room.target,
                            "reason": "the replay buffer no longer holds what was missed",
                            "seq": room.seq,
                        }
                        await self.transport.send_to(sid, "gap", body)
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
        except Exception:
            log.exception("catch-up for %s in %s failed", sid, room.name)
            room.pending.discard(sid)

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
                }
                for c in self.connectors.values()
            ],
            "unconfigured": list(self.unconfigured),
        }

    def ready(self) -> bool:
        return all(c.status.state in (State.UP, State.LAGGING) for c in self.connectors.values())

    def _status_changed(self, status: Status) -> None:
        log.info("connector %s is %s %s", status.connector, status.state.value, status.detail)
        if self.transport is not None:
            self._spawn(self.transport.broadcast("status", status.to_json()))

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
        m.gauges(self._gauge_values)

    def _gauge_values(self) -> Iterable[tuple[str, Labels, float]]:
        for c in self.connectors.values():
            up = 1.0 if c.status.state in (State.UP, State.LAGGING) else 0.0
            yield "feed_connector_up", (("connector", c.name),), up
        kinds = {"target": 0, "row": 0, "filter": 0}
        evicted = 0
        for room in self.rooms.values():
            kinds["row" if room.key is not None else "filter" if room.filter else "target"] += 1
            evicted += room.evicted
        for kind, count in kinds.items():
            yield "feed_rooms", (("kind", kind),), float(count)
        yield "feed_clients", (), float(len(self.clients))
        yield "feed_subscriptions", (), float(sum(len(s) for s in self.clients.values()))
        yield "feed_replay_evictions_total", (), float(evicted)
