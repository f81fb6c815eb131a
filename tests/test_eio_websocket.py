"""feed.delivery.eio_websocket: websocket clients run on one task each, pings come from one pinger,
a dead client is still cut off within pingInterval + pingTimeout, and a client whose transport
pauses gets everything, in order, once it reads again. Real server, real Socket.IO clients."""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

import pytest
import uvicorn
import websockets
from websockets.asyncio.client import ClientConnection, connect

from feed.app.config import parse_config
from feed.app.server import FeedApp, QuietServer
from feed.delivery.eio_websocket import Backlog, LeanSocket
from tests.auth_helpers import BASE, raw_socketio, raw_subscribe, source, ws_url
from tests.support.server import WAIT, feed_client, listening_socket, port_of, running_feed
from tests.support.waiting import wait_until

ROOM = "mem:public.orders"
WS_PATH = "/socket.io/?EIO=4&transport=websocket"


async def open_raw(url: str) -> tuple[ClientConnection, str]:
    """A websocket-only Socket.IO client that does not answer Engine.IO pings by itself."""
    ws = await connect(url, compression=None, proxy=None, open_timeout=WAIT)
    opened = await asyncio.wait_for(ws.recv(), WAIT)
    assert isinstance(opened, str) and opened.startswith("0")
    await ws.send("40")
    connected = await asyncio.wait_for(ws.recv(), WAIT)
    assert isinstance(connected, str) and connected.startswith("40")
    return ws, json.loads(opened[1:])["sid"]


def seqs_in(frame: str) -> list[int]:
    if not frame.startswith("42"):
        return []
    name, data = json.loads(frame[2:])[:2]
    if name == "change":
        return [data["seq"]]
    if name == "changes":
        return [c["seq"] for c in data]
    return []


async def test_a_client_that_stops_answering_pings_is_cut_off_within_interval_plus_timeout() -> (
    None
):
    async with running_feed(BASE) as feed:
        eio = feed.app.sio.eio
        eio.ping_interval, eio.ping_timeout = 1, 1  # advertised to clients that connect now
        db = source(feed)
        async with feed_client(feed.url) as live:
            assert (await live.subscribe(ROOM))["ok"]
            started = time.monotonic()
            dead, eio_sid = await open_raw(ws_url(feed))
            frames: list[str] = []
            with pytest.raises(websockets.ConnectionClosed):
                async with asyncio.timeout(WAIT):
                    while True:  # read, but never answer a ping
                        frame = await dead.recv()
                        assert isinstance(frame, str)
                        frames.append(frame)
            elapsed = time.monotonic() - started
            assert frames[0] == "2", frames  # it was pinged...
            assert frames[-1] == "1", frames  # ...and told it was closed
            # Its pong was due 1 s after the ping, which was due 1 s after it connected.
            assert 1.8 <= elapsed <= 3.0, elapsed
            assert eio_sid not in eio.sockets
            assert len(feed.hub.clients) == 1
            # The client that answers its pings has met the same deadlines and is still here.
            db.write("public.orders", "insert", {"id": 1})
            assert (await live.next_change())["after"] == {"id": 1}
            assert live.sio.connected


async def test_websocket_clients_run_on_their_connection_task_alone() -> None:
    async with running_feed(BASE) as feed:
        clients = [await open_raw(ws_url(feed)) for _ in range(5)]
        try:
            for ws, _ in clients:
                assert (await raw_subscribe(ws, ROOM))["ok"]
            coros: list[Any] = [t.get_coro() for t in asyncio.all_tasks()]
            # One uvicorn task per websocket, and no Engine.IO writer, reader or ping tasks of
            # the server's. The suite shares one event loop, so an Engine.IO *client* of an
            # earlier test may still be winding down here: only server tasks count.
            names = [c.__qualname__ for c in coros]
            assert names.count("WebSocketsSansIOProtocol.run_asgi") == 5, names
            engineio = [
                c.__qualname__
                for c in coros
                if "/engineio/" in c.cr_code.co_filename
                and not c.cr_code.co_filename.endswith("client.py")
            ]
            assert not engineio, engineio
            sockets = feed.app.sio.eio.sockets
            assert all(type(sockets[sid]) is LeanSocket for _, sid in clients)
            assert all(sockets[sid].protocol is not None for _, sid in clients)
            # Handshake state is not kept once the client is connected: only its address, for
            # connections_per_address if it connects again on its session.
            for sid in list(feed.hub.clients):
                assert feed.app.sio.get_environ(sid) == {"feed.client_host": "127.0.0.1"}
        finally:
            for ws, _ in clients:
                await ws.close()


async def test_a_client_that_pauses_reading_gets_everything_in_order_when_it_resumes() -> None:
    async with running_feed(BASE) as feed:
        db = source(feed)
        ws, eio_sid = await raw_socketio(feed)  # tiny receive buffer, reads only when told
        try:
            assert (await raw_subscribe(ws, ROOM))["ok"]
            socket: Any = feed.app.sio.eio.sockets[eio_sid]
            assert isinstance(socket.queue, Backlog)
            total = 0
            while socket.queue.empty() and total < 5_000:
                for _ in range(20):
                    total += 1
                    db.write(
                        "public.orders", "insert", {"id": total, "blob": os.urandom(512).hex()}
                    )
                await wait_until(lambda: db._delivered == db._written, what="writes routed")
            assert not socket.queue.empty(), "the transport never paused"
            for _ in range(20):  # more while the backlog holds: they must queue behind it
                total += 1
                db.write("public.orders", "insert", {"id": total, "blob": "x"})
            got: list[int] = []
            async with asyncio.timeout(WAIT):
                while len(got) < total:
                    frame = await ws.recv()
                    assert isinstance(frame, str)
                    got.extend(seqs_in(frame))
            assert got == list(range(1, total + 1))
            assert socket.queue.empty() and socket.queue.bytes == 0
            assert socket.queue.peak > 0 and not socket.queue.overflowed
        finally:
            await ws.close()


async def test_under_another_websocket_implementation_engineio_handles_the_socket() -> None:
    """uvicorn's wsproto protocol is not the lean path's: Engine.IO's own handler serves the
    websocket, and the shared pinger still pings it and cuts it off when it stops answering."""
    pytest.importorskip("wsproto")
    config = parse_config(BASE, "test.toml", {})
    app = FeedApp(config)
    listener = listening_socket()
    port = port_of(listener)
    server = QuietServer(
        uvicorn.Config(
            app.asgi, host="127.0.0.1", port=port, log_level="warning", lifespan="on", ws="wsproto"
        )
    )
    task = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        await wait_until(lambda: server.started or task.done(), what="uvicorn started")
        assert server.started
        url = f"http://127.0.0.1:{port}"
        eio = app.sio.eio
        eio.ping_interval, eio.ping_timeout = 1, 1
        memory: Any = app.hub.connectors["mem"]
        async with feed_client(url) as live:
            assert (await live.subscribe(ROOM))["ok"]
            [socket] = eio.sockets.values()
            assert type(socket) is LeanSocket and socket.protocol is None
            dead, eio_sid = await open_raw(url.replace("http://", "ws://") + WS_PATH)
            frames: list[str] = []
            with pytest.raises(websockets.ConnectionClosed):
                async with asyncio.timeout(WAIT):
                    while True:
                        frame = await dead.recv()
                        assert isinstance(frame, str)
                        frames.append(frame)
            # Pinged, not answered, closed (Engine.IO's own close sends no `1` on a ping timeout).
            assert frames[0] == "2", frames
            assert eio_sid not in eio.sockets
            memory.write("public.orders", "insert", {"id": 1})
            assert (await live.next_change())["after"] == {"id": 1}
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(task, WAIT)
        finally:
            listener.close()


async def test_closing_a_paused_client_does_not_wait_and_its_backlog_goes_first() -> None:
    async with running_feed(BASE) as feed:
        db = source(feed)
        ws, eio_sid = await raw_socketio(feed)  # tiny receive buffer, reads only when told
        try:
            assert (await raw_subscribe(ws, ROOM))["ok"]
            socket: Any = feed.app.sio.eio.sockets[eio_sid]
            total = 0
            while socket.queue.empty() and total < 5_000:
                for _ in range(20):
                    total += 1
                    db.write(
                        "public.orders", "insert", {"id": total, "blob": os.urandom(512).hex()}
                    )
                await wait_until(lambda: db._delivered == db._written, what="writes routed")
            assert not socket.queue.empty(), "the transport never paused"
            [sid] = list(feed.hub.clients)
            # The server closes it while it is not reading (Socket.IO's disconnect, then the
            # Engine.IO connection's): neither may wait for the client.
            await asyncio.wait_for(feed.app.sio.disconnect(sid), 1.0)
            assert not feed.hub.clients
            await asyncio.wait_for(feed.app.sio.eio.disconnect(eio_sid), 1.0)
            assert eio_sid not in feed.app.sio.eio.sockets
            await ws.send('421["catalog"]')  # talking after the close changes nothing of that
            got: list[int] = []
            tail: list[str] = []
            with pytest.raises(websockets.ConnectionClosedOK):
                async with asyncio.timeout(WAIT):
                    while True:
                        frame = await ws.recv()
                        assert isinstance(frame, str)
                        got.extend(seqs_in(frame))
                        if not frame.startswith("42"):
                            tail.append(frame)
            # Everything it was sent, in order, then Socket.IO's and Engine.IO's goodbyes, then
            # the WebSocket close.
            assert got == list(range(1, total + 1))
            assert tail == ["41", "1"], tail
        finally:
            await ws.close()


async def test_a_stalled_client_misses_its_pong_deadline_and_loses_the_connection() -> None:
    """Not reading at all (its ping is stuck behind its backlog): cut off on the same deadline,
    and its TCP connection dropped rather than left waiting for it to take a close frame."""
    async with running_feed(BASE) as feed:
        eio = feed.app.sio.eio
        eio.ping_interval, eio.ping_timeout = 1, 1
        db = source(feed)
        started = time.monotonic()
        ws, eio_sid = await raw_socketio(feed)
        try:
            assert (await raw_subscribe(ws, ROOM))["ok"]
            socket: Any = eio.sockets[eio_sid]
            total = 0
            while socket.queue.empty() and total < 5_000:
                for _ in range(20):
                    total += 1
                    db.write(
                        "public.orders", "insert", {"id": total, "blob": os.urandom(512).hex()}
                    )
                await wait_until(lambda: db._delivered == db._written, what="writes routed")
            assert not socket.queue.empty(), "the transport never paused"
            await wait_until(lambda: eio_sid not in eio.sockets, timeout=WAIT, what="cut off")
            elapsed = time.monotonic() - started
            assert elapsed <= 3.0, elapsed
            assert not feed.hub.clients
            await wait_until(lambda: socket.protocol.disconnected, what="TCP connection dropped")
        finally:
            ws.transport.abort()  # nothing to say goodbye to
