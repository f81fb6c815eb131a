"""`feed demo` as a user runs it: a real process with its embedded Postgres and Redis.

What a user notices: the URL line appears, the feed is ready, changes from both sources reach a
Socket.IO client without anyone writing, and Ctrl-C (or SIGTERM, or even `kill -9`) leaves no
database server behind.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from feed.demo.demo import MONGODB_DETAIL, MONGODB_HINT, demo_config
from tests.support.server import FeedClient, PortTaken, on_free_port

ROOT = Path(__file__).parent.parent
URL_LINE = re.compile(rb"feed demo: dashboard: (http://\S+)")
START = 120.0  # initdb and a cold start on a busy 2-core machine
STOP = 30.0


@dataclass
class DemoProcess:
    process: asyncio.subprocess.Process
    url: str
    output: list[bytes]


def children(pid: int) -> dict[int, str]:
    """Direct child processes of `pid` (from /proc): pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        if ppid == pid:
            found[int(entry.name)] = cmdline
    return found


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as gone: it holds no port or file)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Poll /proc (a process's end is no event we can await here); the ones still running."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.1)


def data_dirs(cmdlines: list[str]) -> list[Path]:
    """The demo's temporary directory, read from its children's command lines."""
    dirs = set()
    for cmdline in cmdlines:
        for match in re.finditer(r"(/\S*/feed-demo-[^/\s]+)", cmdline):
            dirs.add(Path(match.group(1)))
    return sorted(dirs)


@asynccontextmanager
async def demo_process(tmp_path: Path) -> AsyncIterator[DemoProcess]:
    demo = await on_free_port(lambda port: start_demo(tmp_path, port))
    try:
        yield demo
    finally:
        end(demo.process)
        await demo.process.wait()


async def start_demo(tmp_path: Path, port: int) -> DemoProcess:
    """`feed demo` on `port`, once it printed its URL; PortTaken when the port was taken before
    the demo bound it (`on_free_port` then tries a fresh one)."""
    log = tmp_path / "stderr.log"
    with log.open("wb") as stderr:  # the child has its own copy
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "feed", "demo", "--port", str(port),
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
    assert process.stdout is not None
    output: list[bytes] = []
    try:
        async with asyncio.timeout(START):
            while True:
                line = await process.stdout.readline()
                if not line:
                    await process.wait()
                    text = log.read_text(errors="replace")
                    if "already in use" in text.lower():
                        raise PortTaken(f"port {port} is taken:\n{text}")
                    pytest.fail(
                        f"feed demo exited before printing its URL:\n{b''.join(output).decode()}{text[-3000:]}"
                    )
                output.append(line)
                if match := URL_LINE.search(line):
                    break
    except BaseException:
        end(process)
        await process.wait()
        raise
    # The URL opens the dashboard with subscriptions; the server's base is before the query.
    return DemoProcess(process, match.group(1).decode().partition("?")[0], output)


def end(process: asyncio.subprocess.Process) -> None:
    """Kill the demo and its children (its databases), unless it ended already."""
    if process.returncode is None:
        for pid in children(process.pid):
            os.kill(pid, signal.SIGKILL)
        process.kill()


async def wait_ready(url: str, timeout: float = 60) -> dict[str, object]:
    """Poll /readyz until it says ready (the connectors come up just after the URL line)."""
    async with aiohttp.ClientSession() as http, asyncio.timeout(timeout):
        while True:
            async with http.get(f"{url}readyz") as response:
                body: dict[str, object] = await response.json()
                if response.status == 200:
                    return body
            await asyncio.sleep(0.2)


async def next_change_in(client: FeedClient, room: str, timeout: float = 20) -> dict[str, object]:
    async with asyncio.timeout(timeout):
        while True:
            change = await client.next_change(timeout)
            if change["room"] == room:
                return change


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
async def test_demo_streams_changes_and_stops_without_leftovers(
    tmp_path: Path, stop_signal: signal.Signals
) -> None:
    async with demo_process(tmp_path) as demo:
        banner = b"".join(demo.output).decode()
        assert MONGODB_HINT in banner
        assert "docker compose up" in banner
        assert "/?room=main:public.orders&room=cache:session:*" in banner

        ready = await wait_ready(demo.url)
        assert isinstance(ready["connectors"], dict)
        assert set(ready["connectors"]) == {"main", "cache"}

        kids = children(demo.process.pid)
        kinds = " ".join(kids.values())
        assert "postgres" in kinds and "redis-server" in kinds, kids
        temp_dirs = data_dirs(list(kids.values()))
        assert temp_dirs and all(d.exists() for d in temp_dirs)

        client = await FeedClient().connect(demo.url)
        try:
            # MongoDB is listed as left out, with the way to get it, for the dashboard to show.
            catalog = await client.call("catalog")
            assert [c["name"] for c in catalog["connectors"]] == ["main", "cache"]
            assert catalog["unconfigured"] == [{"type": "mongodb", "detail": MONGODB_DETAIL}]
            assert "docker compose up" in MONGODB_DETAIL
            for room in ("main:public.orders", "cache:session:*"):
                ack = await client.subscribe(room)
                assert ack["ok"], ack
            # Nobody writes here: the demo's own writer must make these.
            order = await next_change_in(client, "main:public.orders")
            assert order["op"] in ("insert", "update", "delete")
            assert order["source"] == "postgres"
            session = await next_change_in(client, "cache:session:*")
            assert str(session["key"]).startswith("session:")
        finally:
            await client.close()

        demo.process.send_signal(stop_signal)
        assert await asyncio.wait_for(demo.process.wait(), STOP) == 0
        assert not await wait_gone(list(kids), 5), "database servers outlived the demo"
        assert not any(d.exists() for d in temp_dirs), "the demo left its temporary files"
        log = (tmp_path / "stderr.log").read_text(errors="replace")
        assert "Traceback" not in log, log[-3000:]


@pytest.mark.timeout(300)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
async def test_killed_demo_takes_its_databases_with_it(tmp_path: Path) -> None:
    async with demo_process(tmp_path) as demo:
        kids = children(demo.process.pid)
        assert len(kids) >= 2, kids
        temp_dirs = data_dirs(list(kids.values()))
        demo.process.kill()
        await asyncio.wait_for(demo.process.wait(), STOP)
        try:
            assert not await wait_gone(list(kids), STOP), "database servers outlived kill -9"
        finally:
            for directory in temp_dirs:
                shutil.rmtree(directory, ignore_errors=True)


def test_demo_config_is_a_valid_feed_config() -> None:
    from feed.app.config import parse_config

    config = parse_config(
        demo_config("127.0.0.1", 8000, "postgresql://postgres@127.0.0.1:5/postgres",
                    "redis://127.0.0.1:6/0"),
        "<demo>",
        {},
    )  # fmt: skip
    assert [(c.name, c.type) for c in config.connectors] == [
        ("main", "postgres"),
        ("cache", "redis"),
    ]


async def test_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "feed", "demo", "--port", str(port),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}".encode() in err
    # A second `make demo` is the usual cause: say so, and how to choose a port from make.
    assert b"another feed demo or server may be running there" in err
    assert f"make demo PORT={port + 10}".encode() in err
    assert b"Traceback" not in err


async def test_demo_refuses_to_listen_beyond_this_machine() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "feed", "demo", "--host", "0.0.0.0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1
    assert b"listens on this machine only" in err and b"ssh -L" in err
    assert b"starting an embedded" not in out  # refused before starting anything
