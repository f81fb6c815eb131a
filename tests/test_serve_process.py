"""`feed serve` as a user runs it: a real process, real clients, SIGTERM for a clean stop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
import socketio

from feed.app.config import parse_config
from feed.app.server import FeedApp, QuietServer
from tests.support.proxy import CuttableProxy
from tests.support.server import FeedClient, PortTaken, listening_socket, on_free_port, port_of

ROOT = Path(__file__).parent.parent
MEMORY = "[[connectors]]\nname = 'mem'\ntype = 'memory'\ntargets = ['public.orders']\n"


async def serve(
    tmp_path: Path, port_in_config: bool = False, settings: str = "", limits: str = ""
) -> tuple[asyncio.subprocess.Process, int]:
    """`feed serve` with a memory connector on a free port (in its config, or `--port`), once
    it listens; a port another process took before the child bound it is replaced by a fresh one.
    `settings`: more lines for its `[server]` table; `limits`: lines of a `[limits]` table."""

    async def start(port: int) -> tuple[asyncio.subprocess.Process, int]:
        config = tmp_path / "feed.toml"
        port_line = f"port = {port}\n" if port_in_config else ""
        limits_table = f"[limits]\n{limits}\n" if limits else ""
        config.write_text(f"[server]\n{port_line}{settings}\n{limits_table}{MEMORY}")
        flags = [] if port_in_config else ["--port", str(port)]
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "feed", "serve", "--config", str(config), *flags,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert process.stderr is not None
        lines: list[bytes] = []
        try:
            async with asyncio.timeout(30):
                while b"Uvicorn running" not in (line := await process.stderr.readline()):
                    if not line:
                        await process.wait()
                        text = b"".join(lines).decode(errors="replace")
                        if "already in use" in text.lower():
                            raise PortTaken(f"port {port} is taken:\n{text}")
                        raise AssertionError(f"the server exited before it started:\n{text}")
                    lines.append(line)
        except BaseException:
            if process.returncode is None:
                process.kill()
                await process.wait()
            raise
        return process, port

    return await on_free_port(start)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl_c"])
async def test_a_signal_disconnects_clients_and_exits_cleanly(
    tmp_path: Path, stop: signal.Signals
) -> None:
    """docs/operations.md: SIGINT and SIGTERM alike stop the feed cleanly, exit 0. Ctrl-C ended
    with 130 (uvicorn re-raises the signal after its graceful stop, Python's default handler
    turned it into KeyboardInterrupt), so a service manager stopping the feed with SIGINT, or a
    script running it, saw a failure after a clean stop."""
    process, port = await serve(tmp_path, port_in_config=stop == signal.SIGTERM)
    assert process.stderr is not None
    try:
        client = await FeedClient().connect(f"http://127.0.0.1:{port}")
        disconnected = asyncio.Event()
        client.sio.on("disconnect", lambda *args: disconnected.set())
        assert (await client.subscribe("mem:public.orders"))["ok"]
        process.send_signal(stop)
        await asyncio.wait_for(disconnected.wait(), 15)
        rest = await asyncio.wait_for(process.stderr.read(), 15)
        assert await asyncio.wait_for(process.wait(), 15) == 0
        assert b"Traceback" not in rest
        assert b"Application shutdown complete" in rest
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_second_ctrl_c_still_stops_the_connectors_without_a_traceback(
    tmp_path: Path,
) -> None:
    """A second Ctrl-C (uvicorn's force exit) skipped the application's shutdown: connectors
    were not stopped (a cluster node kept its leases for others to wait out) and the process
    ended with `ERROR uvicorn.error: Exception in 'lifespan' protocol` and a traceback. Now it
    cuts short only the wait for open requests."""
    process, port = await serve(tmp_path)
    assert process.stderr is not None
    try:
        client = await FeedClient().connect(f"http://127.0.0.1:{port}")
        assert (await client.subscribe("mem:public.orders"))["ok"]
        process.send_signal(signal.SIGINT)
        # The second once the first is being handled: two pending SIGINTs are one to the kernel.
        seen = b""
        async with asyncio.timeout(15):
            while b"Shutting down" not in seen:
                line = await process.stderr.readline()
                assert line, seen.decode()
                seen += line
        process.send_signal(signal.SIGINT)
        rest = seen + await asyncio.wait_for(process.stderr.read(), 15)
        assert await asyncio.wait_for(process.wait(), 15) == 0
        assert b"Traceback" not in rest, rest.decode()
        assert b"Application shutdown complete" in rest, rest.decode()
        await client.close()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_log_level_warning_prints_no_info_line(tmp_path: Path) -> None:
    """`[server] log_level = "warning"`: the authentication line (INFO, logged as the app is
    built) was printed before the level was set."""

    async def start(port: int) -> tuple[asyncio.subprocess.Process, int]:
        config = tmp_path / "feed.toml"
        config.write_text(f"[server]\nport = {port}\nlog_level = 'warning'\n\n{MEMORY}")
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "feed", "serve", "--config", str(config),
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        try:
            async with aiohttp.ClientSession() as http, asyncio.timeout(30):
                while True:  # nothing is logged at this level: wait for it to answer
                    if process.returncode is not None:
                        raise PortTaken(f"port {port}: the server exited")
                    with contextlib.suppress(aiohttp.ClientConnectionError):
                        async with http.get(f"http://127.0.0.1:{port}/healthz") as answer:
                            if answer.status == 200:
                                return process, port
                    await asyncio.sleep(0.05)
        except BaseException:
            if process.returncode is None:
                process.kill()
                await process.wait()
            raise

    process, _ = await on_free_port(start)
    assert process.stderr is not None
    try:
        process.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(process.stderr.read(), 15)
        assert await asyncio.wait_for(process.wait(), 15) == 0
        assert b" INFO " not in rest and b"INFO:" not in rest, rest.decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


LOG_LINE = re.compile(
    rb"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: "
)


@pytest.mark.parametrize("access_log", [False, True], ids=["default", "access_log"])
async def test_the_log_has_one_format_and_no_line_per_request_unless_asked(
    tmp_path: Path, access_log: bool
) -> None:
    """uvicorn wrote its lines in a format of its own (`INFO:     connection open`: no time, no
    logger) beside the feed's, and a line per HTTP request and per websocket at INFO: a
    long-polling client makes a request per batch of changes, so 20 of them under 100 changes a
    second wrote about 600 lines a second, burying the feed's own. Now every line has the time,
    level and logger, and request lines come only with `[server] access_log = true`."""
    process, port = await serve(tmp_path, settings=f"access_log = {str(access_log).lower()}\n")
    assert process.stderr is not None
    url = f"http://127.0.0.1:{port}"
    try:
        for transport in ("polling", "websocket"):
            client = socketio.AsyncClient(reconnection=False)
            await client.connect(url, transports=[transport], wait_timeout=10)
            ack = await client.call("subscribe", {"room": "mem:public.orders"}, timeout=10)
            assert ack["ok"]
            await client.disconnect()
        async with aiohttp.ClientSession() as http, http.get(f"{url}/healthz") as answer:
            assert answer.status == 200
        process.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(process.stderr.read(), 15)
        assert await asyncio.wait_for(process.wait(), 15) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    lines = rest.splitlines()
    assert lines and b"Application shutdown complete" in rest
    for line in lines:
        assert LOG_LINE.match(line), line.decode()
    requests = [line for line in lines if b"/socket.io/" in line or b"/healthz" in line]
    if access_log:
        assert any(b'"GET /healthz HTTP/1.1" 200' in line for line in requests), rest.decode()
        assert any(b"transport=polling" in line for line in requests), rest.decode()
        assert any(b'"WebSocket /socket.io/' in line for line in requests), rest.decode()
        assert all(b"sid=***" in line for line in requests if b"sid=" in line)
    else:
        assert requests == [], rest.decode()
        assert b"connection open" not in rest
    assert b"uvicorn.error" not in rest  # its INFO lines read as errors


async def test_a_busy_port_is_one_line_and_exit_1_before_any_source_is_reached(
    tmp_path: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "feed.toml"
        # A Postgres connector that would take seconds to give up: the refusal must come first.
        config.write_text(
            "[[connectors]]\nname = 'main'\ntype = 'postgres'\n"
            "dsn = 'postgresql://nobody@127.0.0.1:1/none'\ntables = ['public.orders']\n"
        )
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "feed", "serve", "--config", str(config), "--port", str(port),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 1
    assert out == b""
    assert err.decode().splitlines() == [
        f"feed: cannot listen on 127.0.0.1:{port} (Address already in use); "
        "pass --port with a free port, or change [server] port"
    ]


async def test_sigterm_ends_a_waiting_long_poll_at_once_and_exits_within_3_s(
    tmp_path: Path,
) -> None:
    """A long-polling client's poll waits on the server for data (up to the ping interval):
    uvicorn's graceful shutdown would wait for it, 10 s, before the feed stops. SIGTERM must
    answer it at once, so that the client loses its connection and reconnects elsewhere, and
    the process exits in well under that."""
    process, port = await serve(tmp_path)
    assert process.stderr is not None
    sio = socketio.AsyncClient(reconnection=False)
    proxy: CuttableProxy | None = None
    try:
        proxy = CuttableProxy(port)
        await proxy.start()
        disconnected = asyncio.Event()
        sio.on("disconnect", lambda *args: disconnected.set())
        url = f"http://127.0.0.1:{proxy.port}"
        await sio.connect(url, transports=["polling"], wait_timeout=10)
        ack = await sio.call("subscribe", {"room": "mem:public.orders"}, timeout=10)
        assert ack["ok"]
        await proxy.poll_waiting(10)  # the client's next poll is at the server, unanswered
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(disconnected.wait(), 15)
        noticed = time.monotonic() - started
        rest = await asyncio.wait_for(process.stderr.read(), 15)
        assert await asyncio.wait_for(process.wait(), 15) == 0
        took = time.monotonic() - started
        assert took < 3.0, f"exited {took:.1f} s after SIGTERM (client noticed at {noticed:.1f} s)"
        assert noticed < 3.0
        assert b"Traceback" not in rest
        assert b"timeout graceful shutdown exceeded" not in rest
    finally:
        await sio.disconnect()
        if proxy is not None:
            await proxy.close()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_thousands_of_clients_leaving_at_once_cost_the_server_little(
    tmp_path: Path,
) -> None:
    """Clients leaving at once (a balancer restarted, a network blip) must not freeze the server.

    python-socketio's own manager scanned every room, and every client is a room of its own,
    for each disconnect: 5,000 clients, each in its own row room, leaving at once cost the
    server 5.9 s of CPU here, during which nothing was delivered. The feed's manager
    (feed.delivery.manager) looks only at the leaving client's rooms: 0.36 s.
    """
    from bench.procs import Usage, raise_nofile
    from bench.wire import Stats, connect_many

    count = 5000
    if raise_nofile() < 2 * count + 200:
        pytest.skip(f"needs {2 * count + 200} open files (ulimit -n) for {count} clients")
    # All from 127.0.0.1, anonymous: uncapped per address (bench.servers.BENCH_LIMITS).
    process, port = await serve(tmp_path, limits="connections_per_address = 0\n")
    assert process.stderr is not None
    logs = asyncio.create_task(process.stderr.read())  # uvicorn logs each connection
    try:
        rows = [f"mem:public.orders:{i}" for i in range(count)]  # a room per user, say
        clients = await connect_many("127.0.0.1", port, rows, count, Stats(), timeout=180)
        url = f"http://127.0.0.1:{port}/metrics"

        async def connected() -> float:
            async with aiohttp.ClientSession() as http, http.get(url) as response:
                text = await response.text()
            return float(
                next(ln for ln in text.splitlines() if ln.startswith("feed_clients "))[13:]
            )

        assert await connected() == count
        before = Usage.of(process.pid).cpu
        for client in clients:
            client.close()
        async with asyncio.timeout(120):
            while await connected() > 0:  # noqa: ASYNC110 - a gauge in another process
                await asyncio.sleep(0.1)
        spent = Usage.of(process.pid).cpu - before
        assert spent < 2.0, f"{count} clients leaving cost the server {spent:.1f} s of CPU"
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await logs


def wakeups(pid: int) -> int:
    """How many times the process's threads have gone to sleep and been woken (Linux)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/status") as status:
            for line in status:
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_an_idle_server_sleeps_and_still_answers_with_a_current_date(
    tmp_path: Path,
) -> None:
    """An idle `feed serve` wakes a few times a second at most: uvicorn's main loop alone woke
    it ten times a second, which on a cluster of nodes each woken cold cost a third of their
    idle CPU (docs/benchmarks.md). Its HTTP answers still carry a Date header that moves on
    each second, and SIGTERM still ends it at once (the main loop wakes for it)."""
    process, port = await serve(tmp_path)
    try:
        url = f"http://127.0.0.1:{port}/healthz"
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as response:
                first = response.headers["Date"]
            before, started = wakeups(process.pid), time.monotonic()
            await asyncio.sleep(3.0)  # the quiet being measured: nothing to wait for
            per_second = (wakeups(process.pid) - before) / (time.monotonic() - started)
            assert per_second < 4, f"an idle server woke {per_second:.1f} times a second"
            async with http.get(url) as response:
                assert response.headers["Date"] != first
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 15) == 0
        assert time.monotonic() - started < 3.0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@asynccontextmanager
async def embedded() -> AsyncIterator[tuple[QuietServer, asyncio.Task[None], int]]:
    """The feed's server run inside this test's loop, as a program embeds it: the server, its
    task and its port, once it listens; cancelled afterwards if it has not stopped."""
    app = FeedApp(parse_config(MEMORY, "test.toml", dict(os.environ)))
    sock = listening_socket()
    server = QuietServer(app.uvicorn_config("127.0.0.1", port_of(sock), log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(30):
            while not server.started:
                assert not task.done()
                await asyncio.sleep(0.01)
        yield server, task, port_of(sock)
    finally:
        if not task.done():
            task.cancel()
        sock.close()


async def test_a_server_embedded_in_a_program_stops_at_once_when_told() -> None:
    """`should_exit`, set by a program that runs the feed's server in its own loop (the demo,
    the tests), ends it at once, not at the main loop's next tick a second later."""
    async with embedded() as (server, task, _):
        await asyncio.sleep(0.2)  # idle a moment: the main loop is in its wait between ticks
        started = time.monotonic()
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        took = time.monotonic() - started
        assert took < 0.5, f"the server took {took:.2f} s to stop"


async def test_shutdown_ends_cleanly_with_a_websocket_whose_close_has_begun() -> None:
    """A client that says goodbye as the server stops: its websocket's close handshake has begun
    when uvicorn closes every connection with a close frame of its own, and uvicorn's websockets
    protocol raised InvalidState there, which ended the shutdown with a traceback (seen in CI:
    the dashboard's browser closing its page as the test's server stopped). The state is made
    here as a client's close frame makes it (the protocol answers it and is then closing)."""
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    async with embedded() as (server, task, port), aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket"
        async with http.ws_connect(url) as ws:
            opened = await asyncio.wait_for(ws.receive(), 10)
            assert str(opened.data).startswith("0{")  # Engine.IO's open packet
            sockets = [
                c
                for c in server.server_state.connections
                if isinstance(c, WebSocketsSansIOProtocol)
            ]
            assert len(sockets) == 1, "uvicorn's websockets (sans-I/O) protocol expected"
            sockets[0].conn.send_close(1000)  # what answering a client's close frame does
            server.should_exit = True
            await asyncio.wait_for(task, 10)  # raised InvalidState before
            closed = await asyncio.wait_for(ws.receive(), 10)
            assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
