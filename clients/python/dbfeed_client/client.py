"""FeedClient and Subscription: a connection that comes back by itself, and rooms that resume.

The connection is supervised here rather than by python-socketio's own reconnection, because
that one does not retry after the server closes a connection on purpose (a restart, an expired
token), and each attempt must ask the token provider again. Every (re)connect subscribes each
room again with its last `seq` and `epoch`; the answer says whether the missed changes are
replayed (`recovered`) or not (`reload`, with a fresh snapshot when the subscription has one).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Literal

import aiohttp
import socketio

from dbfeed_client.errors import (
    ClosedError,
    ConnectError,
    FeedError,
    RequestTimeout,
    SubscribeError,
)
from dbfeed_client.pacing import Pacer
from dbfeed_client.rows import Change, KeySpec, Row, apply, jwt_seconds_left, row_key
from dbfeed_client.wire import SocketIO, packet_bytes, too_large_message

log = logging.getLogger("dbfeed_client")

State = Literal["pending", "live", "recovered", "reload", "error"]
Token = str | Callable[[], str | None] | Callable[[], Awaitable[str | None]] | None
Handler = Callable[..., Any]


def spread(delay: float) -> float:
    """A reconnect delay spread by ±50% at random, as socket.io-client spreads its own
    (randomizationFactor 0.5): the clients of a node that restarts then come back over a
    stretch of time, not as one burst of handshakes at the next node."""
    return delay * random.uniform(0.5, 1.5)


RETRYABLE = frozenset(
    {
        "rate_limited",
        "internal",
        "snapshot_failed",
        "cluster_unavailable",
        "server_busy",
        "not_connected",
        "timeout",
    }
)
"""Subscribe refusals the server means as "try again": retried with backoff, not reported."""
MAX_IDS = 4096
"""Recent change ids kept per subscription to drop duplicates."""
MAX_ORPHANS = 10000
"""Changes held for a room whose first subscribe answer has not arrived yet."""
WATCHDOG_INTERVAL = 1.0
"""Seconds between two looks at the transport's background tasks (see `transport_wedged`)."""


def transport_wedged(sio: socketio.AsyncClient) -> bool:
    """Whether python-engineio's transport died without saying so.

    Its long-polling read loop catches errors of the HTTP request, not of reading the answer's
    body: a poll answer cut short (a node killed while its answer crosses a load balancer) or
    stalled past the poll timeout ends the read loop with an exception, the `disconnect`
    handler never runs, and the client stays "connected" forever, receiving nothing (its write
    loop later gives up with "packet queue is empty, aborting", again without a disconnect). A
    connected client whose read or write loop is gone is such a wedge.
    """
    eio = sio.eio
    if getattr(eio, "state", None) != "connected":
        return False
    # Internals of python-engineio (4.x): where a release lacks them, no wedge is assumed.
    if not (hasattr(eio, "read_loop_task") and hasattr(eio, "write_loop_task")):
        return False
    read, write = eio.read_loop_task, eio.write_loop_task
    return read is None or read.done() or write is None or write.done()


async def drop_wedged(sio: socketio.AsyncClient) -> None:
    """Close a wedged transport at once, running its disconnect handlers; the dead read loop's
    error is taken here (it is the reason, already known) instead of left unretrieved."""
    eio = sio.eio
    read = eio.read_loop_task
    with contextlib.suppress(Exception):
        await eio.disconnect(abort=True)
    if read is not None:
        if not read.done():
            read.cancel()
        await asyncio.wait([read], timeout=1.0)
        if read.done() and not read.cancelled():
            read.exception()


class _Events:
    """Callbacks by event name; a failing callback is logged and does not stop the others.

    A callback may be a coroutine function: each call then runs as a task of its own (started
    in the order of the events, not awaited one after the other), which closing the client
    cancels if it is still running."""

    def __init__(self) -> None:
        self._handlers: dict[str, list[Handler]] = {}

    def on(self, event: str, handler: Handler) -> None:
        """Call `handler` on every `event` (see docs/clients.md for the events)."""
        self._handlers.setdefault(event, []).append(handler)

    def off(self, event: str, handler: Handler) -> None:
        with contextlib.suppress(ValueError):
            self._handlers.get(event, []).remove(handler)

    def _handler_tasks(self) -> set[asyncio.Task[Any]]:
        raise NotImplementedError

    def _emit(self, event: str, *args: Any) -> None:
        for handler in list(self._handlers.get(event, [])):
            try:
                result = handler(*args)
            except Exception:
                log.exception("dbfeed_client: a %r handler failed", event)
                continue
            if inspect.isawaitable(result):
                # Called and dropped, an async handler's coroutine would never run.
                tasks = self._handler_tasks()
                task = asyncio.ensure_future(result)
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                task.add_done_callback(functools.partial(_handler_done, event))


def _handler_done(event: str, task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("dbfeed_client: a %r handler failed", event, exc_info=task.exception())


TRANSIENT_REFUSALS = frozenset({"too_many_connections", "auth_unavailable", "server_busy"})
"""Refusals that say "not now" rather than "not this token": the identity holds its most
connections (another may close), the identity provider's keys could not be fetched, the server
is at its connection limit (HTTP 503). Retried with backoff whatever the token, so a fixed token
does not end every subscription for good."""

_NAME_OR_ORIGIN = (
    "the feed does not accept the name it is reached by (its Host: [server] allowed_hosts) or"
    " the client's origin ([server] cors_allowed_origins)"
)


UNTOKENED_REFUSALS = frozenset({"handshake_refused"})
"""Refusals no token can change (the name the feed is reached by, an origin): final."""

HTTP_REFUSALS = {
    400: ("handshake_refused", _NAME_OR_ORIGIN),
    403: ("handshake_refused", _NAME_OR_ORIGIN),
    413: (
        "too_large",
        "the connection's first message (its token) is larger than the server's"
        " [server] max_message_bytes",
    ),
    503: ("server_busy", "the server is at its connection limit ([limits] max_connections)"),
}
"""What the server's HTTP refusals of a handshake mean (docs/clients.md, "Refused connections")."""

_STATUS_SAID = re.compile(r"Unexpected status code (\d{3})")


def http_refusal(exc: BaseException) -> ConnectError | None:
    """The server's refusal of a handshake in HTTP, from the error of a failed attempt: a
    ConnectError (`handshake_refused`, `too_large`, `server_busy`), or None for a failure that
    says nothing of the kind (the server down, a network error).

    python-engineio raises its own ConnectionError for both transports: over long-polling its
    message names the status; over a websocket it says "Connection error", raised while
    handling aiohttp's WSServerHandshakeError, which has the status. A long-polling refusal
    whose body arrives after its head is read after python-engineio closed its session:
    aiohttp's RuntimeError("Connection closed.") then carries no status (`unreachable`).
    """
    seen: set[int] = set()
    error: BaseException | None = exc
    status = None
    while error is not None and id(error) not in seen and status is None:
        seen.add(id(error))
        if isinstance(error, aiohttp.WSServerHandshakeError):
            status = error.status
        elif found := _STATUS_SAID.search(str(error)):
            status = int(found.group(1))
        error = error.__cause__ or error.__context__
    if status not in HTTP_REFUSALS:
        return None
    code, hint = HTTP_REFUSALS[status]
    message = f"the server refused the connection with HTTP {status}: {hint}"
    return ConnectError(code, message, status)


class FeedClient(_Events):
    """One connection to a feed server, shared by any number of subscriptions.

    Events (`on`): "connect", "disconnect" (reason), "error" (FeedError), "status" (dict),
    "gap" (dict).
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        token: Token = None,
        refresh_tokens: bool = True,
        retry_refused: bool = True,
        transports: tuple[str, ...] = ("websocket",),
        socketio_path: str = "socket.io",
        reconnection_delay: float = 0.5,
        reconnection_delay_max: float = 5.0,
        timeout: float = 10.0,
    ) -> None:
        super().__init__()
        # One URL, or several nodes of one feed, tried in turn (see `_run`).
        self.urls = [url] if isinstance(url, str) else list(url)
        if not self.urls:
            raise FeedError("bad_url", "no URL given")
        self._url_index = 0
        self.timeout = timeout
        self.transports = transports
        self.socketio_path = socketio_path
        self.reconnection_delay = reconnection_delay
        self.reconnection_delay_max = reconnection_delay_max
        self.refresh_tokens = refresh_tokens
        self.retry_refused = retry_refused
        self._token_source = token
        self._token: str | None = token if isinstance(token, str) else None
        self.subscriptions: set[Subscription] = set()
        self._by_room: dict[str, set[Subscription]] = {}
        self._orphans: list[Change] = []
        self._sio: socketio.AsyncClient | None = None
        self._runner: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._refusal: dict[str, Any] | None = None
        self._gone = asyncio.Event()
        self._pacer = Pacer(reconnection_delay, reconnection_delay_max)
        self._requests: dict[asyncio.Future[Any], int] = {}
        """Answers awaited for requests sent, with the requests' sizes (see `_call_once`)."""
        self._cut_at: int | None = None
        """A request this large got the connection cut (see `_on_disconnect`)."""
        self._connections = 0
        """Connections that ended: a request asked on an earlier one is stale (see `_call`)."""

    def _handler_tasks(self) -> set[asyncio.Task[Any]]:
        return self._tasks

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> FeedClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def url(self) -> str:
        """The node connected to (or being tried)."""
        return self.urls[self._url_index]

    @property
    def connected(self) -> bool:
        return self._sio is not None and self._sio.connected

    async def connect(self) -> None:
        """Connect, then stay connected in the background until `close`.

        Raises ConnectError when the server refuses the first attempt (with several URLs, a
        refusal that says "not now" (`TRANSIENT_REFUSALS`) once every node was tried, the
        others first), or when no node could be reached: `timeout` seconds have passed and every URL was tried at least once (each
        attempt is given up after `timeout`, then the next URL is tried at once). Later, a refused reconnect is retried when `retry_refused` is true
        and the token is a function (it may have a better token next time, unless the refusal
        is `handshake_refused`: a name or origin the feed does not accept) or the refusal says
        "not now" (`TRANSIENT_REFUSALS`). A reconnect failing for `timeout` seconds is said once
        per outage (`unreachable`), and retried (docs/clients.md, "Refused connections").
        """
        if self._closed:
            raise ClosedError("closed", "this FeedClient is closed; make a new one")
        if self._runner is not None:
            raise FeedError("already_connected", "connect() was called before")
        first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._runner = asyncio.create_task(self._run(first))
        try:
            await first
        except BaseException:
            # Refused or unreachable (the runner has ended), or cancelled (a timeout around
            # `async with`, a shutdown): the runner would go on connecting in the background,
            # with sockets nobody closes.
            await self.close()
            raise

    async def close(self) -> None:
        self._closed = True
        for sub in list(self.subscriptions):
            sub._close(ClosedError("closed", "the client was closed"))
        self._pacer.close()
        self._fail_requests(ClosedError("closed", "this FeedClient is closed"))
        for task in [self._runner, self._refresher, *self._tasks]:
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        if self._sio is not None:
            with contextlib.suppress(Exception):
                await self._sio.disconnect()
        for task in [self._runner, self._refresher, *self._tasks]:
            if task is not None and task is not asyncio.current_task():
                with contextlib.suppress(BaseException):
                    await task

    async def _run(self, first: asyncio.Future[None]) -> None:
        """Connect, and connect again whenever the connection is lost, until closed.

        With several URLs the attempts go round them in turn: after a lost connection the
        next node is tried first, the lost one last, and a node that did not answer is not
        tried again before the others. The backoff applies per round: a failed attempt is
        followed at once by one to the next node, and only a round in which every node failed
        waits (`reconnection_delay`, doubling per round up to `reconnection_delay_max`). The
        wait before the first attempt after a loss stays, so that the clients of a node that
        died reach the next one spread over time. With one URL each attempt is a round.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        outage, told = loop.time(), False
        delay = self.reconnection_delay
        failed = 0  # attempts failed since the last connection (a round: one per URL)
        while not self._closed:
            try:
                # Asked here, not by python-socketio during the handshake: there a failing token
                # function would leave the attempt waiting out `timeout` (then "unreachable")
                # with its transport open.
                token = await self._current_token()
            except ConnectError as error:
                self._emit("error", error)
                if not first.done():
                    first.set_exception(error)
                    for sub in list(self.subscriptions):
                        sub._fail(error)
                    return
                await asyncio.sleep(spread(delay))
                delay = min(delay * 2, self.reconnection_delay_max)
                continue
            sio = self._new_socket()
            self._refusal = None
            self._gone.clear()
            try:
                # Bounded as a whole: python-engineio bounds neither the websocket handshake
                # (aiohttp's session default, 300 s) nor the wait for the OPEN packet after it,
                # so a node behind a network partition that drops packets without closing (a
                # blackhole: the TCP connect may even succeed, through a balancer or a proxy)
                # held a reconnect forever, instead of moving on to the next node.
                async with asyncio.timeout(self.timeout):
                    await sio.connect(
                        self.url,
                        auth={"token": token} if token else {},
                        transports=list(self.transports),
                        socketio_path=self.socketio_path,
                        wait_timeout=self.timeout,
                    )
            except asyncio.CancelledError:
                # Closed while connecting: this socket is not `_sio` yet, so `close` cannot
                # disconnect it, and its HTTP session would stay open.
                with contextlib.suppress(Exception):
                    await sio.disconnect()
                raise
            except Exception as exc:
                # A failure that is no refusal (`http_refusal`, `_on_connect_error`) is one more
                # unreachable attempt: python-engineio lets others through than its
                # ConnectionError. A long-polling handshake
                # answered with an error status (a 400 for a Host not in allowed_hosts, or an
                # Origin refused) is read after its session was closed, and aiohttp raised
                # RuntimeError("Connection closed."): it ended this loop, so `connect()` waited
                # forever and a reconnect never came.
                http = http_refusal(exc)
                if isinstance(exc, TimeoutError):
                    exc = socketio.exceptions.ConnectionError(
                        f"no answer within {self.timeout:g} s"
                    )
                elif not isinstance(exc, (socketio.exceptions.ConnectionError, ValueError)):
                    exc = socketio.exceptions.ConnectionError(f"{type(exc).__name__}: {exc}")
                with contextlib.suppress(Exception):
                    await sio.disconnect()
                refused = http
                if self._refusal is not None:
                    data = self._refusal.get("data")
                    code = data.get("code") if isinstance(data, dict) else None
                    refused = ConnectError(
                        str(code or "refused"), str(self._refusal.get("message") or exc)
                    )
                if refused is not None:
                    self._emit("error", refused)
                    not_now = refused.code in TRANSIENT_REFUSALS
                    retry = self.retry_refused and (
                        not_now
                        or (callable(self._token_source) and refused.code not in UNTOKENED_REFUSALS)
                    )
                    # A first connect refused "not now" by one node goes on to the others:
                    # raised once every node was tried (each may have refused or failed).
                    elsewhere = retry and not_now and failed + 1 < len(self.urls)
                    if not (retry and (first.done() or elsewhere)):
                        # The same request would be refused again (or this is the first
                        # attempt, which `connect()` reports): give up, and say so.
                        if not first.done():
                            first.set_exception(refused)
                        for sub in list(self.subscriptions):
                            sub._fail(refused)
                        return
                    if http is not None or not_now:
                        # "Not now, here" (a node at its connection limit, the identity at its
                        # connections on this node, a node that cannot check tokens right now):
                        # the next node now, as for one that is unreachable (the backoff once a
                        # round of them all failed). A refusal of the token itself is the same
                        # on every node: retried where it was said, after the backoff.
                        self._next_url()
                        failed += 1
                        if failed % len(self.urls):
                            continue
                else:
                    # Unreachable, refusing connections, or no answer within `timeout`: the
                    # next node now, the backoff only once a round of them all failed.
                    self._next_url()
                    failed += 1
                    if not first.done() and loop.time() >= deadline and failed >= len(self.urls):
                        # The first connect gives up once `timeout` has passed and every node
                        # was tried. `timeout` bounds each attempt, not the first connect as a
                        # whole: a silent node (a blackhole) used it all up, and the others
                        # were never tried.
                        urls = ", ".join(self.urls)
                        first.set_exception(ConnectError("unreachable", f"{urls}: {exc}"))
                        return
                    down = loop.time() - outage
                    if first.done() and not told and down >= self.timeout:
                        # Said once per outage, as the JavaScript library does; still retried.
                        told = True
                        urls = ", ".join(self.urls)
                        message = f"{urls}: no connection for {down:.0f} s ({exc}); still trying"
                        self._emit("error", ConnectError("unreachable", message))
                    if failed % len(self.urls):
                        continue
                await asyncio.sleep(spread(delay))
                delay = min(delay * 2, self.reconnection_delay_max)
                continue
            delay = self.reconnection_delay
            failed = 0
            self._sio = sio
            if not first.done():
                first.set_result(None)
            self._on_connect()
            await self._watch(sio)
            outage, told = loop.time(), False  # `unreachable` is said once per outage
            with contextlib.suppress(Exception):
                await sio.disconnect()
            if not self._closed:
                # Lost: the lost node is the last one the next round tries (it was retried
                # first, and a dead or blackholed node held the reconnect for up to `timeout`).
                self._next_url()
                await asyncio.sleep(spread(delay))

    def _next_url(self) -> None:
        self._url_index = (self._url_index + 1) % len(self.urls)

    async def _watch(self, sio: socketio.AsyncClient) -> None:
        """Wait until the connection is lost, noticing a wedged transport too (which never
        reports its loss): that one is dropped here, which runs the disconnect handler."""
        while not self._gone.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._gone.wait(), WATCHDOG_INTERVAL)
            if not self._gone.is_set() and transport_wedged(sio):
                log.warning(
                    "dbfeed_client: the transport stopped without a disconnect; reconnecting"
                )
                await drop_wedged(sio)  # runs `_on_disconnect` through the disconnect handler
                if not self._gone.is_set():
                    await self._on_disconnect("transport error")

    def _new_socket(self) -> socketio.AsyncClient:
        # handle_sigint=False: python-engineio's own SIGINT handler would replace the
        # application's (asyncio.run's KeyboardInterrupt, a web server's graceful shutdown),
        # cancel every task of the loop and stop it.
        # max_msg_size=0: aiohttp's websocket refuses a message over 4 MiB by default, and one
        # change (a row with a wide text or jsonb column) or one `changes` frame may be larger:
        # the client then closed with 1009, resumed, was replayed the same frame and closed
        # again, forever. The server bounds what it sends ([limits] outbound_queue_bytes).
        sio = SocketIO(
            reconnection=False,
            handle_sigint=False,
            websocket_extra_options={"max_msg_size": 0},
        )
        sio.on("connect_error", self._on_connect_error)
        sio.on("disconnect", self._on_disconnect)
        sio.on("change", self._on_change)
        sio.on("changes", self._on_changes)
        sio.on("snapshot", self._on_chunk)
        sio.on("gap", self._on_gap)
        sio.on("status", self._on_status)
        sio.on("auth_expired", self._on_auth_expired)
        return sio

    async def _current_token(self) -> str | None:
        """The token to send: the token function's answer, when the token is a function.

        A function that raises (its identity provider is down, say) is a `ConnectError`
        `token_failed`, carrying its error as `__cause__`."""
        source = self._token_source
        if callable(source):
            try:
                value = source()
                if inspect.isawaitable(value):
                    value = await value
            except Exception as exc:
                raise ConnectError(
                    "token_failed", f"the token function raised {type(exc).__name__}: {exc}"
                ) from exc
            self._token = value if isinstance(value, str) and value else None
        return self._token

    # -- requests ------------------------------------------------------------------------------

    def subscribe(
        self,
        room: str,
        *,
        filter: str | None = None,
        snapshot: bool = False,
        key: KeySpec = None,
        since: int | None = None,
        epoch: str | None = None,
        max_queue: int = 10000,
    ) -> Subscription:
        """Follow a room: use as `async with` (or `await sub.ready()`), then `async for`."""
        if self._closed:
            raise ClosedError("closed", "this FeedClient is closed")
        if since is not None and epoch is None:
            # Without its epoch a position cannot be resumed safely (numbers from another server
            # run mean nothing), and dropping it would miss every change after it without a word.
            raise FeedError(
                "bad_request", "`since` needs the `epoch` it was saved with (sub.seq and sub.epoch)"
            )
        sub = Subscription(self, room, filter, snapshot, key, since, epoch, max_queue)
        self.subscriptions.add(sub)
        if self.connected:
            self._spawn(sub._send())
        return sub

    async def catalog(self) -> dict[str, Any]:
        """The server's connectors, their targets and status."""
        ack = await self._call("catalog", None)
        if not ack.get("ok"):
            raise _ack_error(ack, FeedError)
        return ack

    async def refresh(self, token: str | None = None) -> dict[str, Any]:
        """Send a fresh token now (from the token function unless one is given)."""
        fresh = token if token is not None else await self._current_token()
        ack = await self._call("refresh", {"token": fresh})
        if not ack.get("ok"):
            raise _ack_error(ack, FeedError)
        self._token = fresh
        expires_in = ack.get("expires_in")
        self._schedule_refresh(expires_in if isinstance(expires_in, int | float) else None)
        return ack

    async def _call(self, event: str, data: Any) -> dict[str, Any]:
        """Send a request and wait for its answer, paced (`Pacer`): `rate_limited` is retried."""
        connection = self._connections
        while True:
            await self._pacer.take(first=event == "refresh")
            try:
                if self._connections != connection and not self._closed:
                    # Asked on a connection that dropped while it waited for its turn: not sent,
                    # as on the new connection it would be stale (each subscription asks again
                    # for itself), taking the server's rate from the requests that count.
                    raise FeedError(
                        "not_connected", f"the connection closed before {event} was sent"
                    )
                ack = await self._call_once(event, data)
                limited = ack.get("ok") is False and _error_code(ack) == "rate_limited"
                if limited:
                    self._pacer.refused()
                elif ack.get("ok"):
                    self._pacer.accepted()
            finally:
                self._pacer.give()
            if not limited or self._closed or not self.connected:
                return ack

    async def _call_once(self, event: str, data: Any) -> dict[str, Any]:
        """Send `event` and wait for its answer.

        The wait is the library's own, not python-socketio's `call`, which waits out its
        timeout through a dropped connection and a close (the answer can no longer come): a
        request whose connection drops raises `not_connected` at once, and one waiting when
        the client is closed raises ClosedError (`_fail_requests`)."""
        sio = self._sio
        if self._closed:
            raise ClosedError("closed", "this FeedClient is closed")
        if sio is None or not sio.connected:
            raise FeedError("not_connected", "not connected to the server")
        size = packet_bytes([event] if data is None else [event, data])
        limit = self._max_bytes()
        if limit is not None and size > limit:
            # Sent, it would get the connection cut, and be sent again after the reconnect.
            raise FeedError("too_large", too_large_message(event, size, limit))
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def answered(*args: Any) -> None:
            if not answer.done():
                answer.set_result(args[0] if len(args) == 1 else None)

        self._requests[answer] = size
        try:
            try:
                await sio.emit(event, data, callback=answered)
            except socketio.exceptions.SocketIOError as exc:
                raise FeedError("not_connected", f"{event}: {exc}") from None
            try:
                async with asyncio.timeout(self.timeout):
                    ack = await answer
            except TimeoutError:
                raise RequestTimeout(
                    "timeout", f"the server did not answer {event} within {self.timeout} s"
                ) from None
        finally:
            self._requests.pop(answer, None)
        if not isinstance(ack, dict):
            return {"ok": False, "error": {"code": "bad_answer", "message": repr(ack)[:200]}}
        return ack

    def _max_bytes(self) -> int | None:
        """The most bytes one message may have: the server's `maxPayload` from its Engine.IO
        handshake ([server] max_message_bytes), less once a request of `_cut_at` bytes got the
        connection cut. None when unknown."""
        announced = getattr(getattr(self._sio, "eio", None), "max_payload", None)
        limits = [n for n in (announced, self._cut_at) if isinstance(n, int)]
        return min(limits) if limits else None

    def _fail_requests(self, error: FeedError) -> None:
        """End the requests waiting for answers (the connection dropped, or the client closed)."""
        for answer in list(self._requests):
            if not answer.done():
                answer.set_exception(error)
        self._requests.clear()

    async def _leave(self, room: str) -> dict[str, Any]:
        """Leave `room` on the server.

        A subscribe of the same room still on its way (another subscription, whose canonical
        name is not known yet) may be answered before or after the server handles this, so it
        may end up outside the room: it is sent again when answered (`_on_ack`).
        """
        for sub in self.subscriptions:
            if sub._phase == "subscribing":
                sub._left_while_asking.add(room)
        return await self._call("unsubscribe", {"room": room})

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- connection events ---------------------------------------------------------------------

    def _on_connect(self) -> None:
        self._pacer.reset()
        self._emit("connect")
        self._schedule_refresh(jwt_seconds_left(self._token))
        for sub in list(self.subscriptions):
            self._spawn(sub._send())

    async def _on_connect_error(self, data: Any = None) -> None:
        if isinstance(data, dict) and "message" in data:
            self._refusal = data

    async def _on_disconnect(self, *reason: Any) -> None:
        self._connections += 1
        if self._requests and getattr(getattr(self._sio, "eio", None), "cut_too_large", False):
            # Cut for a message too large, though the requests were checked against the limit
            # (one the server did not announce: a proxy's, say): the largest request waiting for
            # its answer was that message. A request that large is not sent again.
            largest = max(self._requests.values())
            self._cut_at = min(self._cut_at or largest, largest - 1)
        if self._refresher is not None:
            self._refresher.cancel()
        # The new connection knows nothing of the requests sent on this one.
        self._fail_requests(
            FeedError("not_connected", "the connection closed before the server answered")
        )
        self._emit("disconnect", str(reason[0]) if reason else "")
        for sub in list(self.subscriptions):
            sub._offline()
        self._orphans = []
        self._gone.set()

    async def _on_auth_expired(self, notice: Any = None) -> None:
        body = notice if isinstance(notice, dict) else {}
        code = str(body.get("code") or "token_expired")
        self._emit("error", FeedError(code, str(body.get("message") or "the token expired")))

    def _schedule_refresh(self, seconds_left: float | None) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None
        wanted = self.refresh_tokens and callable(self._token_source)
        if seconds_left is None or not wanted or self._closed:
            return
        self._refresher = asyncio.ensure_future(self._refresh_later(seconds_left))

    async def _refresh_later(self, seconds_left: float) -> None:
        # With a quarter of the lifetime to spare, so that a slow answer is still in time.
        await asyncio.sleep(max(0.2, seconds_left * 0.75))
        self._refresher = None
        try:
            await self.refresh()
        except FeedError as exc:
            self._emit("error", exc)
            # Try again shortly; if the token does expire, the server closes and we reconnect.
            if self.connected:
                self._schedule_refresh(max(1.0, seconds_left * 0.25))

    # -- routing -------------------------------------------------------------------------------

    async def _on_change(self, change: Any) -> None:
        self._route([change])

    async def _on_changes(self, changes: Any) -> None:
        self._route(changes if isinstance(changes, list) else [])

    def _route(self, changes: list[Any]) -> None:
        framed: set[Subscription] = set()  # those told that this frame begins (`_frame`)
        for change in changes:
            if not isinstance(change, dict):
                continue
            subs = self._by_room.get(change.get("room", ""))
            if subs:
                for sub in list(subs):
                    if sub not in framed:
                        framed.add(sub)
                        sub._frame()
                    sub._receive(change)
            elif any(s.room is None for s in self.subscriptions):
                # An answer to a first subscribe is on its way; the change is for that room.
                self._orphans.append(change)
                if len(self._orphans) > MAX_ORPHANS:
                    self._orphans.pop(0)

    async def _on_chunk(self, chunk: Any) -> None:
        if isinstance(chunk, dict):
            for sub in list(self._by_room.get(chunk.get("room", ""), ())):
                sub._chunk(chunk)

    async def _on_gap(self, gap: Any) -> None:
        if isinstance(gap, dict):
            for sub in list(self._by_room.get(gap.get("room", ""), ())):
                sub._gap(gap)
            self._emit("gap", gap)

    async def _on_status(self, status: Any) -> None:
        self._emit("status", status)

    def _register(self, sub: Subscription, room: str) -> list[Change]:
        self._by_room.setdefault(room, set()).add(sub)
        mine = [c for c in self._orphans if c.get("room") == room]
        if mine:
            self._orphans = [c for c in self._orphans if c.get("room") != room]
        return mine

    def _unregister(self, sub: Subscription) -> None:
        if sub.room is not None:
            subs = self._by_room.get(sub.room)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._by_room[sub.room]


def _error_code(ack: dict[str, Any]) -> Any:
    error = ack.get("error")
    return error.get("code") if isinstance(error, dict) else None


def _ack_error(ack: dict[str, Any], kind: type[FeedError]) -> FeedError:
    error = ack.get("error")
    if not isinstance(error, dict):
        error = {"code": "bad_answer", "message": "the server sent no valid answer"}
    return kind(str(error.get("code")), str(error.get("message")))


_END = object()


class Subscription(_Events):
    """One followed room: an async iterator of its changes, with `rows`, `state`, `seq`, `epoch`.

    Events (`on`): "change" (change), "snapshot" (rows, info), "state" (state, info).
    """

    def __init__(
        self,
        client: FeedClient,
        room: str,
        filter: str | None,
        snapshot: bool,
        key: KeySpec,
        since: int | None,
        epoch: str | None,
        max_queue: int,
    ) -> None:
        super().__init__()
        self.client = client
        self.requested = room
        self.filter = filter
        self.snapshot = snapshot
        self.key = key
        self.room: str | None = None
        """The canonical room name, from the server's first answer."""
        self.state: State = "pending"
        self.seq: int | None = since
        self.epoch: str | None = epoch
        self.rows: dict[str, Row] | None = {} if snapshot else None
        self.truncated = False
        self.max_queue = max_queue
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._iterated = False  # whether anyone iterates: callbacks alone need no backlog
        self._queueing = True  # False once it overflowed with nobody iterating
        self._waited = 0  # changes waiting when the frame being delivered arrived (`_frame`)
        self._attempt = 0
        self._phase = "idle"  # idle | subscribing | chunks | ready
        self._buffer: list[Change] = []
        self._chunks: dict[str, Any] | None = None
        self._skip_ok = False
        self._skip_upto: int | None = None  # after a snapshot: numbers up to it may be missing
        self._fresh = False
        self._reloading = False
        self._gap_while_subscribing: dict[str, Any] | None = None
        self._left_while_asking: set[str] = set()  # rooms left while the subscribe was on its way
        self._ids: dict[Any, None] = {}
        self._closed = False
        self._error: FeedError | None = None
        self._ever_ready = False
        self._retries = 0
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def _handler_tasks(self) -> set[asyncio.Task[Any]]:
        return self.client._tasks

    # -- the public side -----------------------------------------------------------------------

    async def ready(self) -> Subscription:
        """Wait for the first answer; raise SubscribeError (or ConnectError) when refused."""
        await asyncio.shield(self._ready)
        return self

    async def __aenter__(self) -> Subscription:
        try:
            return await self.ready()
        except asyncio.CancelledError:
            # Given up before the answer (a timeout around `async with`): the block never ran,
            # so `__aexit__` will not, and the subscription would live on in the background.
            # A late answer is then left at once (`_on_ack`).
            with contextlib.suppress(Exception):
                await self.unsubscribe()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with contextlib.suppress(FeedError):
            await self.unsubscribe()

    def __aiter__(self) -> AsyncIterator[Change]:
        self._iterated = True
        self._queueing = True
        return self

    async def __anext__(self) -> Change:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # every later call ends too
            if self._error is not None and not isinstance(self._error, ClosedError):
                raise self._error
            raise StopAsyncIteration
        change: Change = item
        return change

    async def unsubscribe(self) -> None:
        """Stop following the room (and end the iteration)."""
        room = self.room
        was_subscribed = self._ever_ready or self._phase != "idle"
        self._close(ClosedError("closed", "unsubscribed"))
        others = any(s.room == room for s in self.client.subscriptions)
        if room is not None and was_subscribed and self.client.connected and not others:
            try:
                ack = await self.client._leave(room)
            except FeedError as exc:
                if exc.code in ("not_connected", "closed"):
                    # The connection dropped, or the client was closed, before the answer:
                    # either way this client is out of the room (a new connection starts in
                    # none), as was asked.
                    return
                raise
            # `not_subscribed`: the server has this client outside the room already (its
            # subscribe since the last reconnect was refused for now and waits to be retried,
            # or is still on its way; or a reload's snapshot failed and is being asked again):
            # what was asked.
            if not ack.get("ok") and _error_code(ack) != "not_subscribed":
                raise _ack_error(ack, FeedError)

    def reload(self, reason: str = "asked by the application") -> None:
        """Start afresh: subscribe again without `since`, with a new snapshot."""
        self._reload_now(reason, resubscribe=True)

    # -- protocol ------------------------------------------------------------------------------

    def _set_state(self, state: State, **info: Any) -> None:
        self.state = state
        if state == "reload":
            self._reloading = True
        elif state != "pending":
            self._reloading = False
        self._emit("state", state, info)

    async def _send(self) -> None:
        if self._closed:
            return
        # The room as asked, with its filter: the answer names the canonical room anyway.
        request: dict[str, Any] = {"room": self.requested}
        if self.filter:
            request["filter"] = self.filter
        resuming = not self._fresh and self.seq is not None and self.epoch is not None
        if resuming:
            request["since"] = self.seq
            request["epoch"] = self.epoch
        if self.snapshot:
            request["snapshot"] = True
        self._attempt += 1
        attempt = self._attempt
        self._phase = "subscribing"
        self._buffer = []
        self._chunks = None
        self._skip_upto = None
        self._gap_while_subscribing = None
        self._left_while_asking.clear()
        if self.state != "pending":
            self._set_state("pending", resuming=resuming)
        try:
            ack = await self.client._call("subscribe", request)
        except FeedError as exc:
            ack = {"ok": False, "error": {"code": exc.code, "message": exc.message}}
        await self._on_ack(attempt, request, ack)

    async def _on_ack(self, attempt: int, request: dict[str, Any], ack: dict[str, Any]) -> None:
        room = ack.get("room")
        if self._closed and ack.get("ok") and isinstance(room, str):
            if room not in self.client._by_room and self.client.connected:
                # Unsubscribed while the answer was on its way: leave the room we were put in.
                with contextlib.suppress(FeedError):
                    await self.client._leave(room)
            return
        if attempt != self._attempt or self._closed:
            return  # stale: asked again since
        if not ack.get("ok"):
            error = _ack_error(ack, SubscribeError)
            if error.code == "not_connected":
                return  # the next connect subscribes again
            if error.code in RETRYABLE and self.client.connected:
                self._retries += 1
                await asyncio.sleep(min(0.25 * 2**self._retries, 10.0))
                if attempt == self._attempt and self.client.connected:
                    self.client._spawn(self._send())
                return
            self._fail(error)
            return
        self._retries = 0
        if room in self._left_while_asking:
            # This client left the room (another subscription's unsubscribe) while this answer
            # was on its way: the server may have taken us out after putting us in. Ask again.
            self.client._spawn(self._send())
            return
        self.client._unregister(self)
        self.room = str(ack["room"])
        self._buffer = [*self.client._register(self, self.room), *self._buffer]
        # Change ids are kept whatever the epoch: they belong to the source, not to the server
        # run, so a change a restarted server reads again from its source has the id seen before.
        self.epoch = ack.get("epoch")
        seq = int(ack.get("seq", 0))
        if ack.get("recovered") is True:
            self._finish("recovered", replayed=seq - int(request["since"]))
            return
        if ack.get("recovered") is False and not self._reloading:
            self._set_state("reload", reason="the server could not replay what was missed")
        self._fresh = False
        snapshot = ack.get("snapshot")
        if isinstance(snapshot, list):
            chunks = ack.get("snapshot_chunks")
            total = chunks if isinstance(chunks, int) and chunks > 1 else 1
            keys = ack.get("snapshot_keys")  # absent from servers older than snapshot keys
            self._chunks = {
                "rows": list(snapshot),
                "keys": list(keys) if isinstance(keys, list) and _paired(keys, snapshot) else None,
                "next": 2,
                "of": total,
                "seq": seq,
                "truncated": bool(ack.get("snapshot_truncated")),
                "upto": upto if isinstance(upto := ack.get("snapshot_upto"), int) else None,
            }
            if total > 1:
                self._phase = "chunks"
                return
            self._apply_snapshot()
            return
        self.seq = seq
        self._skip_ok = False
        self._skip_upto = None
        self._finish("live")

    def _chunk(self, chunk: dict[str, Any]) -> None:
        if self._phase != "chunks" or self._chunks is None:
            return
        rows = chunk.get("rows")
        if chunk.get("chunk") != self._chunks["next"] or not isinstance(rows, list):
            due = self._chunks["next"]
            self._reload_now(f"snapshot chunk {chunk.get('chunk')} arrived where {due} was due")
            return
        keys = chunk.get("keys")
        if self._chunks["keys"] is not None and _paired(keys, rows):
            self._chunks["keys"].extend(keys)
        else:
            self._chunks["keys"] = None  # not the server's keys for every row: guess them all
        self._chunks["rows"].extend(rows)
        self._chunks["next"] += 1
        if self._chunks["next"] > self._chunks["of"]:
            self._apply_snapshot()

    def _apply_snapshot(self) -> None:
        assert self._chunks is not None
        rows: list[Row] = self._chunks["rows"]
        keys: list[Any] | None = self._chunks["keys"]
        self.seq = self._chunks["seq"]
        upto: int | None = self._chunks["upto"]
        self.truncated = self._chunks["truncated"]
        self._chunks = None
        current: dict[str, Row] = {}
        for index, row in enumerate(rows):
            if keys is not None:  # the server's: exactly the key its changes carry
                key = keys[index] if isinstance(keys[index], str) else None
            else:  # an older server: guess from the row (or the caller's `key`)
                key = row_key(self.key, row) if isinstance(row, dict) else None
            if key is not None and isinstance(row, dict):
                current[key] = row
        self.rows = current
        # Changes the rows already reflect are not sent: numbers up to `snapshot_upto` may be
        # missing, anywhere among them (docs/protocol.md). A server older than that field: the
        # first change alone may jump.
        self._skip_ok = True
        self._skip_upto = upto
        self._emit("snapshot", rows, {"truncated": self.truncated, "rows": self.rows})
        self._finish("live")

    def _finish(self, state: State, **info: Any) -> None:
        self._phase = "ready"
        first = not self._ever_ready
        self._ever_ready = True
        self._set_state(state, **info)
        if first and not self._ready.done():
            self._ready.set_result(None)
        buffered, self._buffer = self._buffer, []
        self._frame()  # what came while the answer or the snapshot was awaited: one frame
        for change in buffered:
            if self._phase != "ready":
                break
            self._receive(change)
        gap, self._gap_while_subscribing = self._gap_while_subscribing, None
        if gap is not None and self._phase == "ready":
            self._gap(gap)

    def _receive(self, change: Change) -> None:
        if self._closed:
            return
        if self._phase != "ready":
            self._buffer.append(change)
            return
        change_id = change.get("id")
        if change_id is not None and change_id in self._ids:
            return
        seq = change.get("seq")
        if isinstance(seq, int) and self.seq is not None:
            if seq <= self.seq:
                return  # already delivered (a resend after a resume)
            if seq != self.seq + 1 and not self._may_skip(seq):
                missed = f"changes {self.seq + 1}..{seq - 1} never arrived"
                if self.snapshot:
                    self._reload_now(missed)
                    return
                self._set_state("reload", reason=missed)
                self._set_state("live")
        if isinstance(seq, int):
            self.seq = seq
        self._skip_ok = False
        if change_id is not None:
            self._ids[change_id] = None
            if len(self._ids) > MAX_IDS:
                del self._ids[next(iter(self._ids))]
        if self.rows is not None:
            apply(self.rows, change)
        self._emit("change", change)
        if not self._queueing:
            return
        waiting = self._waited if self._iterated else self._queue.qsize()
        if waiting >= self.max_queue:
            # The consumer is too slow: drop what waits rather than grow without bound, and say so.
            dropped = self._queue.qsize()
            while not self._queue.empty():
                self._queue.get_nowait()
            self._waited = 0  # the rest of this frame starts a new backlog
            if not self._iterated:
                # Callbacks only, no iteration yet: keep no backlog (an iteration begun later
                # starts with the changes that come after it), and no reload: nobody fell behind.
                self._queueing = False
                return
            self._reload_now(f"the consumer fell behind: {dropped} waiting changes dropped")
            return
        self._queue.put_nowait(change)

    def _may_skip(self, seq: int) -> bool:
        """Whether `seq` may follow a hole: the holes a snapshot leaves are the changes its
        rows reflect, all numbered up to the ack's `snapshot_upto`. They need not come first:
        in commit order a Postgres transaction the snapshot saw as still running can come
        before one it saw committed (a commit is written, then made visible; 9 snapshots in
        200 under four writers), and counting only the first jump made such a snapshot a
        reload ("changes a..b never arrived") with nothing missing."""
        if self._skip_upto is not None:
            return seq <= self._skip_upto + 1
        return self._skip_ok

    def _frame(self) -> None:
        """A frame of changes begins (a `change`, a `changes` batch, or what waited for the
        subscribe's answer and snapshot): an iterating consumer has fallen behind when
        `max_queue` changes waited before it, not when this frame alone is longer.

        The consumer cannot run in the middle of a frame, and a frame may be long whatever
        its pace: the catch-up after a snapshot sends everything the room had meanwhile in one
        (22,000 changes after a 500,000-row snapshot under 300 transactions a second), which
        counted change by change always "fell behind", and the reload's snapshot did the same
        for as long as the writes went on. Memory stays bounded: `max_queue` plus one frame.
        """
        self._waited = self._queue.qsize()

    def _gap(self, gap: dict[str, Any]) -> None:
        if self._phase != "ready":
            self._gap_while_subscribing = gap  # acted on once the answer (and snapshot) is in
            return
        reason = str(gap.get("reason") or "the source may have lost changes")
        if self.snapshot:
            self._reload_now(reason)
            return
        seq, epoch = gap.get("seq"), gap.get("epoch")
        if isinstance(epoch, str) and self.epoch is not None and epoch != self.epoch:
            # The room's numbering began again (a cluster whose Redis lost the history): its
            # next change is `seq + 1` of the new epoch, and a resume must name that epoch.
            self.epoch = epoch
            if isinstance(seq, int):
                self.seq = seq
        elif isinstance(seq, int) and (self.seq is None or seq > self.seq):
            self.seq = seq
        self._set_state("reload", reason=reason)
        self._set_state("live")

    def _reload_now(self, reason: str, resubscribe: bool = False) -> None:
        """Changes were, or may have been, missed: say so, and start afresh where that brings
        the rows back (a fresh snapshot), where asked, or where no answer is in yet. A live
        subscription without a snapshot (its loop fell behind) goes on from its position, and
        keeps it: marked fresh, its next reconnect asked for no replay, and what came while
        disconnected was skipped with no `reload` (states pending -> live)."""
        self._set_state("reload", reason=reason)
        if resubscribe or self.snapshot or self._phase != "ready":
            self._fresh = True
            self._phase = "subscribing"  # nothing more is delivered until the new answer
            if self.client.connected:
                self.client._spawn(self._send())
        else:
            self._set_state("live")

    def _offline(self) -> None:
        if self._closed or self.state == "error":
            return
        if self._phase == "chunks":
            self._fresh = True  # half a snapshot: start again
        self._phase = "idle"
        self._attempt += 1
        self._buffer = []
        self._chunks = None
        self._set_state("pending", reason="disconnected")

    def _fail(self, error: FeedError) -> None:
        if self._closed:
            return
        self._phase = "idle"
        self._set_state("error", code=error.code, message=error.message)
        if not self._ready.done():
            self._ready.set_exception(error)
            self._ready.exception()  # retrieved: `ready()` raises it again for whoever waits
        self._close(error)

    def _close(self, error: FeedError) -> None:
        if self._closed:
            return
        self._closed = True
        self._error = error
        self._attempt += 1
        self._phase = "idle"
        self.client._unregister(self)
        self.client.subscriptions.discard(self)
        if not self._ready.done():
            self._ready.set_exception(error)
            self._ready.exception()
        self._queue.put_nowait(_END)


def _paired(keys: Any, rows: Any) -> bool:
    """Whether `keys` is a key list for `rows` (one per row), as a server with snapshot keys sends."""
    return isinstance(keys, list) and isinstance(rows, list) and len(keys) == len(rows)
