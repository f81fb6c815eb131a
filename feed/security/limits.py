"""Limits that keep one client from exhausting the server: connections, request rate, and above
all the outbound queue.

Engine.IO gives every connection an unbounded send queue. A client that stops reading (a frozen
tab, a hostile script, a phone in a tunnel) fills its TCP window, then the server's transport
buffer, and from then on every change for it piles up in that queue: memory grows without bound
while the client still looks connected. `OutboundLimiter` swaps in a queue that counts the bytes it
holds (and gives the same limit to the backlog of feed.delivery.eio_websocket's websockets, which
hold packets only while their transport is paused) and, past the limit, drops the connection instead
of the memory. Putting into either never waits, so the hub's sends to everyone else are never held
up by the slow one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from feed.options import GIB, HOUR, Options

log = logging.getLogger("feed.limits")

PACKET_OVERHEAD = 64
"""Bytes counted per queued packet besides its data, so many tiny packets are bounded too."""


@dataclass(frozen=True)
class LimitsConfig:
    connections_per_identity: int = 100
    """Concurrent connections one authenticated identity may hold (0: no limit)."""
    connections_per_address: int = 100
    """Concurrent anonymous connections from one client address (feed.security.addresses;
    0: no limit)."""
    subscribe_rate: float = 20.0
    """Subscribe/unsubscribe requests per second a client may sustain..."""
    subscribe_burst: int = 100
    """...and how many it may send at once."""
    outbound_queue_bytes: int = 8 * 1024 * 1024
    """Bytes waiting to be sent to one client before it is cut off as too slow."""
    max_connections: int = 0
    """Open TCP connections served at once; more are refused with 503 (0: the process's
    open-file limit less 100, feed.security.guard)."""
    request_timeout: float = 10.0
    """Seconds a connection has to send a complete request, headers and body (slowloris)."""
    handshake_timeout: float = 10.0
    """Seconds between an Engine.IO session opening and its Socket.IO connect."""
    max_handshakes: int = 1000
    """Engine.IO sessions open at once that have not made their Socket.IO connect yet; more
    are refused with 503 (feed.app.server)."""
    rooms_per_identity: int = 5000
    """Row and filter rooms charged to one identity (feed.security.room_budget; 0: no limit)."""
    max_rooms: int = 50_000
    """Row and filter rooms in all (0: no limit)."""
    idle_rooms_per_identity: int = 500
    """Row and filter rooms charged to one identity that nobody follows, kept for their
    grace; past it its oldest idle one goes at once (feed.security.room_budget; 0: no limit)."""


def parse_limits(top: Options) -> LimitsConfig:
    opts = top.table("limits")
    config = LimitsConfig(
        connections_per_identity=opts.int(
            "connections_per_identity", 100, minimum=0, maximum=1_000_000
        ),
        connections_per_address=opts.int(
            "connections_per_address", 100, minimum=0, maximum=1_000_000
        ),
        subscribe_rate=opts.float("subscribe_rate", 20.0, minimum=0.01, maximum=1_000_000),
        subscribe_burst=opts.int("subscribe_burst", 100, minimum=1, maximum=1_000_000),
        outbound_queue_bytes=opts.int(
            "outbound_queue_bytes", 8 * 1024 * 1024, minimum=16 * 1024, maximum=GIB
        ),
        max_connections=opts.int("max_connections", 0, minimum=0, maximum=10_000_000),
        request_timeout=opts.float("request_timeout", 10.0, minimum=0.1, maximum=HOUR),
        handshake_timeout=opts.float("handshake_timeout", 10.0, minimum=0.1, maximum=HOUR),
        max_handshakes=opts.int("max_handshakes", 1000, minimum=1, maximum=10_000_000),
        rooms_per_identity=opts.int("rooms_per_identity", 5000, minimum=0, maximum=10_000_000),
        max_rooms=opts.int("max_rooms", 50_000, minimum=0, maximum=10_000_000),
        idle_rooms_per_identity=opts.int(
            "idle_rooms_per_identity", 500, minimum=0, maximum=10_000_000
        ),
    )
    opts.finish()
    return config


class TokenBucket:
    """`rate` requests per second on average, `burst` at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.updated = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class ConnectionCounter:
    """Connections per identity name, or per client address (anonymous ones, feed.app.server)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.counts: dict[str, int] = {}

    def admit(self, name: str) -> bool:
        count = self.counts.get(name, 0)
        if self.limit and count >= self.limit:
            return False
        self.counts[name] = count + 1
        return True

    def release(self, name: str) -> None:
        count = self.counts.get(name, 0) - 1
        if count > 0:
            self.counts[name] = count
        else:
            self.counts.pop(name, None)


def packet_size(item: Any) -> int:
    data = getattr(item, "data", None)
    if isinstance(data, str | bytes):
        return len(data) + PACKET_OVERHEAD
    return PACKET_OVERHEAD


class OutboundQueue(asyncio.Queue[Any]):
    """An Engine.IO send queue that refuses to hold more than `limit` bytes.

    Past the limit it drops what it is given and reports once; the owner then closes the
    connection. `None` (Engine.IO's "stop writing" sentinel) always gets through.
    """

    def __init__(self, limit: int, on_overflow: Callable[[OutboundQueue], None]) -> None:
        super().__init__()
        self.limit = limit
        self.bytes = 0
        self.peak = 0
        self.overflowed = False
        self._on_overflow = on_overflow

    def put_nowait(self, item: Any) -> None:
        if item is not None:
            if self.overflowed:
                return
            if self.bytes + packet_size(item) > self.limit:
                self.overflowed = True
                self._on_overflow(self)
                return
        super().put_nowait(item)

    def _put(self, item: Any) -> None:
        self.bytes += packet_size(item) if item is not None else 0
        self.peak = max(self.peak, self.bytes)
        super()._put(item)

    def _get(self) -> Any:
        item = super()._get()
        if item is not None:
            self.bytes -= packet_size(item)
        return item


class OutboundLimiter:
    """Bounds what waits for each client on an AsyncServer's Engine.IO side; cuts off who overflows.

    Long-polling sockets get an `OutboundQueue`; the websockets of feed.delivery.eio_websocket hold
    their packets in its `Backlog` (only while the transport is paused), bounded by the same limit.
    """

    def __init__(self, sio: Any, limit: int, on_cut: Callable[[str], None] | None = None) -> None:
        self.sio = sio
        self.limit = limit
        self.on_cut = on_cut
        self.cut = 0
        self._tasks: set[asyncio.Task[None]] = set()
        eio = sio.eio
        eio.create_queue = lambda *args, **kwargs: OutboundQueue(limit, self._overflowed)
        if hasattr(eio, "on_outbound_overflow"):  # feed.delivery.eio_websocket.LeanEngineIO
            eio.outbound_limit = limit
            eio.on_outbound_overflow = self._overflowed
        websocket = eio._async.get("websocket")
        if websocket is not None:
            # A per-server copy: the driver table is module-level and shared by every server.
            eio._async = {**eio._async, "websocket": _recording(websocket)}

    def _overflowed(self, queue: Any) -> None:
        for eio_sid, socket in list(self.sio.eio.sockets.items()):
            if socket.queue is queue:
                self.cut += 1
                log.warning(
                    "client %s stopped reading (%d bytes waiting): disconnected",
                    eio_sid,
                    self.limit,
                )
                if self.on_cut is not None:
                    self.on_cut(eio_sid)
                self.close_soon(eio_sid)
                return

    def close_soon(self, eio_sid: str, delay: float = 0.0) -> None:
        """Schedule `close`; usable from synchronous code such as a queue put or a timer."""

        def start() -> None:
            task = asyncio.get_running_loop().create_task(self.close(eio_sid))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        if delay > 0:
            asyncio.get_running_loop().call_later(delay, start)
        else:
            start()

    async def close(self, eio_sid: str) -> None:
        """End a connection now, whatever its client does: nothing queued is waited for."""
        socket = self.sio.eio.sockets.get(eio_sid)
        if socket is None:
            return
        try:
            await socket.close(wait=False, abort=True, reason=socket.server.reason.TRANSPORT_ERROR)
        finally:
            self.sio.eio.sockets.pop(eio_sid, None)
            _abort_transport(socket)


def _recording(websocket_class: Any) -> Any:
    """The Engine.IO ASGI WebSocket wrapper, remembering itself on its Engine.IO socket."""

    class RecordingWebSocket(websocket_class):  # type: ignore[misc]
        def __init__(self, handler: Any, server: Any) -> None:
            super().__init__(handler, server)
            owner = getattr(handler, "__self__", None)
            if owner is not None:
                owner.feed_websocket = self

    return RecordingWebSocket


def _abort_transport(socket: Any) -> None:
    """Drop the TCP connection under a websocket whose writer is stuck on a full buffer.

    A feed.delivery.eio_websocket socket knows its connection (`abort`); for Engine.IO's own
    websocket handler, the rest of this applies.

    Closing politely would queue a close frame behind the data the client is not reading. The
    ASGI send callable of uvicorn's websocket protocols is a bound method of the protocol, which
    owns the asyncio transport; aborting it releases the stuck writer at once. With another server
    this does nothing and the server's own keepalive timeout ends the connection instead.
    """
    if getattr(socket, "protocol", None) is not None:
        socket.abort()
        return
    websocket = getattr(socket, "feed_websocket", None)
    send = getattr(websocket, "asgi_send", None)
    protocol = getattr(send, "__self__", None)
    transport = getattr(protocol, "transport", None)
    if transport is not None and hasattr(transport, "abort"):
        with contextlib.suppress(Exception):
            transport.abort()
