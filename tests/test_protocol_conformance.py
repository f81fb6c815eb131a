"""Engine.IO v4 / Socket.IO v5 rules that any server must keep, checked with raw HTTP requests and
websocket frames against the real server: what the protocol documents say a server MUST do where
python-engineio or python-socketio did otherwise (a missing `transport`, a second GET poll, a second
websocket for one session, the body of a POST's answer, an aborted poll's answer, the payload of a
refused namespace), and the upgrade's NOOP that leaked onto the websocket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import websockets
from websockets.asyncio.client import ClientConnection, connect

from tests.auth_helpers import BASE, ws_url
from tests.support.server import WAIT, RunningFeed, running_feed
from tests.support.waiting import wait_until

POLL = "/socket.io/?EIO=4&transport=polling"


async def open_session(http: aiohttp.ClientSession, feed: RunningFeed) -> str:
    """A long-polling Engine.IO session (no Socket.IO connect yet); its sid."""
    async with http.get(feed.url + POLL) as response:
        assert response.status == 200
        sid: str = json.loads((await response.text())[1:])["sid"]
    return sid


def poll_waits(socket: Any) -> bool:
    """Whether a long-polling GET waits on the socket's Engine.IO queue now."""
    return bool(socket.queue._getters)


async def probe(feed: RunningFeed, sid: str) -> ClientConnection:
    """A websocket for `sid` that has sent its `2probe` and had its `3probe`."""
    ws = await connect(f"{ws_url(feed)}&sid={sid}", compression=None, proxy=None, open_timeout=WAIT)
    await ws.send("2probe")
    assert await asyncio.wait_for(ws.recv(), WAIT) == "3probe"
    return ws


async def test_a_handshake_without_transport_is_refused_with_400() -> None:
    """Engine.IO: `transport` is mandatory, a request without it gets 400. python-engineio
    took a missing (or empty) one for `polling` and opened a session."""
    async with running_feed(BASE) as feed, aiohttp.ClientSession() as http:
        for query in ("?EIO=4", "?EIO=4&transport="):
            async with http.get(f"{feed.url}/socket.io/{query}") as response:
                assert response.status == 400, (query, await response.text())
        assert not feed.app.sio.eio.sockets
        async with http.get(feed.url + POLL) as response:  # the same with it: a session
            assert response.status == 200
            assert (await response.text()).startswith("0{")


async def test_a_post_is_answered_ok_in_lower_case() -> None:
    """Engine.IO: a successful POST is answered 200 with the body `ok` (it was `OK`)."""
    async with running_feed(BASE) as feed, aiohttp.ClientSession() as http:
        sid = await open_session(http, feed)
        async with http.post(f"{feed.url}{POLL}&sid={sid}", data="40") as response:
            assert response.status == 200
            assert await response.text() == "ok"


async def test_a_second_get_poll_while_one_waits_gets_400_and_ends_the_session() -> None:
    """Engine.IO: a client MUST NOT have two GETs waiting; the server answers the second 400
    and closes the session. Both used to wait, and a packet went to whichever the queue woke:
    to a request the client had abandoned, it was lost without a trace."""
    async with running_feed(BASE) as feed, aiohttp.ClientSession() as http:
        sid = await open_session(http, feed)
        url = f"{feed.url}{POLL}&sid={sid}"

        async def get(suffix: str = "") -> tuple[int, str]:
            async with http.get(url + suffix) as response:
                return response.status, await response.text()

        first = asyncio.create_task(get())
        socket = feed.app.sio.eio.sockets[sid]
        await wait_until(lambda: poll_waits(socket), WAIT, "the first GET waits in the server")
        status, _ = await asyncio.wait_for(get("&t=second"), WAIT)
        assert status == 400
        # The waiting poll is told the session closed (Engine.IO's close packet).
        assert await asyncio.wait_for(first, WAIT) == (200, "1")
        assert (await get())[0] == 400  # the session is gone
        assert sid not in feed.app.sio.eio.sockets


async def test_a_poll_ended_by_an_aborted_close_gets_a_noop_not_an_empty_body() -> None:
    """A client's close packet (`1`) ends its session at once: the poll waiting meanwhile got
    a 200 with an empty body, which is no Engine.IO payload (socket.io-client's parser reads
    it as an error packet). It gets a NOOP (`6`), as the protocol's own suite expects."""
    async with running_feed(BASE) as feed, aiohttp.ClientSession() as http:
        sid = await open_session(http, feed)
        url = f"{feed.url}{POLL}&sid={sid}"

        async def get() -> tuple[int, str]:
            async with http.get(url) as response:
                return response.status, await response.text()

        waiting = asyncio.create_task(get())
        socket = feed.app.sio.eio.sockets[sid]
        await wait_until(lambda: poll_waits(socket), WAIT, "the GET waits in the server")
        async with http.post(url, data="1") as response:
            assert response.status == 200
        assert await asyncio.wait_for(waiting, WAIT) == (200, "6")
        assert (await get())[0] == 400


async def test_a_second_websocket_during_an_upgrade_is_refused_and_the_first_keeps_the_session() -> (
    None
):
    """Engine.IO: a client MUST NOT open a second websocket for a session; the server MUST
    close it. One opened while the first was still probing was accepted and probed too, and
    once it sent its `5` it took the session over: the Socket.IO connect answer to a `40` sent
    on the first websocket went to the second."""
    async with running_feed(BASE) as feed, aiohttp.ClientSession() as http:
        sid = await open_session(http, feed)
        first = await probe(feed, sid)
        with pytest.raises(websockets.InvalidStatus):
            await connect(
                f"{ws_url(feed)}&sid={sid}", compression=None, proxy=None, open_timeout=WAIT
            )
        await first.send("5")
        await first.send("40")
        answer = await asyncio.wait_for(first.recv(), WAIT)
        assert isinstance(answer, str) and answer.startswith("40{"), answer
        # After the upgrade, too, another websocket (or a poll) for the session is refused.
        with pytest.raises(websockets.InvalidStatus):
            await connect(
                f"{ws_url(feed)}&sid={sid}", compression=None, proxy=None, open_timeout=WAIT
            )
        async with http.get(f"{feed.url}{POLL}&sid={sid}") as response:
            assert response.status == 400
        await first.close()


async def test_an_upgrade_without_a_waiting_poll_sends_no_noop_on_the_websocket() -> None:
    """The NOOP an upgrade queues ends a poll that waits; with none waiting it used to stay in
    the queue and went out as the websocket's first packet."""
    async with running_feed(BASE) as feed, aiohttp.ClientSession() as http:
        sid = await open_session(http, feed)
        ws = await probe(feed, sid)
        await ws.send("5")
        await ws.send("40")
        first = await asyncio.wait_for(ws.recv(), WAIT)
        assert isinstance(first, str) and first.startswith("40{"), first
        await ws.close()


async def test_an_unknown_namespace_is_refused_with_a_v5_connect_error_object() -> None:
    """Socket.IO v5: a CONNECT_ERROR's payload is an object with a `message`. python-socketio
    sent the bare string "Unable to connect" (v4's form); socket.io-client then reported a
    connect_error whose message was undefined. The client's session stays usable."""
    async with running_feed(BASE) as feed:
        ws = await connect(ws_url(feed), compression=None, proxy=None, open_timeout=WAIT)
        opened = await asyncio.wait_for(ws.recv(), WAIT)
        assert isinstance(opened, str) and opened.startswith("0{")
        await ws.send("40/random,")
        refused = await asyncio.wait_for(ws.recv(), WAIT)
        assert isinstance(refused, str) and refused.startswith("44/random,"), refused
        assert json.loads(refused[len("44/random,") :]) == {"message": "Invalid namespace"}
        await ws.send("40")
        connected = await asyncio.wait_for(ws.recv(), WAIT)
        assert isinstance(connected, str) and connected.startswith("40{"), connected
        # A second CONNECT to the namespace it is in: python-socketio's own string refusal,
        # in v5's form too.
        await ws.send("40")
        again = await asyncio.wait_for(ws.recv(), WAIT)
        assert isinstance(again, str) and again.startswith("44"), again
        assert isinstance(json.loads(again[2:]), dict), again
        await ws.close()


async def test_a_chunked_post_is_read_and_one_past_the_limit_refused() -> None:
    """HTTP/1.1 lets a client send a POST's body in chunks, without `Content-Length`.
    Engine.IO read a body by its `Content-Length` alone: it drained a chunked one, dropped it
    and answered `ok`, so the Socket.IO connect in it was lost without a word. It is read (up
    to `max_message_bytes`; past that 413, as a declared length is)."""
    async with running_feed(BASE) as feed, aiohttp.ClientSession() as http:
        sid = await open_session(http, feed)
        url = f"{feed.url}{POLL}&sid={sid}"

        async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
            for part in parts:
                yield part

        async with http.post(url, data=chunks(b"4", b"0")) as response:
            assert response.request_info.headers.get("Transfer-Encoding") == "chunked"
            assert response.status == 200
        async with http.get(url) as response:
            assert (await response.text()).startswith("40{")
        limit = feed.app.config.server.max_message_bytes
        async with http.post(url, data=chunks(b"4" + b"x" * limit, b"x")) as response:
            assert response.status == 413
        assert sid not in feed.app.sio.eio.sockets  # a message too large ends the session


async def test_a_second_post_while_one_is_under_way_gets_400_and_ends_the_session() -> None:
    """Engine.IO: a client MUST NOT have two POSTs under way; the server answers the second 400
    and closes the session. Both were served, their packets in whatever order the bodies
    completed: here the second POST's subscribe would have gone before the first's."""
    async with running_feed(BASE) as feed, aiohttp.ClientSession() as http:
        sid = await open_session(http, feed)
        async with http.post(f"{feed.url}{POLL}&sid={sid}", data="40") as response:
            assert response.status == 200
        async with http.get(f"{feed.url}{POLL}&sid={sid}") as response:
            assert (await response.text()).startswith("40{")
        body = b'420["subscribe",{"room":"mem:public.orders"}]'
        host, port = feed.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\n"
            f"Host: {host}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body[:10]  # the rest comes later: this POST is still being read
        )
        await writer.drain()
        socket = feed.app.sio.eio.sockets[sid]
        # (A server without the flag cannot say: the second POST then just follows.)
        await wait_until(
            lambda: getattr(socket, "posting", True), WAIT, "the first POST is being read"
        )
        async with http.post(
            f"{feed.url}{POLL}&sid={sid}", data='421["subscribe",{"room":"mem:public.orders:1"}]'
        ) as response:
            assert response.status == 400
        assert sid not in feed.app.sio.eio.sockets
        writer.write(body[10:])
        await writer.drain()
        # The first is answered (its session is gone: its subscribe reaches no one), and the
        # next request for the session is refused, which tells the client to reconnect.
        head = await asyncio.wait_for(reader.readline(), WAIT)
        assert head.startswith(b"HTTP/1.1 200"), head
        writer.close()
        async with http.get(f"{feed.url}{POLL}&sid={sid}") as response:
            assert response.status == 400
        assert not feed.hub.clients
        assert not feed.app.sio.manager.rooms.get("/", {}).get("mem:public.orders")
