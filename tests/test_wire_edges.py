"""The wire protocol as unusual and hostile clients use it, against the real server over real
sockets: long-polling POSTs of many packets, a Socket.IO disconnect that leaves its Engine.IO
session open, malformed upgrade probes, websocket requests for paths that are not Socket.IO."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp
import pytest
import socketio
import websockets
from websockets.asyncio.client import ClientConnection, connect

from tests.auth_helpers import BASE, source, ws_url
from tests.support.server import RunningFeed, running_feed

POLL = "/socket.io/?EIO=4&transport=polling"


async def open_polling(http: aiohttp.ClientSession, feed: RunningFeed) -> str:
    """A long-polling session connected to the default namespace; its Engine.IO sid."""
    async with http.get(feed.url + POLL) as response:
        sid: str = json.loads((await response.text())[1:])["sid"]
    async with http.post(f"{feed.url}{POLL}&sid={sid}", data="40") as response:
        assert response.status == 200
    async with http.get(f"{feed.url}{POLL}&sid={sid}") as response:
        assert (await response.text()).startswith("40")
    return sid


async def poll_acks(http: aiohttp.ClientSession, url: str, count: int) -> dict[int, str]:
    """Poll until `count` acks came; each ack's id -> its JSON text."""
    acks: dict[int, str] = {}
    async with asyncio.timeout(10):
        while len(acks) < count:
            async with http.get(url) as response:
                assert response.status == 200, await response.text()
                for packet in (await response.text()).split("\x1e"):
                    if packet.startswith("43"):
                        ack_id, _, body = packet[2:].partition("[")
                        acks[int(ack_id)] = body
    return acks


async def test_a_polling_post_of_many_packets_is_served_like_a_websocket() -> None:
    """socket.io-client and python-engineio's client put every queued packet into one POST:
    30 subscribes sent at once (or resubscribed after a reconnect) were refused as "Too many
    packets in payload" (python-engineio's limit of 16), the session closed, the client
    reconnected and was refused again."""
    async with running_feed(BASE) as feed, aiohttp.ClientSession() as http:
        sid = await open_polling(http, feed)
        url = f"{feed.url}{POLL}&sid={sid}"
        body = "\x1e".join(
            f'42{i}["subscribe",{{"room":"mem:public.orders:{i}"}}]' for i in range(40)
        )
        async with http.post(url, data=body) as response:
            assert response.status == 200, await response.text()
        acks = await poll_acks(http, url, 40)
        assert sorted(acks) == list(range(40))
        assert all('"ok":true' in ack for ack in acks.values()), acks
        assert sid in feed.app.sio.eio.sockets


async def test_a_python_client_polling_gets_bursts_of_more_than_16_frames() -> None:
    """python-engineio's client refuses a poll answer of more than 16 packets and drops the
    connection: 30 rooms each getting a change at once (30 frames waiting for one poll), or 40
    requests answered together, cut off a Python client on the polling transport."""
    async with running_feed(BASE) as feed:
        db = source(feed)
        client = socketio.AsyncClient(reconnection=False)
        got: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        client.on("change", got.put_nowait)

        def batch(changes: list[dict[str, Any]]) -> None:
            for change in changes:
                got.put_nowait(change)

        client.on("changes", batch)
        await client.connect(feed.url, transports=["polling"], wait_timeout=10)
        try:
            for i in range(30):  # one at a time: each request in a POST of its own
                ack = await client.call("subscribe", {"room": f"mem:public.orders:{i}"})
                assert ack["ok"], ack
            for i in range(30):  # in one pass of the loop: 30 frames for one poll answer
                db.write("public.orders", "insert", {"id": i})
            keys = sorted([(await asyncio.wait_for(got.get(), 10))["key"] for _ in range(30)])
            assert keys == list(range(30))
            answers = await asyncio.gather(  # 40 requests in one POST, 40 acks to poll
                *(
                    client.call("subscribe", {"room": f"mem:public.orders:{i}"}, timeout=10)
                    for i in range(40)
                )
            )
            assert all(answer["ok"] for answer in answers)
            assert client.connected
        finally:
            await client.disconnect()


async def text(ws: ClientConnection) -> str:
    """The next message, which must be text."""
    message = await asyncio.wait_for(ws.recv(), 5)
    assert isinstance(message, str), message
    return message


async def recv_until_closed(ws: ClientConnection, timeout: float) -> float:
    """Read (and drop) what comes until the server closes; how long that took."""
    started = time.monotonic()
    with pytest.raises(websockets.ConnectionClosed):
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    return time.monotonic() - started


async def test_a_session_whose_client_left_the_namespace_must_connect_again_in_time() -> None:
    """A `41` (Socket.IO disconnect) left the Engine.IO session open for good: no handshake
    timeout, no token, not counted in connections_per_identity, as long as it answered pings.
    It now has `handshake_timeout` to connect again, as a new session does."""
    config = BASE + "[limits]\nhandshake_timeout = 0.5\n"
    async with running_feed(config) as feed:
        async with connect(ws_url(feed), proxy=None) as ws:
            await ws.recv()
            await ws.send("40")
            assert (await text(ws)).startswith("40")
            await ws.send("41")
            assert await recv_until_closed(ws, 5) < 2.0
        assert 'feed_client_errors_total{kind="handshake_timeout"} 1' in feed.hub.metrics.render()

        # One that connects again on the same session is kept, past the timeout.
        async with connect(ws_url(feed), proxy=None) as ws:
            await ws.recv()
            await ws.send("40")
            await ws.recv()
            await ws.send("41")
            await ws.send("40")
            assert (await text(ws)).startswith("40")
            await asyncio.sleep(0.8)  # past the handshake timeout: it must still be there
            await ws.send('421["subscribe",{"room":"mem:public.orders"}]')
            assert (await text(ws)).startswith('431[{"ok":true')


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    "probe",
    [[""], ["x"], ["2probe", ""], ["2probe", "x"]],
    ids=["empty", "junk", "probe-then-empty", "probe-then-junk"],
)
async def test_a_malformed_upgrade_probe_fails_the_upgrade_without_a_traceback(
    probe: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """An upgrade whose probe was not an Engine.IO packet (an empty or junk message) ended in
    "Exception in ASGI application" and a traceback at ERROR. It is now reported as a client
    error; the upgrade fails and the polling session goes on, as for any failed upgrade."""
    caplog.set_level(logging.INFO)
    async with running_feed(BASE) as feed, aiohttp.ClientSession() as http:
        sid = await open_polling(http, feed)
        async with connect(f"{ws_url(feed)}&sid={sid}", proxy=None) as ws:
            for message in probe:
                await ws.send(message)
            await recv_until_closed(ws, 5)
        url = f"{feed.url}{POLL}&sid={sid}"
        async with http.post(url, data='421["catalog"]') as response:
            assert response.status == 200
        assert '"ok":true' in (await poll_acks(http, url, 1))[1]
        assert 'feed_client_errors_total{kind="bad_packet"} 1' in feed.hub.metrics.render()
    assert not errors_logged(caplog), errors_logged(caplog)


async def test_a_websocket_request_for_another_path_gets_404(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`ws://host:port/` or `/healthz` (a wrong URL in a client) got 500 and an ERROR line
    ("ASGI callable returned without completing handshake") per attempt."""
    caplog.set_level(logging.INFO)
    async with running_feed(BASE) as feed:
        base = feed.url.replace("http://", "ws://")
        for path in ("/", "/healthz", "/index.html", "/nope"):
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with connect(base + path, proxy=None):
                    pass
            assert refused.value.response.status_code == 404, path
        async with connect(ws_url(feed), proxy=None) as ws:  # Socket.IO's path still works
            assert (await text(ws)).startswith("0")
    assert not errors_logged(caplog), errors_logged(caplog)


async def test_refused_engineio_requests_are_client_errors_not_errors_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A poll for a session the server does not have (every polling client after a restart),
    an origin not accepted, an unsupported protocol version: Engine.IO logged the first of each
    at ERROR, which alerts an operator for a client's mistake. They are counted instead."""
    caplog.set_level(logging.INFO)
    async with running_feed(BASE) as feed, aiohttp.ClientSession() as http:
        for query, headers in [
            (f"{POLL}&sid=no-such-session", {}),
            (POLL, {"Origin": "http://evil.example"}),
            ("/socket.io/?EIO=3&transport=polling", {}),
            ("/socket.io/?EIO=4&transport=carrier-pigeon", {}),
        ]:
            async with http.get(feed.url + query, headers=headers) as response:
                assert response.status == 400, query
        assert 'feed_client_errors_total{kind="bad_request"} 4' in feed.hub.metrics.render()
    assert not errors_logged(caplog), errors_logged(caplog)
