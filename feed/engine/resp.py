"""The engine's own Redis connections on its hot paths, parsed in the event loop's own callback.

Why not redis-py there: profiled on a node that does not read (2 nodes, one client each, 50
lone changes a second), `PubSub.get_message` and what it wraps (its retry, timeout and
health-check layers, and the parser's push handling with its logger look-ups) took two thirds of
the node's Python time, against a tenth for routing and sending what it read; at the reader,
redis-py's `EVALSHA` path (connection pool, retry wrapper, command packing) was two thirds of the
publishing. Here the bytes Redis sends are fed to hiredis in `data_received`, and each reply
handed on in that same callback: no task wakes up per reply but the one that waits for it.

Two connections, on one base that connects (TCP, TLS or a Unix socket, with the URL's user and
password): `Subscriber`, a node's pub/sub connection (feed.engine.delivery), and `Caller`, the
reader's publishing script calls (feed.engine.publisher). Every other command, rarer, goes
through redis-py.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Self

import hiredis

from feed.errors import ClusterError

TICK = 1.0
"""Seconds between a connection's looks at its overdue answers (each `answer` is at least 2 s),
and the pub/sub connection's at its quiet. Each look wakes the process: at 0.5 s they were, with
uvicorn's ten a second, most of an idle node's wake-ups (docs/benchmarks.md)."""

Message = list[Any]
"""A reply as hiredis parses it: `[b"message", channel, data]`, `[b"subscribe", channel, n]`..."""


_pack_command: Callable[[tuple[Any, ...]], bytes] | None = getattr(hiredis, "pack_command", None)
"""hiredis >= 2.1's; older ones (redis-py accepts 1.0) have none."""


class ReplyError(ClusterError):
    """Redis answered a command with an error (a script's `error_reply`, say)."""


def pack(parts: Sequence[bytes | str | int]) -> bytes:
    """One command in RESP: an array of bulk strings (hiredis's packer, in C, where it has one:
    2.3 times faster for a publishing call of five changes)."""
    if _pack_command is not None:
        packed: bytes = _pack_command(tuple(parts))
        return packed
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        if isinstance(part, bytes):
            data = part
        elif isinstance(part, str):
            data = part.encode()
        else:
            data = b"%d" % part
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


PASSWORD_HINT = "put it in the URL: redis://:password@host:6379/0 (or redis://user:password@...)"


def refusal(error: str) -> str:
    """What to tell the operator about an error Redis answered instead of doing the command."""
    if (
        error.startswith("NOAUTH")
        or "must be called with the client already authenticated" in error
    ):
        return f"Redis asks for a password and the URL gives none: {PASSWORD_HINT}"
    return f"Redis refused: {error}"


def _tls(options: Mapping[str, Any]) -> ssl.SSLContext:
    """The TLS context redis-py's own pools use for these options (`?ssl_certfile=`,
    `?ssl_keyfile=`, `?ssl_password=`, `?ssl_ca_certs=`, `?ssl_check_hostname=`...): made by
    redis-py itself, so both kinds of connection a node opens present the same client
    certificate and check the server alike. A context of this module's own read only the CA
    and `ssl_cert_reqs`: a Redis asking for a client certificate took the pools and reset
    these connections ("connection to Redis lost: Connection reset by peer")."""
    from redis.asyncio.connection import SSLConnection

    settings = {k: v for k, v in options.items() if k != "connection_class"}
    context: ssl.SSLContext = SSLConnection(**settings).ssl_context.get()
    return context


class Connection(asyncio.Protocol):
    """A connection to Redis whose replies answer the commands sent, in order (`call`); a reply
    nothing waits for goes to `received` (a pub/sub connection's messages)."""

    _always = False
    """Tick even when no answer is awaited (the pub/sub connection: its PING when quiet)."""

    def __init__(self, answer: float) -> None:
        self._parser = hiredis.Reader()
        self._expected: deque[asyncio.Future[Any]] = deque()
        self._sent: deque[float] = deque()
        """When each expected reply's command went out (one timer checks the oldest, instead
        of a timeout per call)."""
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        """Kept: on Python 3.11 each `asyncio.get_running_loop()` costs a getpid system call,
        and the hot paths here run per message."""
        self._transport: asyncio.Transport | None = None
        self._lost: Exception | None = None
        self._answer = answer

    @classmethod
    async def open(cls, url: str, *, answer: float) -> Self:
        """Connect, sign in and select the URL's database within `answer` seconds (also the
        wait for any later reply)."""
        from redis.asyncio.connection import parse_url

        options = parse_url(url.replace("valkey", "redis", 1) if url.startswith("valkey") else url)
        loop = asyncio.get_running_loop()
        connection = cls(answer)
        try:
            async with asyncio.timeout(answer):
                if "path" in options:
                    await loop.create_unix_connection(lambda: connection, options["path"])
                else:
                    tls = _tls(options) if url.startswith(("rediss", "valkeys")) else None
                    host, port = options.get("host", "localhost"), options.get("port", 6379)
                    await loop.create_connection(lambda: connection, host, port, ssl=tls)
                password = options.get("password")
                if password:
                    user = options.get("username")
                    auth = ["AUTH", user, password] if user else ["AUTH", password]
                    try:
                        await connection.call(auth)
                    except ReplyError as exc:
                        raise ConnectionError(f"Redis refused the password: {exc}") from None
                if options.get("db"):  # scripts touch the URL's database (pub/sub ignores it)
                    await connection.call(["SELECT", options["db"]])
        except BaseException:
            connection.close()  # no half-open connection, nor its timer, left behind
            raise
        return connection

    async def call(self, parts: Sequence[bytes | str | int]) -> Any:
        """Send one command and return its reply (ReplyError for an error reply). Without a
        reply in `answer` seconds the connection is closed (`_tick`): later replies would be
        misread."""
        self._send(pack(parts))
        loop = self._loop
        future = loop.create_future()
        self._expected.append(future)
        self._sent.append(loop.time())
        if self._timer is None:
            self._timer = loop.call_later(TICK, self._tick)
        return await future

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._fail(ConnectionError("closed"))

    @property
    def lost(self) -> bool:
        return self._lost is not None

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        if self._always:
            self._timer = self._loop.call_later(TICK, self._tick)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        parser.feed(data)
        expected = self._expected
        try:
            reply = parser.gets()
            while reply is not False:
                if expected:
                    future = expected.popleft()
                    self._sent.popleft()
                    if not future.done():
                        if isinstance(reply, hiredis.ReplyError):
                            future.set_exception(ReplyError(str(reply)))
                        else:
                            future.set_result(reply)
                elif isinstance(reply, hiredis.ReplyError):
                    # An error no command waits for: Redis refused a SUBSCRIBE or a PING (a
                    # password it asks for, an ACL), and will refuse every retry alike.
                    self._fail(ConnectionError(refusal(str(reply))))
                    return
                else:
                    self.received(reply)
                reply = parser.gets()
        except hiredis.ProtocolError as exc:
            self._fail(ConnectionError(f"unreadable reply from Redis: {exc}"))
            return
        self.heard()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"connection to Redis lost: {exc or 'closed by the server'}"))

    # -- for subclasses ------------------------------------------------------------------------

    def received(self, reply: Any) -> None:
        """A reply no command waits for."""

    def heard(self) -> None:
        """Called after each read from Redis."""

    def _send(self, data: bytes) -> None:
        if self._lost is not None:
            raise self._lost
        assert self._transport is not None
        self._transport.write(data)

    def _awaited_since(self) -> float | None:
        """When the oldest answer still awaited was asked for (None: none is)."""
        return self._sent[0] if self._sent else None

    def _tick(self) -> None:
        """Every `TICK` seconds while an answer is awaited (always, with `_always`): end the
        connection if the oldest answer is overdue."""
        self._timer = None
        if self._lost is not None:
            return
        loop = self._loop
        since = self._awaited_since()
        if since is not None and loop.time() - since > self._answer:
            self._fail(ConnectionError(f"no answer from Redis in {self._answer:g} s"))
            return
        if since is not None or self._always:
            self._timer = loop.call_later(TICK, self._tick)

    def _fail(self, exc: Exception) -> None:
        if self._lost is None:
            self._lost = exc
            if self._transport is not None:
                self._transport.abort()
            if self._timer is not None:
                self._timer.cancel()
        self._sent.clear()
        while self._expected:
            future = self._expected.popleft()
            if not future.done():
                future.set_exception(exc)


class Subscriber(Connection):
    """A node's pub/sub connection: `open` it, `subscribe`, then `read` what arrives. A PING
    goes out when it has been quiet for `QUIET` seconds, so a Redis that stopped answering is
    noticed within `QUIET + answer` seconds, not never.

    A message `direct` takes is handled in the read callback itself, and `read` never returns
    it: the common message (a room's next changes) then costs no task wake-up, which was about a
    sixth of a node's CPU per change when it relays a few changes per message.
    """

    QUIET = 5.0
    _always = True

    def __init__(self, answer: float) -> None:
        super().__init__(answer)
        self._ready: deque[Message] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._heard = 0.0
        self._pinged: float | None = None
        self.direct: Callable[[Message], bool] | None = None
        """Handles a message at once when it can (True), in the read callback. Offered one only
        while nothing waits to be read and `busy` is off, so messages never pass one another."""
        self.direct_done: Callable[[], None] | None = None
        """Called after a read from Redis in which `direct` took messages (to send them)."""
        self.busy = False
        """Set by the reader of `read` while it handles what it read (it may await meanwhile)."""
        self._took = False

    def subscribe(self, *channels: bytes) -> None:
        self._send(pack([b"SUBSCRIBE", *channels]))

    def unsubscribe(self, *channels: bytes) -> None:
        self._send(pack([b"UNSUBSCRIBE", *channels]))

    async def read(self) -> list[Message]:
        """Every message received so far, waiting for one if there is none yet. An empty list
        every `TICK` seconds of quiet, so the listener looks at its own state now and then;
        raises ConnectionError once the connection is lost, or silent past `answer` seconds."""
        if not self._ready:
            if self._lost is not None:
                raise self._lost
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
            if not self._ready and self._lost is not None:
                raise self._lost
        messages = list(self._ready)
        self._ready.clear()
        return messages

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._heard = self._loop.time()

    def received(self, reply: Any) -> None:
        direct = self.direct
        if direct is not None and not self._ready and not self.busy and direct(reply):
            self._took = True
            return
        self._ready.append(reply)

    def heard(self) -> None:
        self._heard = self._loop.time()
        self._pinged = None
        if self._took:
            self._took = False
            if self.direct_done is not None:
                self.direct_done()
        if self._ready:
            self.wake()

    def _awaited_since(self) -> float | None:
        """The PING's time too: any byte from Redis answers it (`heard`)."""
        since = super()._awaited_since()
        if self._pinged is None or (since is not None and since < self._pinged):
            return since
        return self._pinged

    def _tick(self) -> None:
        """Also wake the listener, and PING a quiet connection (an unanswered PING ends it)."""
        super()._tick()
        if self._lost is not None:
            return
        now = self._loop.time()
        if self._pinged is None and now - self._heard > self.QUIET:
            self._pinged = now
            self._send(pack([b"PING"]))
        self.wake()

    def _fail(self, exc: Exception) -> None:
        super()._fail(exc)
        self.wake()

    def wake(self) -> None:
        """End a `read` that waits (an empty list) so its caller looks at its own state."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Caller(Connection):
    """The reader's connection for its publishing script: EVALSHA, loading the script the first
    time Redis does not know it (after a restart, say)."""

    async def script(self, source: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        sha = _sha(source)
        try:
            return await self.call([b"EVALSHA", sha, len(keys), *keys, *args])
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await self.call([b"SCRIPT", b"LOAD", source])
        return await self.call([b"EVALSHA", sha, len(keys), *keys, *args])


_shas: dict[str, bytes] = {}


def _sha(source: str) -> bytes:
    sha = _shas.get(source)
    if sha is None:
        sha = _shas[source] = hashlib.sha1(source.encode()).hexdigest().encode()
    return sha
