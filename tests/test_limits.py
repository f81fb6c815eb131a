"""Limits: a client that stops reading is cut off with bounded memory while the others keep their
latency; subscribe rate, connections per identity, inbound size and origins are enforced."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time

import aiohttp
import pytest
import websockets
from websockets.asyncio.client import connect

from feed.app.config import parse_config
from feed.delivery.eio_websocket import Backlog
from feed.delivery.transport import SocketIOTransport
from feed.errors import ConfigError
from feed.security.limits import OutboundQueue, TokenBucket
from tests.auth_helpers import (
    BASE,
    TOKENS,
    jwt_config,
    make_jwt,
    raw_socketio,
    raw_subscribe,
    refusal,
    source,
    token_config,
    ws_url,
)
from tests.support.server import feed_client, running_feed
from tests.support.waiting import wait_until

QUEUE_LIMIT = 256 * 1024


STALLED = 3


async def test_clients_that_stop_reading_are_cut_off_and_others_keep_their_latency() -> None:
    config = BASE + f"[limits]\noutbound_queue_bytes = {QUEUE_LIMIT}\n"
    async with running_feed(config) as feed:
        db = source(feed)
        sockets = feed.app.sio.eio.sockets
        stalled = [await raw_socketio(feed) for _ in range(STALLED)]
        for ws, _ in stalled:
            assert (await raw_subscribe(ws, "mem:public.orders"))["ok"]
        queues = [sockets[eio_sid].queue for _, eio_sid in stalled]
        # Websockets hold packets only while their transport is paused, in a bounded Backlog.
        assert all(isinstance(q, Backlog) and q.limit == QUEUE_LIMIT for q in queues)
        stalled_sids = set(feed.hub.clients)
        async with feed_client(feed.url) as normal:
            assert (await normal.subscribe("mem:public.orders"))["ok"]
            latencies: list[float] = []
            queued: list[int] = []
            written = 0
            # ~2 KB of incompressible data per change; the stalled clients read none of it.
            while any(eio_sid in sockets for _, eio_sid in stalled) and written < 20_000:
                started = time.monotonic()
                for _ in range(50):
                    written += 1
                    db.write(
                        "public.orders", "insert", {"id": written, "blob": os.urandom(1024).hex()}
                    )
                got = await normal.take(50, timeout=10)
                latencies.append(time.monotonic() - started)
                queued.append(sum(socket.queue.bytes for socket in list(sockets.values())))
                assert got[-1]["key"] == written
            assert not any(eio_sid in sockets for _, eio_sid in stalled), f"after {written}"
            cut_at = written
            for _ in range(5):  # and the normal client is as fast after the cut as before
                started = time.monotonic()
                for _ in range(50):
                    written += 1
                    db.write("public.orders", "insert", {"id": written, "blob": "x"})
                await normal.take(50, timeout=10)
                latencies.append(time.monotonic() - started)
        # Memory held for clients never exceeded the limits, however much was written.
        assert all(q.overflowed and q.peak <= QUEUE_LIMIT for q in queues)
        assert max(queued) <= STALLED * QUEUE_LIMIT + 64 * 1024, max(queued)
        assert not stalled_sids & set(feed.hub.clients)
        assert all(not stalled_sids & room.members for room in feed.hub.rooms.values())
        assert max(latencies) < 2.0, latencies
        assert f"feed_slow_clients_cut_total {STALLED}" in feed.hub.metrics.render()
        # The stalled connections themselves are gone: reading ends with the close.
        for ws, _ in stalled:
            with pytest.raises(websockets.ConnectionClosed):
                async with asyncio.timeout(10):
                    while True:
                        await ws.recv()
        assert cut_at > 50  # the stalled clients were really subscribed and got data first


async def test_outbound_queue_memory_is_bounded_by_bytes() -> None:
    cut: list[OutboundQueue] = []
    queue = OutboundQueue(1000, cut.append)

    class Packet:
        def __init__(self, data: str) -> None:
            self.data = data

    for _ in range(100):
        queue.put_nowait(Packet("x" * 100))
    assert queue.qsize() == 6 and queue.bytes <= 1000 and cut == [queue]
    queue.put_nowait(None)  # the writer's stop sentinel always gets through
    assert queue.qsize() == 7
    queue.get_nowait()
    assert queue.bytes == 5 * 164


async def test_subscribe_rate_is_limited_per_client() -> None:
    config = BASE + "[limits]\nsubscribe_rate = 0.5\nsubscribe_burst = 3\n"
    async with running_feed(config) as feed, feed_client(feed.url) as client:
        acks = [await client.subscribe("mem:public.orders") for _ in range(4)]
        assert [a["ok"] for a in acks] == [True, True, True, False]
        assert acks[3]["error"]["code"] == "rate_limited"
        async with feed_client(feed.url) as other:  # a budget per client, not global
            assert (await other.subscribe("mem:public.orders"))["ok"]


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=10, burst=2)
    assert bucket.take() and bucket.take() and not bucket.take()
    bucket.updated -= 0.1
    assert bucket.take() and not bucket.take()


async def test_connections_per_identity() -> None:
    config = token_config() + "[limits]\nconnections_per_identity = 2\n"
    auth = {"token": TOKENS["acme-svc"]}
    async with running_feed(config) as feed:
        async with feed_client(feed.url, auth=auth), feed_client(feed.url, auth=auth):
            reason = await refusal(feed.url, auth)
            assert reason["data"]["code"] == "too_many_connections"
            async with feed_client(feed.url, auth={"token": TOKENS["ops"]}):
                pass  # another identity is not affected
        async with feed_client(feed.url, auth=auth), feed_client(feed.url, auth=auth):
            pass  # closed connections are given back
        await wait_until(lambda: feed.app.connections.counts == {}, what="connections released")


async def test_a_jwt_subject_named_like_a_static_token_has_its_own_allowance() -> None:
    """Limits count identities by where their name comes from: a JWT whose `sub` is "ops"
    is not the static token named "ops", and must not use up its connections (before, three
    such JWTs locked the operators out with too_many_connections)."""
    config = jwt_config() + "[limits]\nconnections_per_identity = 1\n"
    async with running_feed(config) as feed:
        impostor = {"token": make_jwt(sub="ops")}
        async with feed_client(feed.url, auth=impostor):
            assert (await refusal(feed.url, impostor))["data"]["code"] == "too_many_connections"
            async with feed_client(feed.url, auth={"token": TOKENS["ops"]}) as ops:
                assert (await ops.call("catalog"))["ok"]


async def test_every_request_is_rate_limited_and_a_flood_ends_the_connection() -> None:
    """`catalog` and unknown events cost a request like `subscribe` (before, a client could
    send them without end and slow every other client of the node); a client that goes on
    sending after a hundred `rate_limited` answers in a row is disconnected."""
    config = BASE + "[limits]\nsubscribe_rate = 0.5\nsubscribe_burst = 3\n"
    async with running_feed(config) as feed, feed_client(feed.url) as client:
        acks = [await client.call("catalog") for _ in range(3)]
        acks += [await client.call("no-such-event"), await client.call("catalog")]
        assert [a.get("ok", False) for a in acks] == [True, True, True, False, False]
        assert [a["error"]["code"] for a in acks[3:]] == ["rate_limited", "rate_limited"]
        gone = asyncio.Event()
        client.sio.on("disconnect", lambda *args: gone.set())
        for _ in range(120):
            await client.sio.emit("catalog", {})
        await asyncio.wait_for(gone.wait(), 10)
        metrics = feed.hub.metrics.render()
        assert 'feed_client_errors_total{kind="flood"} 1' in metrics, metrics
        async with feed_client(feed.url) as other:  # the server is fine
            assert (await other.call("catalog"))["ok"]


async def test_an_oversized_message_ends_the_connection() -> None:
    config = BASE.replace("[server]", "[server]\nmax_message_bytes = 4096")
    async with running_feed(config) as feed, feed_client(feed.url) as client:
        gone = asyncio.Event()
        client.sio.on("disconnect", lambda *args: gone.set())
        await client.sio.emit("subscribe", {"room": "mem:public.orders", "filter": "a" * 10_000})
        await asyncio.wait_for(gone.wait(), 10)
        assert not feed.hub.clients
        # uvicorn's frame parser refuses it before Engine.IO sees it: it was not counted, so an
        # operator saw neither a metric nor a log line for a client sending too much.
        await wait_until(
            lambda: 'feed_client_errors_total{kind="oversized"} 1' in feed.hub.metrics.render()
        )


async def test_a_text_frame_that_is_not_utf8_is_counted_as_a_bad_packet(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """uvicorn closes such a websocket (1007) itself: counted as documented, and its ERROR with
    a traceback (any client could write one per message into the log) is left out."""
    caplog.set_level(logging.INFO)
    uvicorn_log = logging.getLogger("uvicorn.error")  # uvicorn's config stops it at "uvicorn"
    async with running_feed(BASE) as feed:
        uvicorn_log.addHandler(caplog.handler)  # after uvicorn configured its logging
        try:
            ws, _ = await raw_socketio(feed)
            async with ws:
                await ws.send(b'42["catalog","\xff\xfe"]', text=True)
                with pytest.raises(websockets.ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 10)
            await wait_until(
                lambda: 'feed_client_errors_total{kind="bad_packet"} 1' in feed.hub.metrics.render()
            )
        finally:
            uvicorn_log.removeHandler(caplog.handler)
    loud = [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not loud, loud
    assert any("not UTF-8" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("allowed", "origin", "accepted"),
    [
        (None, "http://evil.example", False),
        (None, "same", True),
        (["https://app.example"], "https://app.example", True),
        (["https://app.example"], "http://evil.example", False),
        (["*"], "http://evil.example", True),
    ],
)
async def test_origins(allowed: list[str] | None, origin: str, accepted: bool) -> None:
    config = BASE
    if allowed is not None:
        config = config.replace(
            "[server]", f"[server]\ncors_allowed_origins = {json.dumps(allowed)}"
        )
    async with running_feed(config) as feed:
        header = feed.url if origin == "same" else origin
        try:
            async with connect(
                ws_url(feed), additional_headers={"Origin": header}, proxy=None, open_timeout=5
            ) as ws:
                opened = await asyncio.wait_for(ws.recv(), 5)
                result = isinstance(opened, str) and opened.startswith("0")
        except websockets.InvalidStatus:
            result = False
        assert result is accepted


async def test_a_long_polling_client_that_stops_polling_is_cut_off_too() -> None:
    config = BASE + f"[limits]\noutbound_queue_bytes = {QUEUE_LIMIT}\n"
    async with running_feed(config) as feed, aiohttp.ClientSession() as http:
        db = source(feed)
        base = feed.url + "/socket.io/?EIO=4&transport=polling"

        async def get(sid: str) -> str:
            async with http.get(f"{base}&sid={sid}", timeout=aiohttp.ClientTimeout(10)) as r:
                return await r.text()

        async def post(sid: str, body: str) -> None:
            async with http.post(f"{base}&sid={sid}", data=body) as r:
                assert r.status == 200

        async with http.get(base) as response:
            eio_sid = json.loads((await response.text())[1:])["sid"]
        await post(eio_sid, "40")
        assert (await get(eio_sid)).startswith("40")
        await post(eio_sid, "420" + json.dumps(["subscribe", {"room": "mem:public.orders"}]))
        assert '"ok":true' in (await get(eio_sid)).replace(" ", "")
        queue = feed.app.sio.eio.sockets[eio_sid].queue
        sent = feed.hub.transport
        assert isinstance(sent, SocketIOTransport)
        written = 0
        while eio_sid in feed.app.sio.eio.sockets and written < 2_000:
            written += 1
            db.write("public.orders", "insert", {"id": written, "blob": "x" * 2048})
            if written % 50 == 0:  # routed in `write` (the hub's sink), sent at the pass's end
                await wait_until(
                    lambda: db._delivered == db._written and not sent.buffered,
                    what="writes routed and sent",
                )
        assert eio_sid not in feed.app.sio.eio.sockets
        assert queue.overflowed and queue.peak <= QUEUE_LIMIT
        assert written < 200  # no socket buffers in between: the queue limit alone decides
        assert not feed.hub.clients


def test_limits_config_errors_name_the_key() -> None:
    with pytest.raises(
        ConfigError, match=r"limits\.outbound_queue_bytes: must be from 16384 to 1073741824"
    ):
        parse_config(BASE + "[limits]\noutbound_queue_bytes = 10\n", "feed.toml", {})
    with pytest.raises(ConfigError, match=r"limits\.subscribe_burts: is not a known setting"):
        parse_config(BASE + "[limits]\nsubscribe_burts = 10\n", "feed.toml", {})
    assert parse_config(BASE, "feed.toml", {}).limits.outbound_queue_bytes == 8 * 1024 * 1024
