"""The ASGI application: Socket.IO for clients, plain HTTP beside it, the hub behind both.

The hub lives for the ASGI lifespan, so uvicorn's graceful shutdown on SIGTERM stops the
connectors (saving their positions) and disconnects the clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import socketio
import uvicorn
from socketio.exceptions import ConnectionRefusedError as Refused

from connectors.base import Connector
from feed.app.config import Config
from feed.app.http import HttpApp
from feed.app.status import generic, generic_catalog
from feed.core.filters import parse_filter
from feed.delivery.eio_websocket import FeedSocketIO
from feed.delivery.manager import IndexedManager
from feed.delivery.protocol import SubscribeRequest, error_ack, unsubscribe_room
from feed.delivery.transport import SocketIOTransport
from feed.errors import ConfigError, ProtocolError
from feed.metrics import Labels
from feed.routing.hub import Hub
from feed.security.access import Authorizer
from feed.security.addresses import BalancerWarning, client_address
from feed.security.auth import (
    Authenticator,
    AuthError,
    Identity,
    check_exposure,
    is_loopback,
    seconds_left,
)
from feed.security.guard import (
    ClientErrors,
    ConnectionGuard,
    InboundLimit,
    guarded_http_protocol,
    quiet_counted_client_faults,
)
from feed.security.hosts import (
    HostCheck,
    default_allowed_hosts,
    say_default_hosts,
    warn_open_to_pages,
)
from feed.security.limits import ConnectionCounter, OutboundLimiter, TokenBucket
from feed.security.redact import redact_session_ids, token_in_url
from feed.security.room_budget import RoomBudget

log = logging.getLogger("feed.server")

SOCKETIO_LOG = logging.getLogger("feed.socketio")
ENGINEIO_LOG = logging.getLogger("feed.engineio")
for _library_log in (SOCKETIO_LOG, ENGINEIO_LOG):
    # Their INFO lines are per packet; what matters of their errors is reported by
    # feed.security.guard.
    _library_log.setLevel(logging.ERROR)

FLOOD_STRIKES = 100
"""Requests refused in a row before a client that keeps sending is disconnected: each still
costs the node a decode and an answer, and delays every other client's changes."""

SNAPSHOT_FAILED = "the snapshot could not be read right now; retry later"
"""What a `snapshot_failed` says to a client that is not an operator (feed.app.status)."""

EXPIRY_GRACE = 2.0
"""Seconds an expired client has to leave by itself before its connection is dropped."""

REFUSED_GRACE = 1.0
"""Seconds a session refused at `connections_per_address` is kept for its refusal to reach the
client (a long-polling client reads it with its next poll) before it is closed."""


@dataclass
class Session:
    """What the server knows about one connected client besides its rooms."""

    identity: Identity
    bucket: TokenBucket
    expiry: asyncio.TimerHandle | None = None
    address: str | None = None
    """The client address an anonymous connection is counted under (`connections_per_address`)."""
    refused: int = 0
    """Requests refused `rate_limited` since the last one taken: a client that ignores the
    answer for `FLOOD_STRIKES` of them is flooding, and its connection is ended."""


def _task_gauge() -> Iterator[tuple[str, Labels, float]]:
    """Read at scrape time: a count that climbs while clients come and go is a task leak (a
    catch-up, a snapshot or a timer left behind by a client that left), which `python -m
    bench.soak` watches for."""
    yield "feed_tasks", (), float(len(asyncio.all_tasks()))


class FeedApp:
    """Everything `feed serve` runs, built from a config; `asgi` is what uvicorn serves."""

    def __init__(
        self, config: Config, connectors: list[Connector] | None = None, host: str | None = None
    ) -> None:
        self.config = config
        settings = config.server
        try:
            check_exposure(config.auth, host or settings.host)
        except ConfigError as exc:  # the fix is in the file: name it, as every config error does
            raise exc.located(config.path) from None
        self.authenticator = Authenticator(config.auth)
        self.authorizer = Authorizer(config.auth)
        self.sessions: dict[str, Session] = {}
        self._handshakes: dict[str, asyncio.TimerHandle] = {}
        """The handshake-timeout check of each Engine.IO session not yet connected."""
        self.connections = ConnectionCounter(config.limits.connections_per_identity)
        self.addresses = ConnectionCounter(config.limits.connections_per_address)
        """Anonymous connections per client address (feed.security.addresses)."""
        self._warn_balancer = BalancerWarning()
        self.hub = Hub(connectors or config.build_connectors(), settings)
        limits = config.limits
        self.hub.budget = RoomBudget(
            limits.rooms_per_identity, limits.max_rooms, limits.idle_rooms_per_identity
        )
        self.hub.announce_status = self._announce_status
        self.sio = FeedSocketIO(
            client_manager=IndexedManager(),  # a disconnect costs the client's own rooms
            async_mode="asgi",
            cors_allowed_origins=settings.cors_allowed_origins or None,
            max_http_buffer_size=settings.max_message_bytes,
            ping_interval=settings.ping_interval,
            ping_timeout=settings.ping_timeout,
            # Their own loggers, through the feed's logging once (with False each library adds
            # a handler of its own, and every line it logs was printed twice).
            logger=SOCKETIO_LOG,
            engineio_logger=ENGINEIO_LOG,
        )
        self.hub.transport = SocketIOTransport(self.sio)
        if config.cluster is not None:
            from feed.engine.redis import RedisEngine

            self.hub.engine = RedisEngine(config.cluster, self.hub)
        self.outbound = OutboundLimiter(
            self.sio, config.limits.outbound_queue_bytes, on_cut=self._cut_off
        )
        self._describe_metrics()
        self._register_handlers()
        limits = config.limits
        self.client_errors = ClientErrors(self.hub.metrics)
        quiet_counted_client_faults()
        self.guard = ConnectionGuard(
            self.hub.metrics, self.client_errors, limits.request_timeout, limits.max_connections
        )
        eio = self.sio.eio
        eio.on_malformed = self._malformed
        eio.on_open = self._opened
        eio.refuse_open = self._refuse_open
        allowed_hosts = settings.allowed_hosts
        if allowed_hosts is None:
            allowed_hosts = list(default_allowed_hosts(config.auth.enabled))
            say_default_hosts(config.auth.enabled, is_loopback(host or settings.host))
        warn_open_to_pages(config.auth.enabled, settings.cors_allowed_origins, allowed_hosts)
        self.asgi = HostCheck(
            InboundLimit(
                socketio.ASGIApp(
                    self.sio,
                    other_asgi_app=HttpApp(
                        self.hub,
                        dashboard=settings.dashboard,
                        status_access=self._status_access if config.auth.protect_status else None,
                    ),
                    on_startup=self._startup,
                    on_shutdown=self._shutdown,
                ),
                settings.max_message_bytes,
                self.client_errors,
                self._close_session,
            ),
            allowed_hosts,
            self.client_errors,
        )

    def uvicorn_config(self, host: str, port: int, **options: Any) -> FeedConfig:
        """How uvicorn must serve this app: the guarded HTTP protocol (header timeout and
        connection cap, feed.security.guard) and the inbound message limit on websockets too.

        uvicorn's own WebSocket pings are off: Engine.IO already pings every client and closes
        those whose pong is late (feed.delivery.eio_websocket, one ticker for all of them), and
        uvicorn's keepalive keeps a timer per connection in the event loop's heap (a thousand
        timers at a thousand clients, each one making every timer the loop sets cost more)."""
        options.setdefault("lifespan", "on")
        options.setdefault("ws_ping_interval", None)
        # `server: uvicorn` on every answer tells a scanner what to try; nobody else reads it.
        options.setdefault("server_header", False)
        config = FeedConfig(
            self,
            self.asgi,
            host=host,
            port=port,
            http=guarded_http_protocol(self.guard),
            ws_max_size=self.config.server.max_message_bytes,
            **options,
        )
        redact_session_ids()  # after uvicorn's Config has set its loggers up
        return config

    async def _status_access(self, authorization: str | None) -> bool:
        """`[auth] protect_status`: /metrics and /readyz's details for a request bearing the
        token of an operator (a static token or JWT with one of `operator_roles`)."""
        if authorization is None:
            return False
        try:
            identity = await self.authenticator.authenticate({"token": authorization})
        except AuthError as exc:
            self.hub.metrics.inc("feed_auth_refused_total", code=exc.code)
            return False
        return not identity.anonymous and self.config.auth.operator(identity)

    def _malformed(self, eio_sid: str, kind: str, detail: str) -> None:
        self.client_errors.report(kind, detail)

    def _close_session(self, eio_sid: str) -> None:
        if eio_sid in self.sio.eio.sockets:
            self.outbound.close_soon(eio_sid)

    def _refuse_open(self) -> str | None:
        """A new Engine.IO session, past `[limits] max_handshakes` sessions that have not
        connected yet, is refused: opening one costs a client no token and, over long-polling,
        no connection (one client held 20,000 for their `handshake_timeout`, 280 MB)."""
        limit = self.config.limits.max_handshakes
        if len(self._handshakes) < limit:
            return None
        self.client_errors.report(
            "too_many_handshakes",
            f"{limit} sessions have not made their Socket.IO connect yet ([limits] max_handshakes)",
        )
        return "too many sessions are waiting for their handshake; retry shortly"

    def _opened(self, eio_sid: str) -> None:
        """An Engine.IO session must complete its Socket.IO connect in time, or it is closed:
        an open session that never connects holds a descriptor and is never authenticated.
        Also called for a session whose client disconnected from the namespace (`41`) and
        kept the session: it must connect again in as long."""

        def check() -> None:
            self._handshakes.pop(eio_sid, None)
            if (
                eio_sid in self.sio.eio.sockets
                and self.sio.manager.sid_from_eio_sid(eio_sid, "/") is None
            ):
                self.client_errors.report(
                    "handshake_timeout",
                    f"no Socket.IO connect within {self.config.limits.handshake_timeout:g} s",
                )
                self.outbound.close_soon(eio_sid)

        # Cancelled by the connect (on_connect), so that a server with many clients does not
        # carry a timer per client in the loop's heap for the first seconds of each.
        earlier = self._handshakes.pop(eio_sid, None)
        if earlier is not None:
            earlier.cancel()
        loop = asyncio.get_running_loop()
        self._handshakes[eio_sid] = loop.call_later(self.config.limits.handshake_timeout, check)

    async def _startup(self) -> None:
        await self.hub.__aenter__()
        # Everything alive now (modules, the app, the connectors) lives as long as the process:
        # moved out of the collector's reach, it no longer makes every full collection pause
        # the loop (about 40 ms for a full collection of the loaded modules on these machines,
        # straight into the latency tail).
        gc.collect()
        gc.freeze()
        log.info("feed serving %d connector(s)", len(self.hub.connectors))

    async def _shutdown(self) -> None:
        await self.hub.__aexit__(None, None, None)
        await self.sio.shutdown()  # stops Engine.IO's pinger

    def _register_handlers(self) -> None:
        for event, handler in {
            "connect": self.on_connect,
            "disconnect": self.on_disconnect,
            "subscribe": self.on_subscribe,
            "unsubscribe": self.on_unsubscribe,
            "catalog": self.on_catalog,
            "refresh": self.on_refresh,
            "*": self.on_unknown,
        }.items():
            self.sio.on(event, handler)

    async def on_connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> bool:
        """Authenticate from the auth payload; a refusal carries `{"code": ...}` and a message."""
        try:
            identity = await self.authenticator.authenticate(auth)
            if not self._still_open(sid):
                # The session closed while the token was checked (a JWKS fetch): its
                # disconnect came while this connect was pending and ran no handler, so
                # whatever is counted now would never be given back.
                return False
            address = self._admit_address(sid, environ) if identity.anonymous else None
            if not identity.anonymous and not self.connections.admit(identity.account):
                raise AuthError(
                    "too_many_connections",
                    f"{identity.name!r} already holds {self.connections.limit} connections",
                )
        except AuthError as exc:
            message = exc.message
            if exc.code == "auth_required" and token_in_url(environ.get("QUERY_STRING", "")):
                # A client written for a server that reads the token from the URL.
                message += (
                    "; a token in the URL is not read (URLs end up in logs): "
                    "send it in the auth payload"
                )
            self.hub.metrics.inc("feed_auth_refused_total", code=exc.code)
            log.info("connection refused (%s): %s", exc.code, message)
            raise Refused(message, {"code": exc.code}) from None
        handshake = self._handshakes.pop(self.sio.manager.eio_sid_from_sid(sid, "/") or "", None)
        if handshake is not None:
            handshake.cancel()
        limits = self.config.limits
        session = Session(
            identity, TokenBucket(limits.subscribe_rate, limits.subscribe_burst), address=address
        )
        self.sessions[sid] = session
        self._schedule_expiry(sid, session)
        self.hub.connect(sid)
        return True

    def _still_open(self, sid: str) -> bool:
        """Whether the Engine.IO session of a connect being handled is still open."""
        eio_sid = self.sio.manager.eio_sid_from_sid(sid, "/")
        socket = self.sio.eio.sockets.get(eio_sid) if eio_sid is not None else None
        return socket is not None and not socket.closed

    async def on_disconnect(self, sid: str, *reason: Any) -> None:
        session = self.sessions.pop(sid, None)
        if session is not None:
            if session.expiry is not None:
                session.expiry.cancel()
            if not session.identity.anonymous:
                self.connections.release(session.identity.account)
            if session.address is not None:
                self.addresses.release(session.address)
        self.hub.disconnect(sid)

    def _admit_address(self, sid: str, environ: dict[str, Any]) -> str | None:
        """Count an anonymous connection under its client address, or refuse it past
        `[limits] connections_per_address` (`too_many_connections`, which the client libraries
        retry with backoff). Authenticated connections are bounded per identity instead: the
        users of an office behind one address must not share one allowance.

        The refusal is counted and logged at most once per interval (feed.security.guard's
        ClientErrors), not a line per connection: the client it stops is one that connects
        without end. Its session is closed a moment later and no longer counts toward
        `max_handshakes`: left for its `handshake_timeout`, the refused sessions of one client
        filled the 1,000 places and every other new client got 503/403 meanwhile.
        The key is what the connection is counted under; None: not counted."""
        address = client_address(environ)
        if address.balancer is not None:
            self._warn_balancer(address.balancer)
        key = address.key
        if key is None or self.addresses.admit(key):
            return key
        limit = self.addresses.limit
        self.hub.metrics.inc("feed_auth_refused_total", code="too_many_connections")
        self.client_errors.report(
            "too_many_from_address",
            f"{key} already holds {limit} anonymous connections ([limits] "
            "connections_per_address; if that is your balancer's address, it must set "
            "X-Forwarded-For and be in FORWARDED_ALLOW_IPS)",
        )
        self._close_refused(sid)
        raise Refused(
            f"{key} already holds {limit} connections, the most one address may; retry later",
            {"code": "too_many_connections"},
        )

    def _close_refused(self, sid: str) -> None:
        """Close a refused session after `REFUSED_GRACE`, unless it has connected since (a
        client may send its connect again on the same session, and be let in)."""
        eio_sid = self.sio.manager.eio_sid_from_sid(sid, "/")
        if eio_sid is None:
            return
        handshake = self._handshakes.pop(eio_sid, None)
        if handshake is not None:
            handshake.cancel()

        def close() -> None:
            if self.sio.manager.sid_from_eio_sid(eio_sid, "/") is None:
                self.outbound.close_soon(eio_sid)

        asyncio.get_running_loop().call_later(REFUSED_GRACE, close)

    def _schedule_expiry(self, sid: str, session: Session) -> None:
        """End the connection when its token expires, unless a `refresh` comes first."""
        if session.expiry is not None:
            session.expiry.cancel()
            session.expiry = None
        left = seconds_left(session.identity)
        if left is not None:
            loop = asyncio.get_running_loop()
            session.expiry = loop.call_later(left, lambda: self.hub._spawn(self._expire(sid)))

    async def _expire(self, sid: str) -> None:
        if sid not in self.sessions:
            return
        self.hub.metrics.inc("feed_auth_expired_total")
        eio_sid = self.sio.manager.eio_sid_from_sid(sid, "/")
        try:
            await self.sio.emit(
                "auth_expired",
                {"code": "token_expired", "message": "the token expired; reconnect with a new one"},
                to=sid,
            )
            await self.sio.disconnect(sid)
        finally:
            if sid in self.sessions:
                await self.on_disconnect(sid)
            # Socket.IO's disconnect only asks the client to leave; a client that ignores it
            # loses its connection anyway once the notice has had time to go out.
            if eio_sid is not None:
                self.outbound.close_soon(eio_sid, delay=EXPIRY_GRACE)

    def _cut_off(self, eio_sid: str) -> None:
        self.hub.metrics.inc("feed_slow_clients_cut_total")

    def _describe_metrics(self) -> None:
        m = self.hub.metrics
        m.describe("feed_auth_refused_total", "counter", "Connections refused, by reason")
        m.describe("feed_auth_expired_total", "counter", "Connections ended by token expiry")
        m.describe("feed_slow_clients_cut_total", "counter", "Clients cut off for not reading")
        m.counter("feed_slow_clients_cut_total")  # 0 from the start, for `increase()` (hub.py)
        m.describe("feed_tasks", "gauge", "asyncio tasks alive in the server process")
        m.gauges(_task_gauge)

    def _session(self, sid: str) -> Session:
        session = self.sessions.get(sid)
        if session is None:
            raise ProtocolError("not_connected", "this connection is closing")
        if not session.bucket.take():
            session.refused += 1
            if session.refused == FLOOD_STRIKES:
                eio_sid = self.sio.manager.eio_sid_from_sid(sid, "/")
                if eio_sid is not None:
                    self.sio.eio.report_malformed(
                        eio_sid, "flood", f"{FLOOD_STRIKES} requests refused rate_limited in a row"
                    )
                    self.outbound.close_soon(eio_sid)
            raise ProtocolError("rate_limited", "too many requests; slow down and retry")
        session.refused = 0
        return session

    async def on_subscribe(self, sid: str, *args: Any) -> dict[str, Any]:
        settings = self.config.server

        async def handle() -> dict[str, Any]:
            session = self._session(sid)
            request = SubscribeRequest.from_payload(
                args[0] if args else None,
                max_room=settings.max_room_length,
                max_filter=settings.max_filter_length,
            )
            request = self.hub.split_room_filter(request)
            try:
                connector, address = self.hub.resolve(request.room)
            except ProtocolError as exc:
                raise self._unknown_room(exc, session.identity, request.room) from None
            client_filter = (
                parse_filter(request.filter, max_length=settings.max_filter_length)
                if request.filter
                else None
            )
            shape = self.authorizer.grant(
                session.identity,
                connector.name,
                address,
                client_filter,
                connector.inner_prefix(address.target) if address.key is None else None,
            )
            try:
                identity = session.identity
                return await self.hub.subscribe(
                    sid,
                    request,
                    shape=shape,
                    owner=identity.account,
                    # Anonymous clients share one identity: their snapshots take turns per
                    # connection, or one of them would make all the others wait.
                    turn=None if identity.anonymous else identity.account,
                )
            except ProtocolError as exc:
                if exc.code != "snapshot_failed" or self.config.auth.operator(session.identity):
                    raise
                # Its message is the driver's error, or names the reading node: hosts,
                # databases and roles, which only operators see (as in `status`).
                log.info("snapshot of %s failed: %s", request.room[:128], exc.message)
                raise ProtocolError("snapshot_failed", SNAPSHOT_FAILED) from None

        return await self._answer("subscribe", handle)

    def _unknown_room(self, exc: ProtocolError, identity: Identity, room: str) -> ProtocolError:
        """A room that names no connector or target, explained with only what this identity
        may see: the hub's message lists every connector and target, and a tenant learnt the
        names the catalog hides from it (other tenants' tables, an audit log)."""
        if self.authorizer.open or exc.code not in ("unknown_connector", "unknown_target"):
            return exc
        name, _, rest = room.partition(":")

        def visible(connector: Connector) -> list[str]:
            return [
                target
                for target in connector.targets()
                if self.authorizer.visible_target(identity, connector.name, target)
            ]

        if exc.code == "unknown_connector":
            known = ", ".join(sorted(c.name for c in self.hub.connectors.values() if visible(c)))
            return ProtocolError(
                exc.code,
                f"no connector {name[:64]!r}; rooms look like <connector>:<target> "
                f"(connectors: {known or 'none you may follow'})",
            )
        connector = self.hub.connectors[name]
        targets = ", ".join(visible(connector)[:20])
        return ProtocolError(
            exc.code,
            f"{name!r} has no target for {rest[:128]!r} (targets: {targets or 'none you may follow'})",
        )

    async def on_unsubscribe(self, sid: str, *args: Any) -> dict[str, Any]:
        async def handle() -> dict[str, Any]:
            self._session(sid)
            payload = args[0] if args else None
            room = unsubscribe_room(payload, max_room=self.config.server.max_room_length)
            return self.hub.unsubscribe(sid, room)

        return await self._answer("unsubscribe", handle)

    async def on_catalog(self, sid: str, *args: Any) -> dict[str, Any]:
        async def handle() -> dict[str, Any]:
            session = self._session(sid)
            catalog = self.authorizer.catalog(session.identity, self.hub.catalog())
            if not self.config.auth.operator(session.identity):
                catalog = generic_catalog(catalog)
            return catalog

        return await self._answer("catalog", handle)

    async def _announce_status(self, body: dict[str, Any]) -> None:
        """A connector's status change: the detail to operators, a generic line to the rest."""
        transport = self.hub.transport
        if transport is None:
            return
        plain = generic(body)
        connector = self.hub.connectors.get(str(body.get("connector")))
        targets = connector.targets() if connector is not None else []
        for sid, session in list(self.sessions.items()):
            operator = self.config.auth.operator(session.identity)
            if not operator and not any(
                self.authorizer.visible_target(session.identity, str(body["connector"]), target)
                for target in targets
            ):
                continue  # a connector the catalog does not show it: not even its name
            await transport.send_to(sid, "status", body if operator else plain)

    async def on_refresh(self, sid: str, *args: Any) -> dict[str, Any]:
        """Swap in a fresh token before the current one expires, keeping the subscriptions."""

        async def handle() -> dict[str, Any]:
            session = self._session(sid)
            payload = args[0] if args else None
            if not isinstance(payload, dict) or "token" not in payload:
                raise ProtocolError("bad_request", 'refresh takes {"token": "<the new token>"}')
            try:
                identity = await self.authenticator.authenticate(payload)
            except AuthError as exc:
                raise ProtocolError(exc.code, exc.message) from None
            if not identity.same_grants(session.identity, self.config.auth.granting_claims):
                raise ProtocolError(
                    "identity_changed",
                    "the new token grants different access; reconnect with it instead",
                )
            session.identity = identity
            self._schedule_expiry(sid, session)
            return {"ok": True, "expires_in": seconds_left(identity)}

        return await self._answer("refresh", handle)

    async def on_unknown(self, event: str, sid: str, *args: Any) -> dict[str, Any]:
        async def handle() -> dict[str, Any]:
            self._session(sid)  # an unknown event costs a request like any other
            raise ProtocolError("unknown_event", f"no event {str(event)[:64]!r}")

        return await self._answer("unknown", handle)

    async def _answer(self, event: str, handle: Any) -> dict[str, Any]:
        """Run a request; a client's mistake becomes an error ack, a bug an `internal` one."""
        try:
            result: dict[str, Any] = await handle()
            return result
        except ProtocolError as exc:
            self.hub.metrics.inc("feed_errors_total", code=exc.code)
            return error_ack(exc)
        except Exception:
            log.exception("%s failed", event)
            self.hub.metrics.inc("feed_errors_total", code="internal")
            return error_ack(ProtocolError("internal", "the server failed to handle this request"))


class FeedConfig(uvicorn.Config):
    """uvicorn's config, knowing the FeedApp it serves (for `FeedServer`'s shutdown)."""

    def __init__(self, feed: FeedApp, app: Any, **options: Any) -> None:
        super().__init__(app, **options)
        self.feed = feed


class FeedServer(uvicorn.Server):
    """uvicorn ending the feed's long polls when it starts to shut down.

    uvicorn's graceful shutdown waits (10 s in `feed serve`) for running requests, and a
    long-polling client always has one: its poll, which waits for data up to the ping interval.
    Websockets are closed at once, so only polling clients held a restart for the full 10 s and
    learnt of it last. Their sessions end first, which answers the waiting polls.

    Its main loop ticks once a second instead of uvicorn's ten: each tick woke an idle process
    for 0.1 to 0.2 ms on a 2-core machine of the kind we benchmark on, 30 to 57% of an idle
    node's CPU, paid again by every node of a cluster (docs/benchmarks.md). What the ticks were
    for stays: the Date header still changes every second (uvicorn renews it on every tenth
    count, and this loop counts in tens), and `should_exit`, set by a signal or by whoever
    embeds the server, wakes the loop at once instead of at its next tick.
    """

    TICK = 1.0
    _wake: asyncio.Future[None] | None = None

    @property
    def should_exit(self) -> bool:
        return self._should_exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._should_exit = value
        if value:
            self._tick_now()

    def _tick_now(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def main_loop(self) -> None:
        loop = asyncio.get_running_loop()
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 10) % 864000
            self._wake = loop.create_future()
            timer = loop.call_later(self.TICK, self._tick_now)
            try:
                await self._wake
            finally:
                timer.cancel()
                self._wake = None
            should_exit = await self.on_tick(counter)

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        if isinstance(self.config, FeedConfig):
            ended = await self.config.feed.sio.eio.end_polling()
            if ended:
                log.info("shutdown: ended %d long-polling session(s)", ended)
        # uvicorn closes every connection with a close frame of its own, and its websockets
        # protocol raises InvalidState for one whose close handshake has begun (a client that
        # said goodbye in the same loop pass), which ended the shutdown there, with a traceback.
        for connection in list(self.server_state.connections):
            shut = functools.partial(_shut, connection, connection.shutdown)
            connection.shutdown = shut  # type: ignore[method-assign]  # this one object's
        await super().shutdown(sockets)
        # A second Ctrl-C (uvicorn's force_exit) skipped the application's shutdown: the hub's
        # connectors were never stopped (a cluster node kept its leases, which others then
        # waited out), and the pending lifespan task was cancelled at exit with an ERROR and a
        # traceback. The wait for open requests is what a second Ctrl-C cuts short; the hub's
        # stop is bounded already (5 s per connector, docs/operations.md), so it still runs.
        lifespan = getattr(self, "lifespan", None)
        done = getattr(lifespan, "shutdown_event", None)
        if self.force_exit and lifespan is not None and done is not None and not done.is_set():
            log.warning(
                "second Ctrl-C: not waiting for open requests; stopping the connectors "
                "(at most 5 s each)"
            )
            await lifespan.shutdown()


def _shut(connection: Any, shutdown: Callable[[], None]) -> None:
    """A connection's shutdown at the server's: one that fails (already closing) is closed."""
    try:
        shutdown()
    except Exception as exc:
        log.debug("shutdown: a connection already closing (%s)", exc)
        transport = getattr(connection, "transport", None)
        if transport is not None:
            transport.close()


class QuietServer(FeedServer):
    """uvicorn without its own signal handling, for embedding: the caller decides how to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
