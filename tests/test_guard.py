"""The server's edge (feed.security.guard) against the real server over real sockets: oversized
polling POSTs, slowloris, the connection cap, the Socket.IO handshake timeout, malformed packets."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets
from websockets.asyncio.client import connect

from feed.metrics import Metrics
from feed.security.guard import OPERATOR_RESERVE, ClientErrors
from tests.auth_helpers import BASE, TOKENS, source, token_config, ws_url
from tests.support.server import (
    FeedClient,
    PortTaken,
    RunningFeed,
    feed_client,
    on_free_port,
    running_feed,
)
from tests.support.waiting import wait_until

POLL = "/socket.io/?EIO=4&transport=polling"


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def port_of(feed: RunningFeed) -> int:
    return int(feed.url.rsplit(":", 1)[1])


async def open_session(http: aiohttp.ClientSession, feed: RunningFeed) -> str:
    async with http.get(feed.url + POLL) as response:
        sid: str = json.loads((await response.text())[1:])["sid"]
    async with http.post(f"{feed.url}{POLL}&sid={sid}", data="40") as response:
        assert response.status == 200
    return sid


async def raw_request(feed: RunningFeed, head: bytes, body: bytes = b"") -> bytes:
    """Send a request (maybe only part of its body); return the status line it got."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(feed))
    try:
        writer.write(head + body)
        await writer.drain()
        return await reader.readline()
    finally:
        writer.close()


async def test_an_oversized_polling_post_is_answered_413_at_once_and_memory_stays_flat() -> None:
    async with running_feed(BASE) as feed, aiohttp.ClientSession() as http:
        eio = feed.app.sio.eio
        body = b"4" + b"x" * (200 * 1024)  # three times max_message_bytes

        async def oversized(sid: str) -> float:
            head = (
                f"POST {POLL}&sid={sid} HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            started = time.monotonic()
            async with asyncio.timeout(1.0):  # an answer within a second, not never
                status = await raw_request(feed, head, body[: 64 * 1024])
            assert status.startswith(b"HTTP/1.1 413"), status
            return time.monotonic() - started

        sids = [await open_session(http, feed) for _ in range(10)]
        for sid in sids:
            await oversized(sid)
        assert not set(sids) & set(eio.sockets)  # each named session was closed and freed
        assert not feed.hub.clients
        before = rss_bytes()
        took = [await oversized(sids[i % 10] if i % 2 else "no-such-session") for i in range(500)]
        grown = rss_bytes() - before
        assert grown < 5 * 1024 * 1024, f"RSS grew {grown / 1e6:.1f} MB over 500 oversized POSTs"
        assert max(took) < 1.0
        # Nothing of them is left: no request task, no session, no open connection.
        server_state = feed.server.server_state
        assert not server_state.tasks, server_state.tasks
        assert f'feed_client_errors_total{{kind="oversized"}} {510}' in feed.hub.metrics.render()
        # A normal client is unaffected.
        async with feed_client(feed.url) as client:
            assert (await client.subscribe("mem:public.orders"))["ok"]
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 3.0  # shutdown is not held up by any of them


async def test_a_polling_post_within_the_limit_still_works_and_a_bad_length_gets_400() -> None:
    async with running_feed(BASE) as feed, aiohttp.ClientSession() as http:
        sid = await open_session(http, feed)
        payload = "42" + json.dumps(["subscribe", {"room": "mem:public.orders"}])
        async with http.post(f"{feed.url}{POLL}&sid={sid}", data=payload) as response:
            assert response.status == 200
        head = f"POST {POLL}&sid={sid} HTTP/1.1\r\nHost: localhost\r\nContent-Length: nine\r\n\r\n"
        assert (await raw_request(feed, head.encode())).startswith(b"HTTP/1.1 400")


SLOW = 30


async def test_slowloris_connections_are_closed_within_the_request_timeout() -> None:
    config = BASE + "[limits]\nrequest_timeout = 1.0\n"
    async with (
        running_feed(config) as feed,
        feed_client(feed.url) as normal,
        aiohttp.ClientSession() as http,
    ):
        db = source(feed)
        assert (await normal.subscribe("mem:public.orders"))["ok"]
        # A session per slow POST: two POSTs under way for one session are a protocol error,
        # answered 400 at once (tests/test_protocol_conformance.py), not a slowloris.
        sids = [await open_session(http, feed) for _ in range(SLOW)]

        async def slowloris(n: int) -> float:
            """A request whose headers (or, for odd n, body) trickle in and never end; the time
            until it is closed."""
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(feed))
            started = time.monotonic()
            if n % 2:
                head = f"POST {POLL}&sid={sids[n]} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 9000\r\n\r\n"
                writer.write(head.encode())
            else:
                writer.write(f"GET {POLL} HTTP/1.1\r\nHost: localhost\r\n".encode())
            try:
                for i in range(100):
                    writer.write(f"X-Slow-{i}: a\r\n".encode())
                    await writer.drain()
                    try:
                        got = await asyncio.wait_for(reader.read(1), 0.2)
                    except TimeoutError:
                        continue
                    assert got == b""  # closed, with nothing sent
                    break
            except ConnectionError:
                pass
            finally:
                writer.close()
            return time.monotonic() - started

        holding = [asyncio.create_task(slowloris(n)) for n in range(SLOW)]
        latencies = []
        for i in range(20):  # the normal client, meanwhile
            started = time.monotonic()
            db.write("public.orders", "insert", {"id": i})
            assert (await normal.next_change())["key"] == i
            latencies.append(time.monotonic() - started)
        closed_after = await asyncio.gather(*holding)
        assert max(closed_after) < 1.0 + 1.0, closed_after  # the timeout, plus a little
        assert max(latencies) < 0.5, latencies
        metrics = feed.hub.metrics.render()
        assert f'feed_client_errors_total{{kind="request_timeout"}} {SLOW}' in metrics


async def test_connections_past_the_cap_are_refused_and_existing_clients_keep_working(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="feed.guard")
    cap = 20
    config = BASE + f"[limits]\nmax_connections = {cap}\nrequest_timeout = 30\n"
    async with running_feed(config) as feed, feed_client(feed.url) as normal:
        db = source(feed)
        assert (await normal.subscribe("mem:public.orders"))["ok"]
        # With the normal client's websocket, the server is at its cap.
        idle = [await asyncio.open_connection("127.0.0.1", port_of(feed)) for _ in range(cap - 1)]
        try:
            refused = 0
            for _ in range(10):
                status = await asyncio.wait_for(
                    raw_request(feed, f"GET {POLL} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()), 5
                )
                refused += status.startswith(b"HTTP/1.1 503")
            assert refused == 10
            db.write("public.orders", "insert", {"id": 1})
            assert (await normal.next_change())["key"] == 1  # the connected client is served
            metrics = feed.hub.metrics.render()
            assert "feed_connections_refused_total 10" in metrics, metrics
            assert f"feed_connection_limit {cap}" in metrics
            assert f"feed_connections {cap}" in metrics
            # One line for the ten (the refused clients saw a 503; the log used to say nothing).
            lines = [r.getMessage() for r in caplog.records if "refused with 503" in r.getMessage()]
            assert len(lines) == 1, lines
            assert f"{cap} connections open, the cap is {cap}" in lines[0], lines[0]
        finally:
            for _, writer in idle:
                writer.close()
        # Below the cap again, new clients get in.
        async with asyncio.timeout(5):
            while True:
                status = await raw_request(
                    feed, f"GET {POLL} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
                )
                if not status.startswith(b"HTTP/1.1 503"):
                    break
        async with feed_client(feed.url) as late:
            assert (await late.subscribe("mem:public.orders"))["ok"]


async def test_at_the_cap_health_readiness_and_metrics_are_still_answered() -> None:
    """At the cap every new connection was refused before its request was read, `/healthz`
    included: a liveness probe failed and the orchestrator restarted a node that was only full,
    cutting off all its clients, and the scrape of `/metrics` failed just when
    `feed_connections` neared `feed_connection_limit` (the alert docs/operations.md advises).
    Past the cap, a few connections (`OPERATOR_RESERVE`) may still ask for `/healthz`,
    `/readyz` and `/metrics`; anything else, a websocket upgrade too, gets the 503."""
    cap = 10
    config = BASE + f"[limits]\nmax_connections = {cap}\nrequest_timeout = 30\n"
    async with running_feed(config) as feed:
        idle = [await asyncio.open_connection("127.0.0.1", port_of(feed)) for _ in range(cap)]
        try:
            for path in ("/healthz", "/readyz", "/metrics"):
                for _ in range(3):  # one after another: each its own connection past the cap
                    status = await asyncio.wait_for(
                        raw_request(
                            feed, f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
                        ),
                        5,
                    )
                    assert status.startswith(b"HTTP/1.1 200"), (path, status)
            for head in (
                f"GET {POLL} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode(),
                b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
                b"POST /healthz HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n",
            ):
                status = await asyncio.wait_for(raw_request(feed, head), 5)
                assert status.startswith(b"HTTP/1.1 503"), (head, status)
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with asyncio.timeout(5):
                    await connect(ws_url(feed), proxy=None)
            assert refused.value.response.status_code == 503
            assert "feed_connections_refused_total 4" in feed.hub.metrics.render()
            # Past the reserve too, even a probe is refused: descriptors stay bounded.
            held = [
                await asyncio.open_connection("127.0.0.1", port_of(feed))
                for _ in range(OPERATOR_RESERVE)
            ]
            try:
                status = await asyncio.wait_for(
                    raw_request(feed, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"), 5
                )
                assert status.startswith(b"HTTP/1.1 503"), status
            finally:
                for _, writer in held:
                    writer.close()
        finally:
            for _, writer in idle:
                writer.close()


async def test_an_engineio_session_that_never_connects_socketio_is_closed() -> None:
    config = BASE + "[limits]\nhandshake_timeout = 0.5\n"
    async with running_feed(config) as feed:
        async with connect(ws_url(feed), proxy=None) as ws:
            opened = await asyncio.wait_for(ws.recv(), 5)
            assert isinstance(opened, str) and opened.startswith("0")
            started = time.monotonic()
            with pytest.raises(websockets.ConnectionClosed):
                async with asyncio.timeout(5):
                    while True:
                        await ws.recv()
            assert time.monotonic() - started < 2.0
        assert 'feed_client_errors_total{kind="handshake_timeout"} 1' in (feed.hub.metrics.render())
        async with feed_client(feed.url) as client:  # one that does connect is kept
            await asyncio.sleep(0.8)  # past the handshake timeout: it must still be there
            assert (await client.subscribe("mem:public.orders"))["ok"]


async def test_sessions_that_have_not_connected_yet_are_capped_and_others_still_connect() -> None:
    """Opening long-polling sessions costs no TCP connection and no token: one client opened
    39,000 in 20 s, each kept for `handshake_timeout`, and the server grew by 280 MB (kept
    after they closed), its clients' p99 latency at 800 ms. Past `max_handshakes` a new one
    gets 503; a session that connects makes room at once."""
    async with running_feed(BASE) as feed, aiohttp.ClientSession() as http:
        cap = feed.app.config.limits.max_handshakes
        assert cap == 1000
        gate = asyncio.Semaphore(20)

        async def open_one() -> int:
            async with gate, http.get(feed.url + POLL) as response:
                await response.read()
                return response.status

        statuses = await asyncio.gather(*(open_one() for _ in range(cap + 20)))
        assert statuses.count(200) == cap and statuses.count(503) == 20, statuses
        assert len(feed.app.sio.eio.sockets) == cap
        metrics = feed.hub.metrics.render()
        assert 'feed_client_errors_total{kind="too_many_handshakes"} 20' in metrics
        async with http.get(feed.url + POLL) as response:
            assert response.status == 503
            assert "handshake" in await response.text()
        # A client that connects (at once, as every Socket.IO client does) is not held up by
        # the sessions before it once one of them connects.
        sid = next(iter(feed.app.sio.eio.sockets))
        async with http.post(feed.url + POLL + f"&sid={sid}", data="40") as response:
            assert response.status == 200
        async with feed_client(feed.url) as client:
            assert (await client.subscribe("mem:public.orders"))["ok"]


MALFORMED_POLLING: list[bytes] = [
    b"x",  # a junk Engine.IO type byte
    b"9",  # an Engine.IO type that does not exist
    b"\xff\xfe\xfd",  # not UTF-8
    b"4\xc3\x28",  # invalid UTF-8 inside a message
    b'42["subscribe", {',  # bad JSON
    b'451-["subscribe",{"_placeholder":true,"num":0}]',  # claims a binary attachment
    b"49",  # a Socket.IO type that does not exist
    b'42"subscribe"',  # an event that is not a list
    b"425",  # an event that is a number
    b"44{}",  # CONNECT_ERROR from a client
]


async def test_malformed_packets_are_counted_and_logged_once_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with running_feed(BASE) as feed, aiohttp.ClientSession() as http:
        for body in MALFORMED_POLLING:
            sid = await open_session(http, feed)
            async with http.post(f"{feed.url}{POLL}&sid={sid}", data=body) as response:
                assert response.status in (200, 400), (body, response.status)
            sockets = feed.app.sio.eio.sockets
            await wait_until(lambda: sid not in sockets, 5, "the session ended")  # noqa: B023
        async with connect(ws_url(feed), proxy=None) as ws:  # and over a websocket
            await ws.recv()
            await ws.send("40")
            await ws.recv()
            await ws.send(b"\x00\x01binary")
            with pytest.raises(websockets.ConnectionClosed):
                async with asyncio.timeout(5):
                    while True:
                        await ws.recv()
        # Valid JSON, not valid Unicode: a lone surrogate escape, in the connect's own auth
        # (no credentials needed to send it) and in a request. Each used to end in a traceback
        # deep in a handler (hashing the token, quoting a filter), with no answer at all for
        # the connect.
        for packets in ([r'40{"token":"\ud800"}'], ["40", r'421["subscribe",{"room":"a:\udfff"}]']):
            async with connect(ws_url(feed), proxy=None) as ws:
                await ws.recv()
                for packet in packets:
                    await ws.send(packet)
                with pytest.raises(websockets.ConnectionClosed):
                    async with asyncio.timeout(5):
                        while True:
                            await ws.recv()
        metrics = feed.hub.metrics.render()
        counted = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith('feed_client_errors_total{kind="bad_')
        )
        assert counted == len(MALFORMED_POLLING) + 3, metrics
        async with feed_client(feed.url) as client:  # the server is fine
            assert (await client.subscribe("mem:public.orders"))["ok"]
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], [
        r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR
    ]
    warnings = [r for r in caplog.records if r.name == "feed.guard"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


ROOM_LIMITS = "[limits]\nrooms_per_identity = 50\nmax_rooms = 120\n"


def room_config() -> str:
    return (
        token_config().replace("filter_room_grace = 0.2", "filter_room_grace = 300") + ROOM_LIMITS
    )


async def subscribe_filters(client: FeedClient, start: int, count: int) -> list[dict[str, Any]]:
    return [
        await client.subscribe("mem:public.orders", filter=f"id=eq.{i}")
        for i in range(start, start + count)
    ]


async def test_filter_rooms_are_bounded_per_identity_and_grace_kept_rooms_count() -> None:
    async with running_feed(room_config()) as feed:
        ops = {"token": TOKENS["ops"]}
        hub = feed.hub
        async with feed_client(feed.url, auth=ops) as first:
            assert all(a["ok"] for a in await subscribe_filters(first, 0, 50))
            refused = await first.subscribe("mem:public.orders", filter="id=eq.999")
            assert refused["ok"] is False and refused["error"]["code"] == "too_many_rooms"
            assert "rooms_per_identity" in refused["error"]["message"]
            # Rows rooms count too; a room it already has is no new room.
            assert (await first.subscribe("mem:public.orders:7"))["error"]["code"] == (
                "too_many_rooms"
            )
            assert (await first.subscribe("mem:public.orders", filter="id=eq.3"))["ok"]
        # Gone, its 50 rooms stay for their grace, charged to ops; a new ops connection with
        # new filters makes them expire early instead of adding to them. Three rounds.
        for round_ in range(1, 4):
            async with feed_client(feed.url, auth=ops) as again:
                acks = await subscribe_filters(again, 100 * round_, 50)
                assert all(a["ok"] for a in acks), [a for a in acks if not a["ok"]][:1]
                assert hub.budget.charged("token:ops") == 50
            assert len([r for r in hub.rooms.values() if r.filter is not None]) == 50
        assert hub.metrics.value("feed_rooms_evicted_total") == 150
        assert hub.metrics.value("feed_rooms_refused_total", reason="identity") == 2


async def test_rooms_an_identity_left_idle_are_bounded_when_they_go_idle() -> None:
    """A room nobody follows is kept for its grace and still numbers and buffers every change
    it matches, for a client that comes back. One client churning through filters that match
    every change (`amount=neq.<n>`) left 5,000 of them, its identity's whole allowance: each
    change then cost 15 to 20 ms of routing on one node, and on a 2-node cluster an XADD per
    room, Redis grew to 1.1 GB in 40 s and the other clients' latency to 13 s. An identity now
    keeps at most `idle_rooms_per_identity` idle rooms; past it, its oldest idle one goes at
    once (a client that comes back to it gets `recovered: false` rather than the changes)."""
    config = token_config().replace("filter_room_grace = 0.2", "filter_room_grace = 300")
    async with running_feed(config) as feed:
        hub = feed.hub
        cap = feed.app.config.limits.idle_rooms_per_identity
        assert cap == 500
        ops = {"token": TOKENS["ops"]}
        followers = [await FeedClient().connect(feed.url, auth=ops) for _ in range(5)]
        try:
            async with feed_client(feed.url, auth=ops) as churner:
                acks = await subscribe_filters(churner, 10_000, 40)
                for ack in acks:
                    assert (await churner.call("unsubscribe", {"room": ack["room"]}))["ok"]
            for n, follower in enumerate(followers):
                acks = await subscribe_filters(follower, 100 * n, 100)
                assert all(a["ok"] for a in acks), [a for a in acks if not a["ok"]][:1]
            assert len(hub.budget) == 540
        finally:
            for follower in followers:
                await follower.close()
        # 540 idle: the 40 that went idle first are gone at once, not after their grace.
        await wait_until(lambda: not hub.clients, 5, "the followers gone")
        assert len(hub.budget) == cap
        assert hub.metrics.value("feed_rooms_evicted_total") == 40
        left = {room.filter.canonical for room in hub.rooms.values() if room.filter is not None}
        assert left == {f"id=eq.{i}" for i in range(500)}


async def test_a_resume_into_a_room_made_anew_is_not_recovered() -> None:
    """A client that saw nothing in its filter room resumes with `since: 0`. Its room went
    meanwhile (its grace ended, or it was the identity's idle room too many) after numbering a
    change, and the subscribe made a new one at 0: the answer was `recovered: true`, and the
    change the old room numbered was lost without a word. Nothing says what the old room held,
    so the answer is `recovered: false` (the client reloads)."""
    async with running_feed(BASE) as feed:  # filter_room_grace = 0.2
        hub = feed.hub
        async with feed_client(feed.url) as client:
            ack = await client.subscribe("mem:public.orders", filter="id=gt.0")
            assert ack["ok"] and ack["seq"] == 0
            room, epoch = ack["room"], ack["epoch"]
        await wait_until(lambda: not hub.clients, 5, "the client gone")
        source(feed).write("public.orders", "insert", {"id": 1})
        await wait_until(lambda: hub.rooms.get(room) is None, 5, "its room expired")
        async with feed_client(feed.url) as client:
            ack = await client.subscribe(room, since=0, epoch=epoch)
            assert ack["ok"] and ack["recovered"] is False, ack
            # A room that is still there resumes as before.
            again = await client.subscribe(room, since=0, epoch=epoch)
            assert again["recovered"] is True, again


async def test_rooms_in_total_are_bounded_and_idle_ones_make_way() -> None:
    async with running_feed(room_config()) as feed:
        auth = {who: {"token": TOKENS[who]} for who in ("ops", "acme-svc", "globex-svc")}
        async with (
            feed_client(feed.url, auth=auth["ops"]) as ops,
            feed_client(feed.url, auth=auth["acme-svc"]) as acme,
        ):
            assert all(a["ok"] for a in await subscribe_filters(acme, 0, 50))
            async with feed_client(feed.url, auth=auth["globex-svc"]) as globex:
                assert all(a["ok"] for a in await subscribe_filters(globex, 0, 50))
                assert all(a["ok"] for a in await subscribe_filters(ops, 0, 20))
                assert len(feed.hub.budget) == 120
                busy = await ops.subscribe("mem:public.orders", filter="id=eq.500")
                assert busy["ok"] is False and busy["error"]["code"] == "server_busy", busy
            # globex left: its rooms are idle now, and the oldest makes way for a new one.
            assert (await ops.subscribe("mem:public.orders", filter="id=eq.500"))["ok"]
            assert len(feed.hub.budget) == 120
            assert feed.hub.budget.charged("token:globex-svc") == 49
            # A flood of new filters by one identity never takes more than its share.
            for _ in range(3):
                async with feed_client(feed.url, auth=auth["acme-svc"]) as flood:
                    acks = await subscribe_filters(flood, 1000, 60)
                    assert {a["error"]["code"] for a in acks if not a["ok"]} <= {
                        "too_many_rooms",
                        "server_busy",
                    }
                assert len(feed.hub.budget) <= 120
                assert feed.hub.budget.charged("token:acme-svc") <= 50


def test_the_left_out_count_does_not_pin_other_kinds_on_the_logged_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The rate-limited line said "(1 more since the last such line)" after a bad_request when
    what it had left out was a bad_packet: an operator read it as more of the same kind."""
    caplog.set_level(logging.WARNING, logger="feed.guard")
    errors = ClientErrors(Metrics(), interval=3600)
    errors.report("bad_packet", "junk")
    errors.report("handshake_timeout", "left out, within the interval")
    errors._last -= 3600  # the interval has passed
    errors.report("bad_request", "Invalid session x")
    last = caplog.records[-1].getMessage()
    assert last.startswith("client error (bad_request): Invalid session x"), last
    assert "1 more client errors of any kind since the last line" in last, last


async def test_a_cap_above_the_open_file_limit_is_lowered_to_it_with_a_warning(
    tmp_path: Path,
) -> None:
    """With `max_connections` above the open-file limit, connections past the limit were reset
    without an answer and nothing was logged: the cap was no cap. The server now serves at most
    what the limit allows (503 past it, as documented) and says so when it starts."""
    config = tmp_path / "feed.toml"
    config.write_text(
        "[limits]\nmax_connections = 100000\n\n"
        "[[connectors]]\nname = 'mem'\ntype = 'memory'\ntargets = ['public.orders']\n"
    )

    def low_limit() -> None:
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (300, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        )

    async def start(port: int) -> tuple[asyncio.subprocess.Process, int, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "feed", "serve", "--config", str(config), "--port", str(port),
            stderr=asyncio.subprocess.PIPE, preexec_fn=low_limit,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
        )  # fmt: skip
        assert process.stderr is not None
        lines: list[str] = []
        async with asyncio.timeout(30):
            while "Uvicorn running" not in (line := (await process.stderr.readline()).decode()):
                if not line:
                    await process.wait()
                    if "already in use" in "".join(lines).lower():
                        raise PortTaken("".join(lines))
                    raise AssertionError("".join(lines))
                lines.append(line)
        return process, port, "".join(lines)

    process, port, started = await on_free_port(start)
    try:
        assert "max_connections = 100000 is more than the open-file limit allows (300" in started
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                assert "feed_connection_limit 200\n" in await response.text()
            # Past the cap: a 503, not a reset.
            idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(200)]
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(f"GET {POLL} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
                assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 503")
                writer.close()
            finally:
                for _, w in idle:
                    w.close()
    finally:
        process.terminate()
        await process.wait()


async def test_requests_that_are_not_http_are_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """uvicorn logged "Invalid HTTP request received." at WARNING for each one, uncounted: any
    client could write a line per request into the log. They are now client errors
    (`bad_request`), with at most one line per 10 s."""
    caplog.set_level(logging.INFO)
    uvicorn_log = logging.getLogger("uvicorn.error")  # uvicorn's config stops it at "uvicorn"
    async with running_feed(BASE) as feed:
        uvicorn_log.addHandler(caplog.handler)  # after uvicorn configured its logging
        try:
            for _ in range(5):
                status = await asyncio.wait_for(raw_request(feed, b"GARBAGE\r\n\r\n"), 5)
                assert status.startswith(b"HTTP/1.1 400"), status
            metrics = feed.hub.metrics.render()
            assert 'feed_client_errors_total{kind="bad_request"} 5' in metrics, metrics
        finally:
            uvicorn_log.removeHandler(caplog.handler)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1, lines
    assert lines[0].startswith("client error (bad_request): a request that is not HTTP"), lines
