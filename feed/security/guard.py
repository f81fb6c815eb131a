"""The server's edge against hostile and broken clients, before any authentication.

Three things a client could do cheaply that cost the server dearly (issue 18, docs/security.md):

- **oversized long-polling POSTs**: Engine.IO answered a body over `max_message_bytes` by
  closing the session and waiting, without bound, for a poll that never came; the request, its
  body and its task stayed forever. `InboundLimit` answers 413 from the `Content-Length` alone,
  before reading anything, closes the connection and the Engine.IO session named in the URL;
- **slowloris**: uvicorn starts its keep-alive timer only after a response, so a connection that
  sends a partial request holds its descriptor forever. `guarded_http_protocol` closes a
  connection whose request (headers, and body if any) is not complete `request_timeout` seconds
  after it opened (or after its previous response), and refuses connections past
  `max_connections` with a 503, so the clients already connected keep being served;
- **malformed packets**: Engine.IO and Socket.IO logged each at ERROR with a full traceback,
  twice. `ClientErrors` counts them (`feed_client_errors_total{kind}`) and logs at most one
  WARNING line per interval, saying how many were left out.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any
from urllib.parse import parse_qs

from uvicorn.protocols.http.h11_impl import H11Protocol

from feed.metrics import Metrics
from feed.security.answers import answer, answer_bytes

log = logging.getLogger("feed.guard")

WARN_INTERVAL = 10.0
"""Seconds between two WARNING lines about client errors (the counter counts every one)."""

FD_RESERVE = 100
"""Descriptors kept for sources, logs and the listening socket under the automatic cap."""

OPERATOR_RESERVE = 10
"""Connections past the cap that are still served `OPERATOR_PATHS` (and only them).

At the cap every new connection used to be refused with a 503 before its request was read, so
the liveness probe (`/healthz`) failed and an orchestrator restarted a healthy, merely full node,
cutting off every client it served; and the scrape of `/metrics` failed just when
`feed_connections` neared `feed_connection_limit`, the alert the docs advise. They take
descriptors from `FD_RESERVE`, which is there for this kind of need."""

OPERATOR_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
"""What a connection past the cap may still ask for: small answers that need no session."""


def automatic_connection_cap() -> int:
    """The connection cap when none is configured: the process's open-file limit less a reserve.

    Past that limit `accept` fails (EMFILE) and asyncio logs an error per attempt; a cap below
    it refuses politely and keeps descriptors for the sources.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 100_000
    return max(100, soft - FD_RESERVE)


def effective_connection_cap(configured: int) -> int:
    """`[limits] max_connections`, but never above what the open-file limit allows.

    Past the open-file limit `accept` fails, and the connections past it were reset without an
    answer and without a line in the log (uvloop), so a cap set above the limit was no cap at
    all: the configured one is lowered to the automatic one, with a warning naming both.
    """
    automatic = automatic_connection_cap()
    if not configured:
        return automatic
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and configured > automatic:
        log.warning(
            "[limits] max_connections = %d is more than the open-file limit allows (%d "
            "descriptors, %d kept for sources and logs): serving at most %d connections; raise "
            "the limit (ulimit -n, LimitNOFILE=, ulimits: nofile) to serve more",
            configured,
            soft,
            FD_RESERVE,
            automatic,
        )
        return automatic
    return configured


class ClientErrors:
    """Counts what broken or hostile clients send, and says so in the log, rate-limited."""

    def __init__(self, metrics: Metrics, interval: float = WARN_INTERVAL) -> None:
        self.metrics = metrics
        self.interval = interval
        self._last = -interval
        self._left_out = 0
        metrics.describe(
            "feed_client_errors_total",
            "counter",
            "Malformed, oversized or too slow client input, by kind",
        )

    def report(self, kind: str, detail: str) -> None:
        self.metrics.inc("feed_client_errors_total", kind=kind)
        now = time.monotonic()
        if now - self._last < self.interval:
            self._left_out += 1
            return
        left_out, self._left_out = self._left_out, 0
        self._last = now
        # The left-out ones may be of any kind: the line must not pin them on this one.
        more = (
            f" ({left_out} more client errors of any kind since the last line)" if left_out else ""
        )
        log.warning("client error (%s): %s%s", kind, detail[:200], more)


class ClientFaultsCounted(logging.Filter):
    """Drops uvicorn's ERROR and traceback for a websocket text frame that is not UTF-8.

    uvicorn logs it with `logger.exception` and closes the websocket with 1007, which the feed
    counts and logs itself, one rate-limited line (`bad_packet`, feed.delivery.eio_websocket):
    left in, any client could write six lines of traceback into the log per message.
    """

    MESSAGES = frozenset({"Invalid UTF-8 sequence received from client."})
    UNANSWERED = "ASGI callable returned without completing handshake."

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == self.UNANSWERED and WEBSOCKET_ANSWERED.get():
            return False  # it was answered, with an HTTP response (`deny_websocket`)
        return record.msg not in self.MESSAGES


WEBSOCKET_ANSWERED: ContextVar[bool] = ContextVar("feed_websocket_answered", default=False)
"""Set by `deny_websocket` in the task that runs the request, which is where uvicorn logs."""


async def deny_websocket(scope: Any, send: Any, status: int, body: bytes) -> None:
    """Refuse a websocket request with an HTTP answer (or a bare 403 where the server has no
    way to send one).

    uvicorn's websockets-sansio protocol (what it picks when `websockets` is installed) sends
    the answer but still logs "ASGI callable returned without completing handshake" at ERROR
    when the app returns, as if it had not answered: a line per request, which any client
    could repeat at will (tests that read the log through the root logger never saw it:
    uvicorn's loggers do not propagate).
    `ClientFaultsCounted` drops that one line for requests answered here, and only for them."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close"})
        return
    await answer(send, status, body, websocket=True)
    WEBSOCKET_ANSWERED.set(True)


def quiet_counted_client_faults() -> None:
    """Install `ClientFaultsCounted` on uvicorn's error logger, once."""
    uvicorn_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, ClientFaultsCounted) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(ClientFaultsCounted())


# -- oversized requests --------------------------------------------------------------------------

_TOO_LARGE = b"the message is larger than the server's max_message_bytes"


class InboundLimit:
    """ASGI middleware: an Engine.IO POST whose body is declared larger than the limit gets 413.

    Nothing of the body is read: the answer goes out at once with `Connection: close`, so uvicorn
    closes the connection instead of draining the rest. The Engine.IO session the request names
    is closed too (a message too large ends an Engine.IO session, as it does over a websocket).

    A body sent without a `Content-Length` (HTTP/1.1 chunked encoding) is read here, at most
    `limit` bytes of it (past that: 413 as above), and handed on with its length declared.
    Engine.IO reads a POST's body by its `Content-Length` alone: it drained a chunked body,
    dropped it, and answered `ok`, so every packet in it (a client's connect, a subscribe) was
    lost without a word.
    """

    def __init__(
        self,
        app: Any,
        limit: int,
        errors: ClientErrors,
        close_session: Callable[[str], None],
        path: str = "/socket.io",
    ) -> None:
        self.app = app
        self.limit = limit
        self.errors = errors
        self.close_session = close_session
        self.path = path

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (
            scope["type"] == "http"
            and scope.get("method") == "POST"
            and scope.get("path", "").startswith(self.path)
        ):
            headers = scope.get("headers", ())
            length = _content_length(headers)
            if length is None or length > self.limit:
                await self._refuse(scope, send, length)
                return
            if _chunked(headers):
                body = bytearray()
                while True:
                    event = await receive()
                    if event["type"] != "http.request":
                        return  # the client went away mid-body
                    body += event.get("body", b"")
                    if len(body) > self.limit:
                        await self._refuse(scope, send, len(body))
                        return
                    if not event.get("more_body", False):
                        break
                scope = dict(scope)
                scope["headers"] = [
                    (name, value)
                    for name, value in headers
                    if name.lower() not in (b"transfer-encoding", b"content-length")
                ] + [(b"content-length", str(len(body)).encode())]
                receive = _replay(bytes(body), receive)
        await self.app(scope, receive, send)

    async def _refuse(self, scope: Any, send: Any, length: int | None) -> None:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        sid = (query.get("sid") or [""])[0]
        self.errors.report("oversized", f"a POST of {length} bytes (limit {self.limit})")
        if sid:
            self.close_session(sid)
        status, body = (413, _TOO_LARGE) if length is not None else (400, b"bad Content-Length")
        await answer(send, status, body, close=True)


def _chunked(headers: Any) -> bool:
    """Whether the request's body comes in HTTP/1.1 chunks (no `Content-Length` then)."""
    return any(
        name.lower() == b"transfer-encoding" and b"chunked" in value.lower()
        for name, value in headers
    )


def _replay(body: bytes, receive: Any) -> Any:
    """An ASGI receive that gives `body` whole as the request's one event, then `receive`'s."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Any:
        if pending:
            return pending.pop()
        return await receive()

    return replayed


def _content_length(headers: Any) -> int | None:
    """The declared body size; 0 when none is declared; None when it is not a number."""
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return None
            return length if length >= 0 else None
    return 0


# -- slow and surplus connections ----------------------------------------------------------------

_BUSY_TEXT = b"the server is at its connection limit.\n"
_BUSY = answer_bytes(503, _BUSY_TEXT)
"""The cap's 503 as bytes, for a connection refused before its request is read."""


class ConnectionGuard:
    """Settings and counts shared by every connection's protocol (see `guarded_http_protocol`)."""

    def __init__(
        self, metrics: Metrics, errors: ClientErrors, request_timeout: float, max_connections: int
    ) -> None:
        self.metrics = metrics
        self.errors = errors
        self.request_timeout = request_timeout
        self.max_connections = effective_connection_cap(max_connections)
        self.connections: set[Any] | None = None
        """uvicorn's set of open connections (HTTP and websocket), once one has been made."""
        self._warned = -WARN_INTERVAL
        self._unwarned = 0
        metrics.describe("feed_connections", "gauge", "Open TCP connections (HTTP and websocket)")
        metrics.describe(
            "feed_connections_refused_total", "counter", "Connections refused at the cap"
        )
        metrics.describe(
            "feed_connection_limit", "gauge", "The most connections served at once (the cap)"
        )
        metrics.gauges(self._gauges)

    def refused(self) -> None:
        """Count a connection refused at the cap, and say so in the log at most once per
        `WARN_INTERVAL`: the refused clients only see a 503, and without a line the operator
        looking at the log had nothing to go by."""
        self.metrics.inc("feed_connections_refused_total")
        now = time.monotonic()
        if now - self._warned < WARN_INTERVAL:
            self._unwarned += 1
            return
        more, self._unwarned = self._unwarned, 0
        self._warned = now
        also = f" ({more} more since the last line)" if more else ""
        log.warning(
            "connection refused with 503: %d connections open, the cap is %d ([limits] "
            "max_connections, or the open-file limit less %d when it is 0)%s",
            len(self.connections or ()) - 1,
            self.max_connections,
            FD_RESERVE,
            also,
        )

    def _gauges(self) -> Any:
        yield "feed_connections", (), float(len(self.connections or ()))
        yield "feed_connection_limit", (), float(self.max_connections)


INVALID_HTTP = "Invalid HTTP request received."
"""What uvicorn logs, at WARNING and per request, for bytes that are not HTTP."""


class CountedProtocolLog:
    """uvicorn's logger as one connection's protocol uses it, with its warning about a request
    that is not HTTP turned into a counted client error (`bad_request`, at most one line per
    `WARN_INTERVAL`): as uvicorn logs it, any client could write a line per request."""

    def __init__(self, logger: Any, errors: ClientErrors) -> None:
        self._logger = logger
        self._errors = errors

    def warning(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        if msg == INVALID_HTTP:
            self._errors.report("bad_request", "a request that is not HTTP: answered 400")
            return
        self._logger.warning(msg, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger, name)


def guarded_http_protocol(guard: ConnectionGuard) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a request timeout and a connection cap (`uvicorn.Config(http=)`).

    The timer runs while the connection waits for a request, headers and body: from the moment
    it opens, and again after each response. A complete request (or a websocket upgrade) stops
    it; long-polls and websockets, once their request is in, are not timed by it.
    """

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _timed_cycle: Any = None
        """The request cycle current when the timer was armed (the one already answered)."""

        _over_cap = False
        """Past the cap, within `OPERATOR_RESERVE`: served `OPERATOR_PATHS` only."""

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            # Duck-typed: the protocol calls only warning, and the rest passes through.
            self.logger = CountedProtocolLog(self.logger, guard.errors)  # type: ignore[assignment]
            guard.connections = self.connections
            open_now = len(self.connections)
            if open_now > guard.max_connections + OPERATOR_RESERVE:
                guard.refused()
                transport.write(_BUSY)
                transport.close()
                return
            if open_now > guard.max_connections:
                self._over_cap = True
                served = self.app

                async def operator_only(scope: Any, receive: Any, send: Any) -> None:
                    if scope.get("method") in ("GET", "HEAD") and scope["path"] in OPERATOR_PATHS:
                        await served(scope, receive, send)
                    else:
                        guard.refused()
                        await answer(send, 503, _BUSY_TEXT, close=True)

                self.app = operator_only
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            cycle = self.cycle
            # A new request, headers and body, is complete.
            if (
                self._header_timer is not None
                and cycle is not self._timed_cycle
                and not cycle.more_body
            ):
                self._disarm()

        def handle_websocket_upgrade(self, event: Any) -> None:
            self._disarm()
            if self._over_cap:
                guard.refused()
                self.transport.write(_BUSY)
                self.transport.close()
                return
            super().handle_websocket_upgrade(event)

        def on_response_complete(self) -> None:
            # Armed first: a pipelined request that super() handles now disarms it at once.
            if not self.transport.is_closing():
                self._arm()
            super().on_response_complete()

        def _arm(self) -> None:
            self._disarm()
            self._timed_cycle = self.cycle
            self._header_timer = self.loop.call_later(guard.request_timeout, self._late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _late(self) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            partial_body = self.cycle is not self._timed_cycle
            if partial_body or self.conn.trailing_data[0]:  # part of a request came, not all
                guard.errors.report(
                    "request_timeout",
                    f"no complete request within {guard.request_timeout:g} s "
                    f"({'body' if partial_body else 'headers'} incomplete): closed",
                )
            self.transport.abort()

    return GuardedH11Protocol
