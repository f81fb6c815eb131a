"""Engine.IO over uvicorn's websocket protocol without per-connection tasks, queues or timers.

python-engineio runs every websocket connection with three asyncio tasks (a reader wrapped in
`asyncio.wait_for`, a writer parked on an `asyncio.Queue`, and a ping task sleeping out the ping
interval), keeps the connection's WSGI-style environ for its whole life, and lets the ASGI server
keep the handshake's request and response headers. At 10,000 idle clients that machinery, not the
data, is most of the server's memory (docs/benchmarks.md, "Idle memory per connection").

This module keeps Engine.IO's and python-socketio's logic (sessions, namespaces, acks, rooms,
disconnect reasons) and replaces only that machinery, for websocket connections served by
uvicorn's default websocket protocol (`WebSocketsSansIOProtocol`):

- **one reader**: the ASGI application task uvicorn already runs reads the socket directly (no
  extra task, no `wait_for`);
- **no writer task**: a packet is framed and written to the connection at once. Only when the
  transport is paused (the client is not reading) do packets wait, in a `Backlog` that counts
  the bytes it holds (the outbound limit, feed.security.limits, cuts the client off past it) and
  that is drained, in order, by a task that exists only while there is a backlog;
- **one pinger for all sockets**: a single timer sends Engine.IO pings when they are due and
  closes the sockets whose pong did not come back within `ping_timeout` (two FIFOs: with a fixed
  interval, due times are appended in order). It replaces Engine.IO's per-socket ping tasks and
  its monitor task, for every socket, long-polling ones included;
- **no handshake state after connect**: the environ is emptied once the Socket.IO connect
  handler has run (`get_environ()` then answers only the client's address, which the feed's
  connect handler reads again if the client connects again on its session), and uvicorn's copies of the request and response headers are
  dropped once the websocket is accepted.

Long-polling connections (and the polling phase of a client that then upgrades) use Engine.IO's
own queue and code; when such a client upgrades, what its queue still holds is written to the
websocket first, then it continues like a websocket-only client. With any other ASGI server or
websocket implementation, sockets fall back to Engine.IO's own websocket handler (they still use
the shared pinger).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import engineio
import socketio
from engineio import exceptions as eio_exceptions
from engineio import packet as eio_packet
from engineio import payload as eio_payload
from engineio.async_socket import AsyncSocket
from socketio import packet as sio_packet

from feed.security.addresses import CLIENT_HOST, forwarded_mark
from feed.security.limits import packet_size

log = logging.getLogger("feed.eio_websocket")

_SansIO: Any = None
_OPEN: Any = None
try:
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
    from websockets.protocol import State

    _SansIO, _OPEN = WebSocketsSansIOProtocol, State.OPEN
except ImportError:  # pragma: no cover
    pass

POLL_PACKETS = 16
"""Packets in one long-polling answer at most: python-engineio's client (and so the Python
client library over polling) refuses more, and python-engineio's server, more in a POST."""

POLL_CLOSE_WAIT = 2.0
"""Seconds a closing long-polling socket waits for its client to take what is queued."""

_KNOWN_TYPES = frozenset(range(len(eio_packet.packet_names)))

_PING = eio_packet.Packet(eio_packet.PING)
_PING.encode()
_CLOSE = eio_packet.Packet(eio_packet.CLOSE)
_CLOSE.encode()
_NOOP = eio_packet.Packet(eio_packet.NOOP)


class PollPayload(eio_payload.Payload):  # type: ignore[misc]
    """A long-polling POST's packets, as many as its body holds.

    python-engineio refuses a payload of more than 16 packets (and the session with it), but
    Engine.IO clients put everything they have queued into one POST: socket.io-client (and
    python-engineio's own client) sending 30 subscribes at once, or resubscribing 30 rooms
    after a reconnect, were cut off with "transport error", reconnected, and were cut off
    again. The body is already bounded by `max_message_bytes`, as a websocket message is, and
    each request in it is rate-limited like one sent over a websocket.
    """

    max_decode_packets = 2**31


class Backlog:
    """Packets waiting for a paused websocket, bounded in bytes; its deque exists only while used.

    Past `limit` bytes it drops what it is given and calls `on_overflow` once; the owner then
    closes the connection. The interface is the part of `feed.security.limits.OutboundQueue` that
    the rest of the feed reads (`bytes`, `peak`, `overflowed`, `put_nowait`, `empty`, `qsize`).
    """

    __slots__ = ("bytes", "items", "limit", "on_overflow", "overflowed", "peak")

    def __init__(self, limit: int | None, on_overflow: Callable[[Backlog], None] | None) -> None:
        self.limit = limit
        self.on_overflow = on_overflow
        self.items: collections.deque[Any] | None = None
        self.bytes = 0
        self.peak = 0
        self.overflowed = False

    def put_nowait(self, item: Any) -> None:
        if self.overflowed:
            return
        size = packet_size(item)
        if self.limit is not None and self.bytes + size > self.limit:
            self.overflowed = True
            if self.on_overflow is not None:
                self.on_overflow(self)
            return
        if self.items is None:
            self.items = collections.deque()
        self.items.append(item)
        self.bytes += size
        if self.bytes > self.peak:
            self.peak = self.bytes

    def popleft(self) -> Any:
        assert self.items is not None
        item = self.items.popleft()
        self.bytes -= packet_size(item)
        if not self.items:
            self.items = None
        return item

    def clear(self) -> None:
        self.items = None
        self.bytes = 0

    def empty(self) -> bool:
        return self.items is None

    def qsize(self) -> int:
        return len(self.items) if self.items is not None else 0


def lean_protocol(send: Any) -> Any:
    """uvicorn's sansio websocket protocol behind an ASGI send callable, or None."""
    protocol = getattr(send, "__self__", None)
    if _SansIO is not None and isinstance(protocol, _SansIO):
        return protocol
    return None


def _release_handshake(protocol: Any) -> None:
    """Drop what uvicorn keeps of the handshake once the websocket is accepted.

    The request object is also held by the websockets parser that read it, so its headers are
    emptied in place; the scope's header list goes too (uvicorn reads the scope after the
    handshake only for log lines, which use `client` and `path`).
    """
    request = getattr(protocol, "request", None)
    if request is not None:
        request.headers.clear()
    response = getattr(protocol, "response", None)
    if response is not None:
        response.headers.clear()
    scope = getattr(protocol, "scope", None)
    if isinstance(scope, dict):
        scope["headers"] = []


class LeanQueue:
    """uvicorn's websocket receive queue (`put_nowait`, `get`, `empty`) for its one reader.

    An `asyncio.Queue` is four deques (items, getters, putters, and its `join` event's waiters),
    about 3 KiB while empty; this holds a deque only while events wait to be read. It keeps its
    loop once known: on Python 3.11 each `asyncio.get_running_loop()` is a getpid system call,
    and the reader waits once per message (a pong every ping interval, on every connection).
    """

    __slots__ = ("_items", "_loop", "_waiter")

    def __init__(self) -> None:
        self._items: collections.deque[Any] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def put_nowait(self, item: Any) -> None:
        items = self._items
        if items is None:
            items = self._items = collections.deque()
        items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Any:
        while self._items is None:
            if self._waiter is not None:
                raise RuntimeError("a websocket has one reader")
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        return self.get_nowait()

    def get_nowait(self) -> Any:
        items = self._items
        if items is None:
            raise asyncio.QueueEmpty
        item = items.popleft()
        if not items:
            self._items = None
        return item

    def empty(self) -> bool:
        return self._items is None

    def qsize(self) -> int:
        return len(self._items) if self._items is not None else 0


class LeanEvent:
    """uvicorn's `writable` flag (`is_set`, `set`, `clear`, `wait`), waiters kept only while any.

    An `asyncio.Event` carries a deque of waiters (about 700 bytes) even when nobody waits.
    """

    __slots__ = ("_value", "_waiters")

    def __init__(self, value: bool) -> None:
        self._value = value
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        if not self._value:
            self._value = True
            waiters, self._waiters = self._waiters, None
            for waiter in waiters or ():
                if not waiter.done():
                    waiter.set_result(None)

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> bool:
        if self._value:
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
            return True
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)


def _slim_protocol(protocol: Any) -> None:
    """Swap uvicorn's receive queue and `writable` event for the lean ones, once accepted.

    Only in the state a just-accepted connection is in: nobody waits on either (this runs in the
    connection's only reader, between two of its own steps), and what was received is kept.
    """
    queue = protocol.queue
    if type(queue) is asyncio.Queue:
        lean = LeanQueue()
        while not queue.empty():
            lean.put_nowait(queue.get_nowait())
        protocol.queue = lean
    writable = protocol.writable
    if type(writable) is asyncio.Event and writable.is_set():
        protocol.writable = LeanEvent(True)


class LeanSocket(AsyncSocket):  # type: ignore[misc]
    """An Engine.IO socket that, once its websocket is open, writes straight to the connection."""

    def __init__(self, server: LeanEngineIO, sid: str, lean: bool) -> None:
        # BaseSocket.__init__, minus the asyncio.Queue for sockets that never poll.
        self.server = server
        self.sid = sid
        self.queue: Any = (
            Backlog(server.outbound_limit, server.on_outbound_overflow)
            if lean
            else server.create_queue()
        )
        self.last_ping: float | None = time.time()
        self.connected = False
        self.upgrading = False
        self.upgraded = False
        self.closing = False
        self.closed = False
        self.session: dict[str, Any] = {}
        self.protocol: Any = None
        """uvicorn's websocket protocol while this socket writes to it directly, else None."""
        self._drainer: asyncio.Task[None] | None = None
        self.polling = False
        """A long-polling GET is waiting for packets (`poll`)."""
        self.posting = False
        """A long-polling POST is being read or dispatched (`handle_post_request`)."""

    # -- sending -------------------------------------------------------------------------------

    async def send(self, pkt: Any) -> None:
        if not await self.check_ping_timeout():
            return
        self.write(pkt)

    def write(self, pkt: Any) -> None:
        """Send one packet now if the connection takes it, else keep it in order for later."""
        protocol = self.protocol
        if protocol is None:
            self.queue.put_nowait(pkt)  # not a direct websocket (yet): Engine.IO's queue
            return
        if self.queue.items is None and protocol.writable.is_set():
            if self._writable(protocol):
                self._frame(protocol, pkt)
            return  # a connection that is going away takes nothing more
        self._hold(pkt)

    def write_frame(self, text: bytes, wire: Any) -> bool:
        """The transport's fast path: one text frame, `wire` being its uncompressed framing
        (shared by every recipient). False: not written; the caller writes its packets."""
        protocol = self.protocol
        if protocol is None or self.queue.items is not None or not protocol.writable.is_set():
            return False
        # `_writable`, inline: this runs per recipient per frame.
        if protocol.close_sent or protocol.disconnected or protocol.transport.is_closing():
            return False  # going away: `write` drops the packets
        conn = protocol.conn
        if conn.extensions:  # compression keeps per-connection state: frame it for this one
            try:
                conn.send_text(text)
            except Exception:
                return True
            protocol.transport.write(b"".join(conn.data_to_send()))
        else:
            if conn.state is not _OPEN or conn.expect_continuation_frame:
                return True
            protocol.transport.write(wire)
        return True

    @staticmethod
    def _writable(protocol: Any) -> bool:
        return not (protocol.close_sent or protocol.disconnected or protocol.transport.is_closing())

    @staticmethod
    def _frame(protocol: Any, pkt: Any) -> None:
        encoded = pkt.encode()
        conn = protocol.conn
        try:
            if isinstance(encoded, str):
                conn.send_text(encoded.encode())
            else:
                conn.send_binary(encoded)
        except Exception:  # the websocket is closing: nothing more can be sent on it
            return
        protocol.transport.write(b"".join(conn.data_to_send()))

    def _hold(self, pkt: Any) -> None:
        self.queue.put_nowait(pkt)
        if self._drainer is None and self.queue.items is not None:
            self._drainer = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        """Write the backlog, in order, as the connection takes it; then end it if closed."""
        protocol = self.protocol
        backlog = self.queue
        try:
            while True:
                if not protocol.writable.is_set():
                    await protocol.writable.wait()
                if not self._writable(protocol):
                    backlog.clear()
                    return
                while backlog.items is not None and protocol.writable.is_set():
                    self._frame(protocol, backlog.popleft())
                if backlog.items is None:
                    break
            if self.closed:
                with contextlib.suppress(Exception):
                    await protocol.send({"type": "websocket.close"})
        finally:
            self._drainer = None

    async def _end_websocket(self) -> None:
        """Close the websocket (a close frame, through uvicorn); the reader then sees the end.

        With packets still waiting, or the transport paused, the drainer does it once they are
        written."""
        protocol = self.protocol
        if protocol is None or not self._writable(protocol):
            return
        if not protocol.writable.is_set() or self.queue.items is not None:
            if self._drainer is None:
                self._drainer = asyncio.get_running_loop().create_task(self._drain())
            return
        with contextlib.suppress(Exception):
            await protocol.send({"type": "websocket.close"})

    def abort(self) -> None:
        """Drop the TCP connection at once (a client that does not read gets no close frame)."""
        protocol = self.protocol
        if protocol is not None:
            self.queue.clear()
            with contextlib.suppress(Exception):
                protocol.transport.abort()

    async def _close_polling(self, abort: bool, reason: Any) -> None:
        """Engine.IO's close of a long-polling socket, never waiting for the client."""
        await super().close(wait=False, abort=abort, reason=reason)
        if abort:
            # Ends a poll that is waiting now (an empty answer; the next one is refused),
            # rather than leaving it, and the client's disconnect, to the poll timeout.
            self.queue.put_nowait(None)

    async def poll(self) -> list[Any]:
        """Engine.IO's poll: wait for a packet, then answer with what waits, at most
        POLL_PACKETS of them; the client polls again at once for the rest.

        python-engineio's client (under python-socketio, and so `dbfeed_client` with the
        polling transport) refuses an answer of more than 16 packets and drops its connection
        ("Unexpected packet from server"): a burst of changes for several rooms, or many acks,
        between two polls cut it off.
        """
        if self.polling:
            # Engine.IO: a second GET while one waits is answered 400 and ends the session.
            # Served instead, the two requests split the packets between them, and what went
            # to the one the client had given up on (a retry after a client-side timeout, a
            # proxy's retry) was lost without a trace. Closed, the client reconnects and
            # resumes with `since`; the waiting poll gets the close packet.
            self.server.report_malformed(
                self.sid, "bad_request", "a second long-polling GET while one was waiting"
            )
            await self._close_polling(abort=False, reason=self.server.reason.TRANSPORT_ERROR)
            raise eio_exceptions.QueueEmpty()
        self.polling = True
        try:
            first = await asyncio.wait_for(
                self.queue.get(), self.server.ping_interval + self.server.ping_timeout
            )
            self.queue.task_done()
        except (TimeoutError, asyncio.CancelledError):
            raise eio_exceptions.QueueEmpty() from None
        finally:
            self.polling = False
        if first is None:
            # The session was closed without a close packet (an abort): a NOOP ends this poll,
            # the next is refused. An empty body is no Engine.IO payload (a payload holds at
            # least one packet): socket.io-client read it as a "parser error" packet.
            return [_NOOP]
        packets = [first]
        while len(packets) < POLL_PACKETS:
            try:
                pkt = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            self.queue.task_done()
            if pkt is None:
                self.queue.put_nowait(None)  # the end, for the next poll
                break
            packets.append(pkt)
        return packets

    async def end_polling(self) -> bool:
        """At shutdown: a long-polling session ends now, its waiting poll answered (a NOOP),
        the next one refused, so the client reconnects (to another node) as a websocket client
        does when its connection closes. Left alone, a waiting poll is a running request that
        holds the server's graceful shutdown until the ping interval ends it. Returns whether
        this socket was polling."""
        if self.protocol is not None or isinstance(self.queue, Backlog):
            return False  # a websocket: the server's shutdown closes it
        if self.closed or self.closing:
            return False
        self.queue.put_nowait(_NOOP)
        await self._close_polling(abort=True, reason=self.server.reason.SERVER_DISCONNECT)
        return True

    async def handle_post_request(self, environ: dict[str, Any]) -> None:
        """A long-polling POST: Engine.IO's, with a malformed body reported and the session
        closed instead of a traceback at ERROR (and a 400 for the request).

        Engine.IO: a client MUST NOT have two POSTs under way; the second is answered 400 and
        the session closed. Both used to be served, their packets interleaved in whatever order
        their bodies came in (a subscribe could overtake the unsubscribe sent before it).
        """
        if self.posting:
            self.server.report_malformed(
                self.sid, "bad_request", "a second long-polling POST while one was under way"
            )
            # Left in the server's table: Engine.IO's error path removes it and answers 400.
            await self._close_polling(abort=False, reason=self.server.reason.TRANSPORT_ERROR)
            raise eio_exceptions.EngineIOError("a second POST")
        self.posting = True
        try:
            await self._handle_post(environ)
        finally:
            self.posting = False

    async def _handle_post(self, environ: dict[str, Any]) -> None:
        length = int(environ.get("CONTENT_LENGTH") or "0")
        if length > self.server.max_http_buffer_size:
            raise eio_exceptions.ContentTooLongError()
        body = await environ["wsgi.input"].read(length)
        if self.closed or self.closing:
            # The session ended while the body came in (a second POST, a ping timeout): its
            # packets have no session to go to. Engine.IO's error path cannot answer for a
            # session already gone (it fails on an unset response), so this POST is answered
            # as read; the client's next request gets the 400 that tells it to reconnect.
            return
        try:
            packets = PollPayload(encoded_payload=body.decode("utf-8")).packets
            problem = next(
                (
                    f"unknown packet type {p.packet_type}"
                    for p in packets
                    if p.packet_type not in _KNOWN_TYPES
                ),
                None,
            )
        except Exception as exc:  # bad UTF-8, a junk type byte, bad base64, ...
            problem = f"undecodable payload: {type(exc).__name__}: {exc}"
        if problem is not None:
            self.server.report_malformed(self.sid, "bad_payload", problem)
            # Closed but left in the server's table: Engine.IO's error path removes it and
            # answers 400 (it answers nothing at all for a session already gone).
            await self._close_polling(abort=True, reason=self.server.reason.TRANSPORT_ERROR)
            raise eio_exceptions.EngineIOError(problem)
        for pkt in packets:
            await self.receive(pkt)

    # -- lifecycle -----------------------------------------------------------------------------

    async def close(self, wait: bool = True, abort: bool = False, reason: Any = None) -> None:
        if self.protocol is None and not isinstance(self.queue, Backlog):
            # Engine.IO waits for a long-polling client to take its queue (the close packet
            # included) with no bound: one that never polls again held the closing task, and
            # with it shutdown, forever. It gets POLL_CLOSE_WAIT seconds.
            if not self.closed and not self.closing:
                await self._close_polling(abort=abort, reason=reason)
                if wait and not abort:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.queue.join(), POLL_CLOSE_WAIT)
        elif not self.closed and not self.closing:
            self.closing = True
            await self.server._trigger_event(
                "disconnect",
                self.sid,
                reason or self.server.reason.SERVER_DISCONNECT,
                run_async=False,
            )
            if abort:
                self.queue.clear()
            else:
                self.write(_CLOSE)
            self.closed = True
            await self._end_websocket()
            if self._drainer is not None:
                # What waits goes out before the close frame, in the drainer, which nobody
                # waits for (`wait` is not honoured: a client that does not read must not hold
                # up whoever closes it); a client that does not take it within a ping timeout
                # loses its connection.
                asyncio.get_running_loop().call_later(self.server.ping_timeout, self._abort_open)
        if self.closed and self.server.sockets.get(self.sid) is self:
            del self.server.sockets[self.sid]

    def _abort_open(self) -> None:
        protocol = self.protocol
        if protocol is not None and not protocol.disconnected:
            self.abort()

    def schedule_ping(self) -> None:
        # only schedule a new ping if the previous ping wait cycle completed
        if self.last_ping:
            self.last_ping = None
            self.server.pinger.schedule(self.sid)

    def ping_now(self) -> float:
        """Send a ping (the pinger's call); returns the stamp its pong must clear."""
        stamp = self.last_ping = time.time()
        self.write(_PING)
        return stamp

    # -- the websocket -------------------------------------------------------------------------

    async def _upgrade_websocket(self, environ: dict[str, Any]) -> Any:
        receive: Any = environ.get("asgi.receive")
        send: Any = environ.get("asgi.send")
        protocol = lean_protocol(send)
        if protocol is None or receive is None:
            return await super()._upgrade_websocket(environ)
        if self.upgraded or self.upgrading:
            # A second websocket for a session (Engine.IO: "the server MUST close" it). One that
            # came while the first was still probing was accepted and probed too, and when it
            # finished its upgrade it took the session over: the first websocket's reader kept
            # dispatching while every packet, the Socket.IO connect answer included, went to
            # the second.
            self.server.report_malformed(
                self.sid, "bad_request", "a second websocket for one Engine.IO session"
            )
            return self.server._bad_request("Session already has a websocket")
        upgrade = self.connected
        if upgrade:
            self.upgrading = True  # from here: a second websocket is refused (above)
            # This request's environ was only needed to get here (websocket-only clients keep
            # theirs until the Socket.IO connect handler has seen it: FeedSocketIO).
            environ.clear()
        del environ
        try:
            await send({"type": "websocket.accept"})
        except BaseException:
            self.upgrading = False
            raise
        _release_handshake(protocol)
        _slim_protocol(protocol)
        if upgrade:
            if not await self._probe(receive, send):
                return ""
        else:
            self.connected = True
            self.upgraded = True
        self._go_direct(protocol)
        if self.closed:  # closed while connecting
            await self._end_websocket()
            return ""
        await self._read(receive)
        return ""

    async def _probe(self, receive: Any, send: Any) -> bool:
        """Engine.IO's upgrade: `2probe`/`3probe`, end the pending poll, then `5`."""
        self.upgrading = True  # hold packet sends during the upgrade
        pkt = await self._probe_packet(receive)
        if pkt is None:
            return False
        if pkt.packet_type != eio_packet.PING or pkt.data != "probe":
            self.server.logger.info("%s: Failed websocket upgrade, no PING packet", self.sid)
            self.upgrading = False
            return False
        await send(
            {
                "type": "websocket.send",
                "text": eio_packet.Packet(eio_packet.PONG, data="probe").encode(),
            }
        )
        self.queue.put_nowait(eio_packet.Packet(eio_packet.NOOP))  # end the pending poll
        pkt = await self._probe_packet(receive)
        if pkt is None:
            return False
        if pkt.packet_type != eio_packet.UPGRADE:
            self.server.logger.info(
                "%s: Failed websocket upgrade, expected UPGRADE packet, received type %s.",
                self.sid,
                pkt.packet_type,
            )
            self.upgrading = False
            return False
        self.upgraded = True
        self.upgrading = False
        return True

    async def _probe_packet(self, receive: Any) -> Any:
        """The upgrade's next packet; None (the upgrade failed) when the websocket ended or
        sent something that is not an Engine.IO packet (reported, where Engine.IO's decode
        error went to the log as a traceback of the ASGI application)."""
        data = await self._next(receive)
        pkt = None
        if data is not None:
            try:
                pkt = eio_packet.Packet(encoded_packet=data)
            except Exception as exc:
                self.server.report_malformed(
                    self.sid, "bad_packet", f"undecodable upgrade packet: {exc}"
                )
        if pkt is None:
            self.upgrading = False
        return pkt

    def _go_direct(self, protocol: Any) -> None:
        """From now on write to the websocket; what waits in the queue goes first, in order."""
        waiting = self.queue
        self.queue = Backlog(self.server.outbound_limit, self.server.on_outbound_overflow)
        self.protocol = protocol
        if isinstance(waiting, Backlog):
            while waiting.items is not None:
                self.write(waiting.popleft())
        else:
            while not waiting.empty():
                pkt = waiting.get_nowait()
                # A NOOP there is the one the upgrade queued to end a poll that was not waiting
                # (it is the polling transport's, and meant nothing on the websocket).
                if pkt is not None and pkt.packet_type != eio_packet.NOOP:
                    self.write(pkt)

    async def _next(self, receive: Any) -> Any:
        """The next message's data, or None when the websocket ended (or sent too much)."""
        event = await receive()
        if event["type"] != "websocket.receive":
            fault = _FAULTY_CLOSES.get(event.get("code"))
            if fault is not None:
                self.server.report_malformed(self.sid, *fault)
            return None
        data = event.get("text")
        if data is None:
            data = event.get("bytes")
        if data is None:
            return None
        if len(data) > self.server.max_http_buffer_size:
            self.server.report_malformed(
                self.sid, "oversized", f"a websocket message of {len(data)} bytes"
            )
            return None
        return data

    async def _read(self, receive: Any) -> None:
        """The connection's only task: read and dispatch packets until the websocket ends."""
        self.server.logger.info("%s: Upgrade to websocket successful", self.sid)
        while True:
            data = await self._next(receive)
            if data is None:
                break
            if self.closed:
                # Closed by the server: what still waits for the client, then the close frame,
                # go out in the drainer; the websocket's end comes after them. Until then
                # nothing the client says is dispatched (returning now would let uvicorn close
                # the transport under the drainer).
                continue
            try:
                pkt = eio_packet.Packet(encoded_packet=data)
            except Exception as exc:
                self.server.report_malformed(self.sid, "bad_packet", f"undecodable packet: {exc}")
                break
            if pkt.packet_type not in _KNOWN_TYPES:
                self.server.report_malformed(
                    self.sid, "bad_packet", f"unknown packet type {pkt.packet_type}"
                )
                break
            try:
                await self.receive(pkt)
            except eio_exceptions.UnknownPacketError:
                pass
            except eio_exceptions.SocketIsClosedError:
                self.server.logger.info("Receive error -- socket is closed")
            except Exception:
                # if we get an unexpected exception we log the error and exit
                # the connection properly
                self.server.logger.exception("Unknown receive error")
        await self.close(wait=False, abort=True, reason=self.server.reason.TRANSPORT_CLOSE)
        await self._end_websocket()


_FAULTY_CLOSES: dict[Any, tuple[str, str]] = {
    1009: ("oversized", "a websocket message larger than max_message_bytes"),
    1007: ("bad_packet", "a websocket text frame that is not UTF-8"),
    1002: ("bad_packet", "a websocket protocol error"),
}
"""How a websocket ended when uvicorn's frame parser refused what the client sent (it closes the
connection itself, before the message reaches Engine.IO): counted like the faults Engine.IO
sees (`feed_client_errors_total`), which these used not to be."""


class Pinger:
    """Engine.IO pings and pong deadlines for every socket of one server, on one timer.

    Each socket has at most one ping waiting (the next is scheduled when its pong comes back),
    and every ping is due `ping_interval` after it was scheduled, so appending keeps each FIFO
    in due order. A stale entry (the socket is gone, or answered) is dropped when it comes up.
    """

    __slots__ = ("_at", "_handle", "_loop", "_tasks", "deadlines", "pings", "server")

    def __init__(self, server: LeanEngineIO) -> None:
        self.server = server
        self.pings: collections.deque[tuple[float, str]] = collections.deque()
        self.deadlines: collections.deque[tuple[float, str, float]] = collections.deque()
        self._handle: asyncio.TimerHandle | None = None
        self._at = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        """Kept from the first schedule (and dropped by `stop`): every pong schedules a ping, and
        `asyncio.get_running_loop()` is a getpid system call on Python 3.11."""

    def schedule(self, sid: str) -> None:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        due = loop.time() + self.server.ping_interval
        self.pings.append((due, sid))
        self._arm(loop, due)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._loop = None
        self.pings.clear()
        self.deadlines.clear()

    def _arm(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        if self._handle is not None:
            if self._at <= due:
                return
            self._handle.cancel()
        self._at = due
        self._handle = loop.call_at(due, self._tick)

    def _tick(self) -> None:
        self._handle = None
        loop = self._loop or asyncio.get_running_loop()
        now = loop.time()
        sockets = self.server.sockets
        pings, deadlines = self.pings, self.deadlines
        timeout = self.server.ping_timeout
        while pings and pings[0][0] <= now:
            _, sid = pings.popleft()
            s = sockets.get(sid)
            if s is not None and not s.closing and not s.closed:
                try:
                    stamp = s.ping_now()
                except Exception:  # pragma: no cover - a broken socket must not stop the others
                    log.exception("ping to %s failed", sid)
                    continue
                deadlines.append((now + timeout, sid, stamp))
        while deadlines and deadlines[0][0] <= now:
            _, sid, stamp = deadlines.popleft()
            s = sockets.get(sid)
            if s is not None and s.last_ping == stamp and not s.closing and not s.closed:
                task = loop.create_task(self.server._ping_timed_out(s))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        heads = [q[0][0] for q in (pings, deadlines) if q]
        if heads:
            self._arm(loop, min(heads))


class LeanEngineIO(engineio.AsyncServer):  # type: ignore[misc]
    """engineio.AsyncServer whose sockets are `LeanSocket`s, pinged by one `Pinger`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["monitor_clients"] = False  # the pinger checks pong deadlines for all sockets
        super().__init__(*args, **kwargs)
        self.pinger = Pinger(self)
        self.outbound_limit: int | None = None
        """Bytes a paused websocket may have waiting before `on_outbound_overflow`
        (feed.security.limits)."""
        self.on_outbound_overflow: Callable[[Backlog], None] | None = None
        self.on_malformed: Callable[[str, str, str], None] | None = None
        """Told (sid, kind, detail) of each malformed message (feed.security.guard counts and
        logs)."""
        self.on_open: Callable[[str], None] | None = None
        """Told the sid of each Engine.IO session that has no Socket.IO connection: each new
        one, and one whose client left the namespace (the Socket.IO handshake timeout)."""
        self.refuse_open: Callable[[], str | None] | None = None
        """Asked before each new Engine.IO session: a reason to refuse it (503), or None."""

    def _ok(self, packets: Any = None, headers: Any = None, jsonp_index: Any = None) -> Any:
        """Engine.IO's 200 answer; a POST's body is `ok`, as the protocol says (python-engineio
        wrote `OK`; clients do not read it, but a strict one may)."""
        response = super()._ok(packets, headers=headers, jsonp_index=jsonp_index)
        if packets is None and response.get("response") == b"OK":
            response["response"] = b"ok"
        return response

    def report_malformed(self, sid: str, kind: str, detail: str) -> None:
        """A client sent something that is not Engine.IO/Socket.IO: one line, not a traceback."""
        if self.on_malformed is not None:
            self.on_malformed(sid, kind, detail)
        else:
            log.warning("%s: malformed %s: %s", sid, kind, detail[:200])

    def _log_error_once(self, message: str, message_key: str) -> None:
        """Engine.IO's refusal of a request (an unknown or closed session, an origin not
        accepted, an unsupported protocol version, a bad transport): a client's mistake, or a
        polling client from before a restart, not the server's. Engine.IO logged the first of
        each at ERROR; they are counted (`bad_request`) and logged as other client errors."""
        if message_key == "no-websocket":  # the server's own setup: an error indeed
            super()._log_error_once(message, message_key)
        else:
            self.report_malformed("", "bad_request", message)

    async def _handle_connect(
        self, environ: dict[str, Any], transport: str, jsonp_index: Any = None
    ) -> Any:
        """engineio.AsyncServer._handle_connect, creating a LeanSocket."""
        query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
        if query.get("transport") != [transport]:
            # Engine.IO defaults a missing `transport` to polling; the protocol makes it
            # mandatory ("the server MUST respond with an HTTP 400 error status").
            self._log_error_once("Missing transport", "bad-transport")
            return self._bad_request("Missing transport")
        refusal = self.refuse_open() if self.refuse_open is not None else None
        if refusal is not None:
            return {
                "status": "503 SERVICE UNAVAILABLE",
                "headers": [("Content-Type", "text/plain; charset=utf-8")],
                "response": refusal.encode(),
            }
        sid = self.generate_id()
        lean = transport == "websocket" and lean_protocol(environ.get("asgi.send")) is not None
        s = LeanSocket(self, sid, lean)
        self.sockets[sid] = s

        pkt = eio_packet.Packet(
            eio_packet.OPEN,
            {
                "sid": sid,
                "upgrades": self._upgrades(sid, transport),
                "pingTimeout": int(self.ping_timeout * 1000),
                "pingInterval": int(self.ping_interval + self.ping_interval_grace_period) * 1000,
                "maxPayload": self.max_http_buffer_size,
            },
        )
        await s.send(pkt)

        ret = await self._trigger_event("connect", sid, environ, run_async=False)
        if ret is not None and ret is not True:
            del self.sockets[sid]
            self.logger.warning("Application rejected connection")
            return self._unauthorized(ret or None)

        s.schedule_ping()
        if self.on_open is not None:
            self.on_open(sid)

        if transport == "websocket":
            ret = await s.handle_get_request(environ)
            if s.closed and sid in self.sockets:
                # websocket connection ended, so we are done
                del self.sockets[sid]
            return ret
        s.connected = True
        headers = None
        if self.cookie:
            cookie = (
                self.cookie
                if isinstance(self.cookie, dict)
                else {"name": self.cookie, "path": "/", "SameSite": "Lax"}
            )
            headers = [("Set-Cookie", self._generate_sid_cookie(sid, cookie))]
        try:
            return self._ok(await s.poll(), headers=headers, jsonp_index=jsonp_index)
        except eio_exceptions.QueueEmpty:
            return self._bad_request()

    async def _ping_timed_out(self, s: LeanSocket) -> None:
        self.logger.info("%s: Client is gone, closing socket", s.sid)
        await s.close(wait=False, abort=False, reason=self.reason.PING_TIMEOUT)
        if self.sockets.get(s.sid) is s:
            del self.sockets[s.sid]
        protocol = s.protocol
        if protocol is not None and not protocol.writable.is_set():
            s.abort()  # it does not read: do not wait for it to take the close frame

    async def end_polling(self) -> int:
        """End every long-polling session now (`LeanSocket.end_polling`); how many there were."""
        ended = 0
        for sid, s in list(self.sockets.items()):
            if isinstance(s, LeanSocket) and await s.end_polling():
                ended += 1
                if self.sockets.get(sid) is s:
                    del self.sockets[sid]
        return ended

    async def shutdown(self) -> None:
        self.pinger.stop()
        await super().shutdown()


def lone_surrogate(value: Any) -> bool:
    """Whether decoded JSON holds a string with a lone surrogate (`"\\ud800"` is valid JSON).

    Such a string is not Unicode: it cannot be encoded, hashed or sent on, and would fail deep
    in a handler. Walked without recursion, as the packet may be nested deep.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode()
                except UnicodeEncodeError:
                    return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def client_environ(environ: dict[str, Any]) -> dict[str, Any]:
    """The little of a request's environ that says who the client is: the host of the ASGI
    scope's `client` (after uvicorn's proxy headers) and whether it was among the entries of
    the X-Forwarded-For it came with (`forwarded_mark`: a client may send 8 KB of them; the
    rest, the scope included, is let go)."""
    kept: dict[str, Any] = {}
    scope = environ.get("asgi.scope")
    client = scope.get("client") if isinstance(scope, dict) else None
    if client:
        kept[CLIENT_HOST] = client[0]
    elif CLIENT_HOST in environ:
        kept[CLIENT_HOST] = environ[CLIENT_HOST]
    if "HTTP_X_FORWARDED_FOR" in environ:
        host = kept.get(CLIENT_HOST)
        kept["HTTP_X_FORWARDED_FOR"] = forwarded_mark(str(host), environ) if host else ""
    return kept


class FeedSocketIO(socketio.AsyncServer):  # type: ignore[misc]
    """socketio.AsyncServer on `LeanEngineIO`, which lets go of each environ after connect."""

    def _engineio_server_class(self) -> type[LeanEngineIO]:
        return LeanEngineIO

    async def _handle_eio_message(self, eio_sid: str, data: Any) -> None:
        """python-socketio's dispatch, for the packets the feed speaks (JSON, no attachments).

        Anything else (bad JSON, a junk type, an event that is not a list starting with its
        name, a binary message or a claim of attachments) is reported (feed.security.guard: a
        counter and a rate-limited WARNING line) and ends the connection, where python-socketio
        logged a traceback at ERROR and, for attachments, waited for them.
        """
        problem: str | None = None
        pkt: Any = None
        if not isinstance(data, str):
            problem = "a binary message (the feed takes JSON text only)"
        else:
            try:
                pkt = self.packet_class(encoded_packet=data)
            except Exception as exc:
                problem = f"undecodable Socket.IO packet: {type(exc).__name__}: {exc}"
            if pkt is not None and "\\u" in data and lone_surrogate(pkt.data):
                problem = "a string with a lone UTF-16 surrogate escape (not valid Unicode)"
                pkt = None
        if pkt is not None:
            kind = pkt.packet_type
            if kind in (sio_packet.BINARY_EVENT, sio_packet.BINARY_ACK):
                problem = "a packet with binary attachments (the feed takes JSON text only)"
            elif kind == sio_packet.EVENT and not (
                isinstance(pkt.data, list) and pkt.data and isinstance(pkt.data[0], str)
            ):
                problem = "an event that is not a list starting with its name"
            elif kind == sio_packet.EVENT and pkt.data[0] in self.reserved_events:
                # python-socketio would run the connect or disconnect handler for it: a client
                # could then drop its own session (its expiry timer and connection count with
                # it) and keep the connection, or log a traceback per message.
                problem = f"an event named {pkt.data[0]!r}, which is reserved"
            elif kind not in (
                sio_packet.CONNECT,
                sio_packet.DISCONNECT,
                sio_packet.EVENT,
                sio_packet.ACK,
            ):
                problem = f"unexpected packet type {kind}"
        if problem is not None:
            self.eio.report_malformed(eio_sid, "bad_packet", problem)
            socket = self.eio.sockets.get(eio_sid)
            if socket is not None:
                await socket.close(wait=False, abort=True, reason=self.eio.reason.TRANSPORT_ERROR)
            return
        if kind == sio_packet.CONNECT:
            await self._handle_connect(eio_sid, pkt.namespace, pkt.data)
        elif kind == sio_packet.DISCONNECT:
            await self._handle_disconnect(eio_sid, pkt.namespace, self.reason.CLIENT_DISCONNECT)
            socket = self.eio.sockets.get(eio_sid)
            if (
                socket is not None
                and not socket.closed
                and self.eio.on_open is not None
                and self.manager.sid_from_eio_sid(eio_sid, "/") is None
            ):
                # The client left the namespace and kept its Engine.IO session: it has the
                # handshake timeout to connect again, like a new session. Without this, a `41`
                # kept a session (and its descriptor) open for good, unauthenticated and
                # uncounted by connections_per_identity.
                self.eio.on_open(eio_sid)
        elif kind == sio_packet.EVENT:
            await self._handle_event(eio_sid, pkt.namespace, pkt.id, pkt.data)
        else:
            await self._handle_ack(eio_sid, pkt.namespace, pkt.id, pkt.data)

    async def _send_packet(self, eio_sid: str, pkt: Any) -> None:
        if pkt.packet_type == sio_packet.CONNECT_ERROR and isinstance(pkt.data, str):
            # python-socketio's own refusals (a second CONNECT to a namespace the client is
            # in) carry a bare string, Socket.IO v4's form; v5's is `{"message": ...}`.
            pkt.data = {"message": pkt.data}
        await super()._send_packet(eio_sid, pkt)

    async def _handle_connect(self, eio_sid: str, namespace: str | None, data: Any) -> None:
        served = namespace or "/"
        if not (
            served in self.handlers
            or served in self.namespace_handlers
            or self.namespaces == "*"
            or served in self.namespaces
        ):
            # python-socketio refuses it with the bare string "Unable to connect", a Socket.IO
            # v4 CONNECT_ERROR; v5 (what the feed speaks) makes its payload an object,
            # `{"message": ...}`, which socket.io-client reads as the error's message (it
            # showed `undefined`). Worded as the Node.js server words it.
            await self._send_packet(
                eio_sid,
                self.packet_class(
                    sio_packet.CONNECT_ERROR,
                    data={"message": "Invalid namespace"},
                    namespace=served,
                ),
            )
            return
        await super()._handle_connect(eio_sid, namespace, data)
        if self.manager.sid_from_eio_sid(eio_sid, namespace or "/") is not None:
            environ = self.environ.get(eio_sid)
            if environ:
                # Emptied in place: Engine.IO's request handler still holds this very dict.
                # What names the client's address stays, for its next connect on this session
                # (after a `41`) to be counted like its first (`connections_per_address`).
                kept = client_environ(environ)
                environ.clear()
                environ.update(kept)
