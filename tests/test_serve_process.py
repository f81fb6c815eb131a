"""`feed serve` as a user runs it: a real process, real clients, SIGTERM for a clean stop."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

import socketio

from tests.support.proxy import CuttableProxy
from tests.support.server import FeedClient, PortTaken, on_free_port

ROOT = Path(__file__).parent.parent
MEMORY = "[[connectors]]\nname = 'mem'\ntype = 'memory'\ntargets = ['public.orders']\n"


async def serve(
    tmp_path: Path, port_in_config: bool = False
) -> tuple[asyncio.subprocess.Process, int]:
    """`feed serve` with a memory connector on a free port (in its config, or `--port`), once
    it listens; a port another process took before the child bound it is replaced by a fresh one."""

    async def start(port: int) -> tuple[asyncio.subprocess.Process, int]:
        config = tmp_path / "feed.toml"
        config.write_text(f"[server]\nport = {port}\n\n{MEMORY}" if port_in_config else MEMORY)
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


async def test_sigterm_disconnects_clients_and_exits_cleanly(tmp_path: Path) -> None:
    process, port = await serve(tmp_path, port_in_config=True)
    assert process.stderr is not None
    try:
        client = await FeedClient().connect(f"http://127.0.0.1:{port}")
        disconnected = asyncio.Event()
        client.sio.on("disconnect", lambda *args: disconnected.set())
        ack = await client.subscribe("mem:public.orders")
        assert ack["ok"]
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(disconnected.wait(), 15)
        rest = await asyncio.wait_for(process.stderr.read(), 15)
        assert await asyncio.wait_for(process.wait(), 15) == 0
        assert b"Traceback" not in rest
        assert b"Application shutdown complete" in rest
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


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
