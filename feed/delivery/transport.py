"""How the hub reaches clients: room frames encoded once and written to every client.

python-socketio's `emit` to a room creates one asyncio task per recipient per message, and each
task re-enters Engine.IO's `send` (a ping-timeout check, a log call, an awaited queue put). At
hundreds of recipients that bookkeeping costs more server CPU than writing to the sockets.
Profiling the fan-out (docs/benchmarks.md) showed the rest of the cost is per *frame* per
recipient: each queued packet woke the client's Engine.IO writer, which went through
`asyncio.wait_for` and the ASGI send path. So this layer:

- encodes a room frame once and hands the same bytes (or, for queues, the same Engine.IO packet
  object, made on first use) to each recipient, synchronously and without tasks; a change's
  JSON is itself encoded once, however many rooms it goes to: each room splices its `room` and
  `seq` in front of it (feed.core.rooms.Payload);
- writes it to each websocket client's connection at once (feed.delivery.eio_websocket: those
  sockets have no writer task): the same WebSocket frame bytes for every such client (a server
  frame is unmasked, so it is identical for all clients that did not negotiate compression; a
  client that did gets it through its own compressor). A client whose transport is paused, or that
  already has packets waiting, gets it behind them in its bounded backlog, so nothing ever
  overtakes what waits and a slow client still meets the outbound queue limit; long-polling
  clients (and other Engine.IO servers' sockets) get it in their Engine.IO queue;
- under load, sends fewer frames: the changes routed to a room while the hub drains what its
  change stream has ready are sent as one `changes` frame (a list, in order; all but the first,
  below) when the stream would wait (`hold`, then `flush` from `FlushBeforeWaiting`). Changes
  sent by anyone else, and those a connector hands the hub in its own call (`send_change`,
  through the hub's sink: connectors.base), are flushed at the end of the loop pass, one
  iteration later. Either way a room's first change since the last flush is written at once
  when nothing else waits to go out, and only its further changes wait for the flush: a burst
  is at most two frames per room (its first change, then the rest as one `changes` frame), and
  a lone change costs no buffering (at one client per room, about 4% of the server's CPU per
  change: docs/benchmarks.md).

Order is what the hub would get from unbuffered sends. Buffered room frames are flushed before
anything else goes out (a direct `send_to`, a broadcast, a gap) and before membership changes,
so every queue receives packets in the order the hub asked for them. Each buffered change keeps
the skip list it was sent with (members still being caught up), because a member can leave the
hub's pending set between two changes of one batch: it then gets exactly the changes that were
not skipped for it, after the catch-up frame that the hub sent before releasing it.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from typing import Any, Protocol, TypeVar

from engineio import packet as eio_packet
from socketio import packet as sio_packet

from feed.core.change import dumps_json
from feed.core.rooms import Payload
from feed.delivery.eio_websocket import LeanSocket

T = TypeVar("T")

_EVENT_PREFIX = str(sio_packet.EVENT)  # a Socket.IO EVENT in the default namespace, no ack id
_CHANGE_HEAD = b'42["change",'  # Engine.IO MESSAGE, Socket.IO EVENT
_CHANGES_HEAD = b'42["changes",['

# Raw UTF-8 rather than \u escapes (orjson): the same JSON to every parser, and shorter frames.
# Integers past 64 bits raise TypeError, and the caller falls back to the Packet path.
_dumpb = dumps_json


def _message(text: str) -> Any:
    """An Engine.IO MESSAGE packet for `text`, its encoding cached for every client's writer."""
    packet = eio_packet.Packet(eio_packet.MESSAGE, text)
    packet.encode()
    return packet


MAX_BATCH = 256
"""Changes per `changes` frame; a longer run for one room goes out as several frames, in order."""

PACE_BYTES = 64 * 1024
"""Bytes that may wait for a client before `send_paced` holds its next part back."""

PACE_INTERVAL = 0.005
"""Seconds between two looks at a paced client's queue."""

_NO_ROOMS: dict[Any, Any] = {}

MAX_BUFFERED = 1024
"""Changes held across all rooms before a flush is forced (and the loop given a turn)."""


class Transport(Protocol):
    def hold(self, first_at_once: bool = True) -> None:
        """Keep `change` sends buffered until `flush`: the caller promises to flush before it
        waits, so no extra loop pass is needed for it. With `first_at_once`, a room's first
        change since the last flush is written at once when nothing else waits (the hub's loop
        over a change stream, whose next change may be a while coming); without it every change
        waits for the flush (a cluster node relaying runs it already holds whole: one frame per
        room and client)."""

    def flush(self) -> None: ...

    def enter(self, sid: str, room: str) -> None: ...

    def leave(self, sid: str, room: str) -> None: ...

    async def send_room(self, room: str, event: str, data: Any, skip: list[str]) -> None: ...

    def send_change(self, room: str, data: Any, skip: list[str]) -> bool:
        """`send_room(room, "change", ...)` without awaiting, for a change routed inside a
        connector's own call (`Connector.sink`); True when the buffer filled up and was flushed,
        and a caller that can should give the loop a turn."""
        ...

    async def send_to(self, sid: str, event: str, data: Any) -> None: ...

    async def send_paced(self, sid: str, event: str, data: Any) -> None: ...

    async def broadcast(self, event: str, data: Any) -> None: ...

    async def disconnect_all(self) -> None: ...


class FlushBeforeWaiting:
    """Await `awaitable` (the next item of a change stream); if it would suspend, call `idle`
    first.

    The hub routes every change a stream has ready without waiting, and sends what it routed
    when the stream has nothing more: the batch ends exactly where the source paused, and a lone
    change goes out in the same loop pass that routed it instead of one pass later.
    """

    __slots__ = ("awaitable", "idle")

    def __init__(self, awaitable: Awaitable[T], idle: Callable[[], None]) -> None:
        self.awaitable = awaitable
        self.idle = idle

    def __await__(self) -> Generator[Any, Any, Any]:
        inner = self.awaitable.__await__()
        try:
            signal = inner.send(None)
        except StopIteration as done:  # ready without waiting
            return done.value
        self.idle()
        while True:  # what `yield from inner` does from here on
            try:
                sent = yield signal
            except GeneratorExit:
                inner.close()
                raise
            except BaseException as exc:  # a cancellation, say: passed on as it came
                try:
                    signal = inner.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    signal = inner.send(sent)
                except StopIteration as done:
                    return done.value


Entry = tuple[Any, Sequence[str]]
"""A buffered change payload and the sids it must skip."""


class Outgoing:
    """One Socket.IO event, encoded once: frame bytes for sockets, Engine.IO packets for queues.

    Most frames only ever reach websockets written directly, so the Engine.IO packet objects
    (for long-polling clients and backlogs) are made on first use.
    """

    __slots__ = ("_packets", "text", "wire")

    def __init__(self, text: bytes | None, packets: list[Any] | None = None) -> None:
        self.text = text
        """The Engine.IO text (`4` + the Socket.IO text) when the event is one packet."""
        self._packets = packets
        self.wire = _text_frame(text) if text is not None else None
        """The unmasked, uncompressed WebSocket text frame of `text` (what a server sends every
        client); made at once, not on first use: it is read once per recipient."""

    @classmethod
    def of_packets(cls, packets: list[Any]) -> Outgoing:
        single = packets[0].encode() if len(packets) == 1 else None
        return cls(single.encode() if isinstance(single, str) else None, packets)

    @property
    def packets(self) -> list[Any]:
        if self._packets is None:
            assert self.text is not None
            text = self.text.decode()
            packet = eio_packet.Packet(eio_packet.MESSAGE, text[1:])
            packet.encode_cache = text  # encoded once, for every client's queue
            self._packets = [packet]
        return self._packets


def _text_frame(text: bytes) -> bytes:
    n = len(text)
    if n < 126:
        head = struct.pack("!BB", 0x81, n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x81, 126, n)
    else:
        head = struct.pack("!BBQ", 0x81, 127, n)
    return head + text


def _payload_json(payload: Any) -> bytes:
    """One change payload as JSON: spliced from the change's JSON when it is a room's `Payload`
    (the body is encoded once per change, not once per room), else encoded whole."""
    if type(payload) is Payload:
        body = payload.json_body()
        if body is not None:
            return body
    return _dumpb(payload)


class SocketIOTransport:
    """Rooms are python-socketio rooms in the default namespace."""

    namespace = "/"

    def __init__(self, sio: Any, max_batch: int = MAX_BATCH) -> None:
        self.sio = sio
        self.max_batch = max_batch
        self._buffered: dict[str, list[Entry]] = {}
        self._count = 0
        self._flush_handle: asyncio.Handle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        """The loop the flushes are scheduled on, kept: on Python 3.11 each
        `asyncio.get_running_loop()` makes a getpid system call, and this runs per change."""
        self._held = False
        self._first_at_once = True
        self._through: set[str] = set()
        """Rooms a change was written to at once since the last flush (`send_change`)."""
        self.frames_sent = 0
        """Frames encoded (each went to every recipient); for benchmarks and tests."""
        self.direct_writes = 0
        """Frames written straight to a connection rather than through its queue."""

    # -- membership ----------------------------------------------------------------------------

    def enter(self, sid: str, room: str) -> None:
        # The manager's basic_* methods are synchronous: joining cannot interleave with routing.
        self.flush()
        self.sio.manager.basic_enter_room(sid, self.namespace, room)

    def leave(self, sid: str, room: str) -> None:
        self.flush()
        self.sio.manager.basic_leave_room(sid, self.namespace, room)

    # -- sending -------------------------------------------------------------------------------

    async def send_room(self, room: str, event: str, data: Any, skip: list[str]) -> None:
        if event != "change":
            self.flush()
            self._deliver(room, self._packets(event, data), skip)
            return
        if self.send_change(room, data, skip):
            await asyncio.sleep(0)  # a source with a long backlog must not starve the writers

    def send_change(self, room: str, data: Any, skip: list[str]) -> bool:
        entries = self._buffered.get(room)
        if entries is None:
            if (
                not self._buffered
                and not skip
                and room not in self._through
                and self._first_at_once
            ):
                # Nothing waits to go out, and nothing went to this room since the last flush:
                # written at once (the room's further changes until the flush leave as one
                # frame). The flush ends the record of rooms written: the one held sends
                # promise, else one at the end of this loop pass.
                self._through.add(room)
                if not self._held:
                    self._schedule_flush()
                self._send_one(room, data)
                return False
            self._buffered[room] = [(data, skip)]
        else:
            entries.append((data, skip))
        self._count += 1
        if self._count >= MAX_BUFFERED:
            self.flush()
            return True
        if not self._held:
            self._schedule_flush()
        return False

    def _schedule_flush(self) -> None:
        if self._flush_handle is None:
            loop = self._loop
            if loop is None or loop.is_closed():
                loop = self._loop = asyncio.get_running_loop()
            self._flush_handle = loop.call_soon(self.flush)

    async def send_to(self, sid: str, event: str, data: Any) -> None:
        self.flush()
        eio_sid = self.sio.manager.eio_sid_from_sid(sid, self.namespace)
        if eio_sid is not None:
            self._put(eio_sid, self._packets(event, data))

    async def send_paced(self, sid: str, event: str, data: Any) -> None:
        """`send_to`, once at most PACE_BYTES wait for this client (its queue or backlog).

        For a large payload in parts (snapshot chunks): each part goes out when the client has
        taken most of the one before, so the parts never pile up to the outbound limit and cut
        off a client that is reading. A client that stops reading is closed by its ping
        timeout, which ends the wait (as does any other close).
        """
        eio_sid = self.sio.manager.eio_sid_from_sid(sid, self.namespace)
        if eio_sid is None:
            return
        while True:
            socket = self.sio.eio.sockets.get(eio_sid)
            if socket is None or socket.closing or socket.closed:
                return
            if getattr(socket.queue, "bytes", 0) <= PACE_BYTES:
                break
            await asyncio.sleep(PACE_INTERVAL)  # no event tells when a queue shrinks
        self.flush()
        self._put(eio_sid, self._packets(event, data))

    async def broadcast(self, event: str, data: Any) -> None:
        self.flush()
        self._deliver(None, self._packets(event, data), ())

    async def disconnect_all(self) -> None:
        self.flush()
        for sid in list(self.sio.manager.get_participants(self.namespace, None)):
            await self.sio.disconnect(sid[0], namespace=self.namespace)

    @property
    def buffered(self) -> int:
        """Changes routed and not yet written (they go out at the end of the loop pass)."""
        return self._count

    def hold(self, first_at_once: bool = True) -> None:
        self._held = True
        self._first_at_once = first_at_once

    def flush(self) -> None:
        """Send every buffered room frame now (rooms in the order they were first buffered)."""
        self._held = False
        self._first_at_once = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._through:
            self._through.clear()
        if not self._buffered:
            return
        buffered, self._buffered, self._count = self._buffered, {}, 0
        for room, entries in buffered.items():
            self._flush_room(room, entries)

    # -- mechanics -----------------------------------------------------------------------------

    def _send_one(self, room: str, data: Any) -> None:
        """One change to every member of the room, as a `change` frame."""
        try:
            out = Outgoing(_CHANGE_HEAD + _payload_json(data) + b"]")
        except (TypeError, ValueError):
            out = self._packets("change", data)
        else:
            self.frames_sent += 1
        self._deliver(room, out, ())

    def _flush_room(self, room: str, entries: list[Entry]) -> None:
        if len(entries) == 1 and not entries[0][1]:  # the common case at low rates: one change
            self._send_one(room, entries[0][0])
            return
        if not any(skip for _, skip in entries):
            for out in self._change_frames([data for data, _ in entries]):
                self._deliver(room, out, ())
            return
        # Some members were still being caught up for some of these changes: group the room's
        # members by the changes they get, and encode once per group (usually two groups).
        skips = [frozenset(skip) if skip else None for _, skip in entries]
        groups: dict[tuple[int, ...], list[str]] = {}
        for sid, eio_sid in self.sio.manager.get_participants(self.namespace, room):
            picked = tuple(i for i, s in enumerate(skips) if s is None or sid not in s)
            if picked:
                groups.setdefault(picked, []).append(eio_sid)
        for picked, eio_sids in groups.items():
            for out in self._change_frames([entries[i][0] for i in picked]):
                for eio_sid in eio_sids:
                    self._put(eio_sid, out)

    def _change_frames(self, payloads: list[Any]) -> Iterable[Outgoing]:
        for start in range(0, len(payloads), self.max_batch):
            chunk = payloads[start : start + self.max_batch]
            self.frames_sent += 1
            try:
                if len(chunk) == 1:
                    text = _CHANGE_HEAD + _payload_json(chunk[0]) + b"]"
                else:
                    body = b",".join([_payload_json(p) for p in chunk])
                    text = _CHANGES_HEAD + body + b"]]"
            except (TypeError, ValueError):
                self.frames_sent -= 1  # counted again by _packets
                yield (
                    self._packets("changes", chunk)
                    if len(chunk) > 1
                    else self._packets("change", chunk[0])
                )
                continue
            yield Outgoing(text)

    def _packets(self, event: str, data: Any) -> Outgoing:
        """One Socket.IO event as Engine.IO packets, encoded once for every recipient.

        The feed's payloads are JSON by construction (feed.core.change.to_json), so the Socket.IO
        text is built here as python-socketio's `Packet.encode` would build it, without the Packet's
        recursive search for binary data in every value of a batch (a tenth of the server's CPU
        under a Redis burst), and with orjson (JSON encoding was the largest remaining share,
        about 2.8 µs per lone change with the standard library, 0.3 µs with orjson). Anything
        that does not serialise (bytes, say) takes the Packet path.
        """
        self.frames_sent += 1
        try:
            return Outgoing(b"4" + _EVENT_PREFIX.encode() + _dumpb([event, data]))
        except (TypeError, ValueError):
            pass
        pkt = self.sio.packet_class(sio_packet.EVENT, namespace=self.namespace, data=[event, data])
        encoded = pkt.encode()
        if not isinstance(encoded, list):  # a list only when the data carries binary attachments
            encoded = [encoded]
        return Outgoing.of_packets([_message(part) for part in encoded])

    def _deliver(self, room: str | None, out: Outgoing, skip: Sequence[str]) -> None:
        # The manager's `get_participants(namespace, room)` inline (this runs per room per
        # frame): the room's bidict read through its own dict, as the manager reads it, and
        # copied as there, since a write may end in a disconnect that leaves the room.
        members: Any = self.sio.manager.rooms.get(self.namespace, _NO_ROOMS).get(room)
        if members is None:
            return
        skipped = frozenset(skip) if skip else None
        # `_put`'s direct write, inline: one Python call fewer per recipient.
        sockets = self.sio.eio.sockets
        text, wire = out.text, out.wire
        direct = 0
        for sid, eio_sid in members._fwdm.copy().items():
            if skipped is not None and sid in skipped:
                continue
            socket = sockets.get(eio_sid)
            if socket is None or socket.closing or socket.closed:
                continue
            if type(socket) is LeanSocket and text is not None and socket.write_frame(text, wire):
                direct += 1
            else:
                self._queue(socket, out)
        self.direct_writes += direct

    def _put(self, eio_sid: str, out: Outgoing) -> None:
        """Hand one frame to one client: written at once when its websocket takes it, else
        queued behind what already waits for it (feed.delivery.eio_websocket), so nothing overtakes.

        This runs once per recipient per frame, so it is written for speed (and `_deliver`
        has its own copy of the direct write).
        """
        socket = self.sio.eio.sockets.get(eio_sid)
        if socket is None or socket.closing or socket.closed:
            return
        text = out.text
        if type(socket) is LeanSocket and text is not None and socket.write_frame(text, out.wire):
            self.direct_writes += 1
            return
        self._queue(socket, out)

    @staticmethod
    def _queue(socket: Any, out: Outgoing) -> None:
        """The frame's packets behind what waits for the client (or for its writer)."""
        if type(socket) is LeanSocket:
            for p in out.packets:
                socket.write(p)
            return
        for p in out.packets:  # another Engine.IO server's socket: its own queue and writer
            socket.queue.put_nowait(p)
