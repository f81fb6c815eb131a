"""A node's pub/sub connection to the cluster's Redis, parsed in the event loop's own callback.

Why not redis-py's `PubSub`: profiled on a node that does not read (2 nodes, one client each,
50 lone changes a second), `get_message` and what it wraps (its retry, timeout and health-check
layers, and the parser's push handling with its logger look-ups) took two thirds of the node's
Python time, against a tenth for routing and sending what it read. Here the bytes Redis sends are
fed to hiredis in `data_received`, the parsed messages queued in that same callback, and the
listener wakes once per read, whatever number of messages the read held.

It does only what a subscriber needs: connect (TCP, TLS or a Unix socket, with the URL's user and
password), SUBSCRIBE, UNSUBSCRIBE, and a PING when the connection has been quiet for a while, so a
Redis that stopped answering is noticed within `quiet + timeout` seconds, not never.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Mapping
from typing import Any

import hiredis

TICK = 0.5
"""Seconds between the listener's looks at its own state when no message comes."""

Message = list[Any]
"""A reply as hiredis parses it: `[b"message", channel, data]`, `[b"subscribe", channel, n]`..."""


def _command(*parts: bytes | str) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


def _tls(options: Mapping[str, Any]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    if str(options.get("ssl_cert_reqs", "required")).lower() in ("none", "optional"):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class Subscriber(asyncio.Protocol):
    """One pub/sub connection: `open` it, `subscribe`, then `read` what arrives."""

    def __init__(self, quiet: float, answer: float) -> None:
        self._parser = hiredis.Reader()
        self._ready: deque[Message] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._transport: asyncio.Transport | None = None
        self._lost: Exception | None = None
        self._quiet = quiet
        self._answer = answer
        self._timer: asyncio.TimerHandle | None = None
        self._heard = 0.0
        self._pinged: float | None = None

    @classmethod
    async def open(cls, url: str, *, answer: float, quiet: float = 5.0) -> Subscriber:
        """Connect and authenticate within `answer` seconds; later, `quiet` seconds without a
        byte from Redis send a PING, and `answer` more without a reply end the connection (the
        next `read` raises)."""
        from redis.asyncio.connection import parse_url

        options = parse_url(url.replace("valkey", "redis", 1) if url.startswith("valkey") else url)
        loop = asyncio.get_running_loop()
        subscriber = cls(quiet, answer)
        async with asyncio.timeout(answer):
            if "path" in options:
                await loop.create_unix_connection(lambda: subscriber, options["path"])
            else:
                tls = _tls(options) if url.startswith(("rediss", "valkeys")) else None
                await loop.create_connection(
                    lambda: subscriber, options.get("host", "localhost"), options.get("port", 6379),
                    ssl=tls,
                )  # fmt: skip
            if options.get("password"):
                user = options.get("username")
                subscriber._send(
                    _command("AUTH", user, options["password"])
                    if user
                    else _command("AUTH", options["password"])
                )
                reply = await subscriber._one()
                if isinstance(reply, hiredis.ReplyError):
                    subscriber.close()
                    raise ConnectionError(f"Redis refused the password: {reply}")
        return subscriber

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        loop = asyncio.get_running_loop()
        self._heard = loop.time()
        self._timer = loop.call_later(TICK, self._tick)

    def data_received(self, data: bytes) -> None:
        self._heard = asyncio.get_running_loop().time()
        self._pinged = None
        parser = self._parser
        parser.feed(data)
        try:
            reply = parser.gets()
            while reply is not False:
                self._ready.append(reply)
                reply = parser.gets()
        except hiredis.ProtocolError as exc:
            self._fail(ConnectionError(f"unreadable reply from Redis: {exc}"))
            return
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"connection to Redis lost: {exc or 'closed by the server'}"))

    # -- what the listener calls -------------------------------------------------------------

    def subscribe(self, *channels: bytes) -> None:
        self._send(_command(b"SUBSCRIBE", *channels))

    def unsubscribe(self, *channels: bytes) -> None:
        if self._lost is None:
            self._send(_command(b"UNSUBSCRIBE", *channels))

    async def read(self) -> list[Message]:
        """Every message received so far, waiting for one if there is none yet. An empty list
        every `TICK` seconds of quiet, so the listener looks at its own state now and then;
        raises ConnectionError once the connection is lost, or silent past `answer` seconds."""
        if not self._ready:
            if self._lost is not None:
                raise self._lost
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
            if not self._ready and self._lost is not None:
                raise self._lost
        messages = list(self._ready)
        self._ready.clear()
        return messages

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._fail(ConnectionError("closed"))

    # -- inside --------------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        if self._lost is not None:
            raise self._lost
        assert self._transport is not None
        self._transport.write(data)

    async def _one(self) -> Any:
        while not self._ready:
            if self._lost is not None:
                raise self._lost
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._ready.popleft()

    def _tick(self) -> None:
        """Every `TICK` seconds (one timer, not one per read): wake the listener, and PING a
        quiet connection or end one whose PING went unanswered."""
        if self._lost is not None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._pinged is not None and now - self._pinged > self._answer:
            self._fail(ConnectionError(f"no answer from Redis in {self._answer:g} s"))
            if self._transport is not None:
                self._transport.abort()
            return
        if self._pinged is None and now - self._heard > self._quiet:
            self._pinged = now
            self._send(_command(b"PING"))
        self._timer = loop.call_later(TICK, self._tick)
        self._wake()

    def _fail(self, exc: Exception) -> None:
        if self._lost is None:
            self._lost = exc
            if self._timer is not None:
                self._timer.cancel()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
