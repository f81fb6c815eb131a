"""Run the real feed app under uvicorn on a free port, and talk to it over real Socket.IO."""

from __future__ import annotations

import asyncio
import os
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import socketio
import uvicorn

from feed.app.config import parse_config
from feed.app.server import FeedApp, QuietServer
from feed.engine.redis import RedisEngine
from feed.routing.hub import Hub

WAIT = 10.0
PORT_TRIES = 5
"""Ports a child process is given in turn when the one picked is taken before the child binds it."""
T = TypeVar("T")


class PortTaken(AssertionError):
    """A child process could not listen: another process holds the port it was told."""


async def http_get(url: str) -> tuple[int, str]:
    """GET a URL of the feed (/healthz, /readyz, /metrics): its status and body, errors too."""

    def fetch() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    return await asyncio.to_thread(fetch)


async def read_answer(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    """One HTTP answer read off a raw connection: its status line, its headers (names in lower
    case, a repeated one's values joined, as HTTP reads it) and its body."""
    async with asyncio.timeout(5):
        status = (await reader.readline()).decode("latin-1").strip()
        headers: dict[str, str] = {}
        while line := (await reader.readline()).decode("latin-1").strip():
            name, _, value = line.partition(":")
            name = name.strip().lower()
            headers[name] = ", ".join(filter(None, (headers.get(name), value.strip())))
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while size := int((await reader.readline()).strip(), 16):
                body += await reader.readexactly(size + 2)
                body = body[:-2]
        else:
            body = b""
    return status, headers, body


def free_port() -> int:
    """A port free a moment ago, for a child process that must be told one (`--port`).

    Another process may take it before the child binds it: such callers retry on "address
    already in use" (tests/support/cluster.py's FeedNode). A server run in this process takes
    a `listening_socket` instead, which has no such race.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def on_free_port(start: Callable[[int], Awaitable[T]]) -> T:
    """`start(port)` on a `free_port`, and again on a fresh one when it raises PortTaken
    (another process took the port before the child bound it), PORT_TRIES times in all."""
    for attempt in range(1, PORT_TRIES + 1):
        try:
            return await start(free_port())
        except PortTaken as exc:
            if attempt == PORT_TRIES:
                raise PortTaken(f"{exc} (the last of {PORT_TRIES} ports tried)") from None
    raise AssertionError("unreachable")


def listening_socket() -> socket.socket:
    """A socket already listening on a port the kernel chose: handed to uvicorn (`sockets=`),
    it serves the port it holds, so no other process can take the port between picking it and
    binding it (which free_port leaves open, and which failed tests on a busy machine).

    IPPROTO_TCP spelled out, as uvicorn's own bind has it: asyncio turns Nagle's algorithm off
    (TCP_NODELAY) only on connections whose socket says TCP, and with it on a poll answer's
    head and body wait for an ACK between them, unlike in production.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def port_of(sock: socket.socket) -> int:
    port: int = sock.getsockname()[1]
    return port


@dataclass
class RunningFeed:
    url: str
    app: FeedApp
    server: uvicorn.Server

    @property
    def hub(self) -> Hub:
        return self.app.hub

    @property
    def engine(self) -> RedisEngine:
        """The node's cluster engine, for tests that look inside it (leases, rooms, mirrors).

        The hub knows it only as its Engine protocol, which has none of those; a test that asks for
        it runs the feed with a [cluster] table, so the engine is a RedisEngine.
        """
        engine = self.hub.engine
        assert isinstance(engine, RedisEngine), "this feed runs without a [cluster] engine"
        return engine


@asynccontextmanager
async def running_feed(
    config_toml: str, env: dict[str, str] | None = None
) -> AsyncIterator[RunningFeed]:
    """Start the app from a config text (no [server] port needed) and stop it afterwards."""
    config = parse_config(config_toml, "test.toml", {**os.environ, **(env or {})})
    app = FeedApp(config)
    sock = listening_socket()
    port = port_of(sock)
    server = QuietServer(app.uvicorn_config("127.0.0.1", port, log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(WAIT):
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("uvicorn exited before it started")
                await asyncio.sleep(0.01)
        yield RunningFeed(f"http://127.0.0.1:{port}", app, server)
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(task, WAIT)
        finally:
            sock.close()


class FeedClient:
    """A python-socketio AsyncClient that queues what the server sends, for tests to await.

    `changes` frames are unpacked into single changes, so tests see one stream in order
    whether the server batched or not.
    """

    def __init__(self, **options: Any) -> None:
        """`options`: more for python-socketio's AsyncClient (`websocket_extra_options`...)."""
        self.sio = socketio.AsyncClient(reconnection=False, **options)
        self.changes: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.gaps: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.statuses: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.frames: list[int] = []
        """The changes each `change` (1) or `changes` frame carried, in arrival order."""
        self.sio.on("change", self._on_change)
        self.sio.on("changes", self._on_changes)
        self.sio.on("gap", self._on_gap)
        self.sio.on("status", self._on_status)

    async def _on_change(self, data: dict[str, Any]) -> None:
        self.frames.append(1)
        self.changes.put_nowait(data)

    async def _on_changes(self, batch: list[dict[str, Any]]) -> None:
        self.frames.append(len(batch))
        for data in batch:
            self.changes.put_nowait(data)

    async def _on_gap(self, data: dict[str, Any]) -> None:
        self.gaps.put_nowait(data)

    async def _on_status(self, data: dict[str, Any]) -> None:
        self.statuses.put_nowait(data)

    async def connect(self, url: str, auth: Any = None, **kwargs: Any) -> FeedClient:
        await self.sio.connect(
            url, auth=auth, transports=["websocket"], wait_timeout=WAIT, **kwargs
        )
        return self

    async def close(self) -> None:
        await self.sio.disconnect()

    async def call(self, event: str, data: Any = None, timeout: float = WAIT) -> Any:
        return await self.sio.call(event, data, timeout=timeout)

    async def subscribe(self, room: str, **fields: Any) -> dict[str, Any]:
        ack: dict[str, Any] = await self.call("subscribe", {"room": room, **fields})
        return ack

    async def next_change(self, timeout: float = WAIT) -> dict[str, Any]:
        return await asyncio.wait_for(self.changes.get(), timeout)

    async def take(self, count: int, timeout: float = WAIT) -> list[dict[str, Any]]:
        return [await self.next_change(timeout) for _ in range(count)]

    async def next_gap(self, timeout: float = WAIT) -> dict[str, Any]:
        return await asyncio.wait_for(self.gaps.get(), timeout)


@asynccontextmanager
async def feed_client(url: str, auth: Any = None) -> AsyncIterator[FeedClient]:
    client = await FeedClient().connect(url, auth=auth)
    try:
        yield client
    finally:
        await client.close()
