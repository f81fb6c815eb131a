"""dbfeed_client as an application holds it: installed on its own, stopped with Ctrl-C, given a
token function that fails. Real server (tests/support/client_harness.py), real Socket.IO."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tomllib
from collections.abc import AsyncIterator
from importlib import metadata
from pathlib import Path
from typing import Any

import dbfeed_client
import pytest
from dbfeed_client import ConnectError, FeedClient
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support.client_harness import Harness, harness, make_token

ROOM = "mem:public.orders"
WAIT = 20.0
CLIENT_DIR = Path(dbfeed_client.__file__).resolve().parents[1]


def test_the_package_brings_aiohttp_whichever_pip_installs_it() -> None:
    """python-socketio's asyncio client needs aiohttp. pip before 23.3 (Python 3.11's own is
    23.2) matches extra names literally, and python-socketio's metadata spells the extra
    `asyncio-client`: asked for as `asyncio_client`, no aiohttp was installed, and every connect
    failed after `timeout` seconds as "unreachable: ... Unexpected connection error"."""
    project = tomllib.loads((CLIENT_DIR / "pyproject.toml").read_text())["project"]
    reached: set[str] = set()
    for text in project["dependencies"]:
        wanted = Requirement(text)
        reached.add(canonicalize_name(wanted.name))
        provided = metadata.metadata(wanted.name).get_all("Provides-Extra") or []
        for extra in wanted.extras:
            if extra not in provided:
                continue  # what an older pip does: no such extra, nothing more installed
            for line in metadata.requires(wanted.name) or []:
                dependency = Requirement(line)
                if dependency.marker is not None and dependency.marker.evaluate({"extra": extra}):
                    reached.add(canonicalize_name(dependency.name))
    assert "aiohttp" in reached, project["dependencies"]


APP = """
import asyncio, sys
from dbfeed_client import FeedClient

async def main():
    async with FeedClient(sys.argv[1]) as feed:
        async with feed.subscribe(sys.argv[2]) as sub:
            print("ready", flush=True)
            async for change in sub:
                pass

try:
    asyncio.run(main())
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


async def test_ctrl_c_raises_keyboard_interrupt_in_the_application() -> None:
    """python-engineio installs a SIGINT handler of its own at connect (unless told not to),
    replacing the application's: Ctrl-C then cancelled every task and the application saw a
    CancelledError traceback instead of KeyboardInterrupt (or its own handler, or its web
    server's graceful shutdown)."""
    async with harness() as h:
        env = {**os.environ, "PYTHONPATH": str(CLIENT_DIR)}
        app = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            APP,
            h.url,
            ROOM,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        try:
            assert app.stdout is not None
            ready = await asyncio.wait_for(app.stdout.readline(), WAIT)
            assert ready == b"ready\n"
            app.send_signal(signal.SIGINT)
            out, err = await asyncio.wait_for(app.communicate(), WAIT)
        finally:
            if app.returncode is None:
                app.kill()
                await app.wait()
        assert (out, app.returncode) == (b"interrupted\n", 0), err.decode()[-2000:]


async def test_a_token_function_that_raises_fails_the_connect_at_once_with_its_error() -> None:
    """Before, the token function was called inside python-socketio's handshake: its error was
    logged there, the attempt waited out `timeout`, and `connect()` said "unreachable", each
    attempt leaving its websocket open."""
    async with harness(auth=True) as h:

        def token() -> str:
            raise RuntimeError("identity provider down")

        before = asyncio.all_tasks()
        with pytest.raises(ConnectError) as caught:
            async with asyncio.timeout(5.0):  # well within the client's own `timeout`
                async with FeedClient(h.url, token=token, timeout=30.0):
                    raise AssertionError("connected without a token")
        assert caught.value.code == "token_failed"
        assert "RuntimeError: identity provider down" in caught.value.message
        assert isinstance(caught.value.__cause__, RuntimeError)
        assert not (asyncio.all_tasks() - before - {asyncio.current_task()})


async def test_a_token_function_failing_later_is_reported_and_retried_until_it_recovers() -> None:
    """A refresh whose token function raised killed the refresh task with an exception nobody
    retrieved: no `error` event, no retry, and the reconnect after the token expired hung in
    the handshake as above."""
    async with harness(auth=True) as h:
        calls = 0

        def token() -> str:
            nonlocal calls
            calls += 1
            if calls == 1:
                return make_token(2)
            if calls <= 4:
                raise RuntimeError(f"identity provider down ({calls})")
            return make_token(300)

        errors: list[str] = []
        back, got = asyncio.Event(), asyncio.Event()

        def on_state(state: str, info: dict[str, Any]) -> None:
            if state in ("live", "recovered") and calls > 4:
                back.set()  # resubscribed on a connection made with the recovered function

        feed = FeedClient(h.url, token=token, reconnection_delay=0.1, reconnection_delay_max=0.5)
        async with feed, feed.subscribe(ROOM) as sub:
            feed.on("error", lambda e: errors.append(e.code))
            sub.on("state", on_state)
            sub.on("change", lambda change: got.set())
            await asyncio.wait_for(back.wait(), WAIT)
            h.write("public.orders", "insert", {"id": 1, "status": "new"})
            await asyncio.wait_for(got.wait(), WAIT)
        assert "token_failed" in errors, errors


async def test_connect_after_close_says_the_client_is_closed(feed_server: Harness) -> None:
    feed = FeedClient(feed_server.url)
    await feed.connect()
    await feed.close()
    with pytest.raises(dbfeed_client.ClosedError):
        await feed.connect()


@pytest.fixture
async def feed_server() -> AsyncIterator[Harness]:
    async with harness() as h:
        yield h


async def test_async_handlers_run_in_order_and_their_errors_are_logged(
    feed_server: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """An `async def` handler was called and its coroutine dropped: it never ran (only a
    "coroutine was never awaited" warning said so)."""
    seen: list[Any] = []
    done = asyncio.Event()

    async def on_connect() -> None:
        seen.append("connect")

    async def on_state(state: str, info: dict[str, Any]) -> None:
        seen.append(state)

    async def on_change(change: dict[str, Any]) -> None:
        await asyncio.sleep(0)
        seen.append(change["key"])
        if change["key"] == 2:
            done.set()

    async def failing(change: dict[str, Any]) -> None:
        raise ValueError("a bug in the application's handler")

    feed = FeedClient(feed_server.url)
    feed.on("connect", on_connect)
    async with feed:
        sub = feed.subscribe(ROOM)
        sub.on("state", on_state)
        sub.on("change", failing)
        sub.on("change", on_change)
        async with sub:
            feed_server.write("public.orders", "insert", {"id": 1, "status": "new"})
            feed_server.write("public.orders", "insert", {"id": 2, "status": "new"})
            await asyncio.wait_for(done.wait(), WAIT)
    assert seen == ["connect", "live", 1, 2]
    failures = [r for r in caplog.records if r.name == "dbfeed_client" and r.exc_info]
    assert len(failures) == 2
    assert "a bug in the application's handler" in str(failures[0].exc_info)
