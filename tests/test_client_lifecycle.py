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
from tests.support.server import running_feed

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


class RenamingBalancer:
    """A balancer in front of a real feed that passes the name clients reach it by (`Host:
    feed.internal`), as nginx with `proxy_set_header Host $http_host` or HAProxy do, and hands
    an answer's body on a moment after its head (a slower link: a client reads the head first)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> RenamingBalancer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._links:
            task.cancel()
        await asyncio.gather(*self._links, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._links.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = [
                b"Host: feed.internal" if line.lower().startswith(b"host:") else line
                for line in head.split(b"\r\n")
            ]
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            up_writer.write(b"\r\n".join(lines))
            await up_writer.drain()
            answer_head = await up_reader.readuntil(b"\r\n\r\n")
            writer.write(answer_head)
            await writer.drain()
            await asyncio.sleep(0.2)
            while data := await up_reader.read(65536):
                writer.write(data)
                await writer.drain()
            up_writer.close()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self._links.discard(task)


@pytest.mark.parametrize(
    ("transports", "code"), [(("polling",), "unreachable"), (("websocket",), "handshake_refused")]
)
async def test_a_feed_refusing_its_host_name_is_unreachable_not_a_hang(
    transports: tuple[str, ...], code: str
) -> None:
    """After the upgrade that brought `allowed_hosts`, a feed without auth reached by a DNS
    name refuses every request (400 to a poll, 403 to a websocket). Over long-polling,
    python-engineio reads the 400's body after closing its HTTP session, and aiohttp raised
    RuntimeError("Connection closed.") whenever the body had not come with the head: that ended
    the client's connection loop, so `connect()` waited forever (and, once connected, a
    reconnect refused that way stopped the client for good). Each attempt is now a failed one:
    `connect()` says unreachable after `timeout`. A refusal whose status the library does get
    (a websocket's, here; a poll's whose body comes with its head, tests/test_client_refusals.py)
    is `handshake_refused` at once."""
    config = "[[connectors]]\nname = 'mem'\ntype = 'memory'\ntargets = ['public.orders']\n"
    async with (
        running_feed(config) as feed,
        RenamingBalancer(int(feed.url.rsplit(":", 1)[1])) as balancer,
    ):
        client = FeedClient(f"http://127.0.0.1:{balancer.port}", transports=transports, timeout=1.0)
        with pytest.raises(ConnectError) as refused:
            async with asyncio.timeout(WAIT):
                await client.connect()
        assert refused.value.code == code, refused.value
        assert 'kind="bad_host"' in feed.hub.metrics.render()
