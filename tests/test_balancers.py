"""Nodes behind deploy/haproxy.cfg, as an operator runs them: what clients see through it.

Each test runs `feed serve` processes of one cluster behind HAProxy started from the deploy
file (tests/support/cluster.py's LoadBalancer), with the deploy file's own health-check timings
where they matter: a node stopping for a deploy, TLS at the balancer, the client's address.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import socketio

from tests.support import redis as redis_support
from tests.support.balancers import (
    cluster_nodes,
    node_behind,
    request_lines,
    self_signed,
    websocket_status,
)
from tests.support.cluster import FeedNode, LoadBalancer, deploy_checks, haproxy_binary, listens_on
from tests.support.redis import RedisTarget
from tests.support.server import free_port
from tests.support.waiting import wait_until

pytestmark = [
    pytest.mark.redis,
    pytest.mark.timeout(120),
    pytest.mark.skipif(haproxy_binary() is None, reason="haproxy missing: apt-get install haproxy"),
]

redis_target = redis_support.redis_target
ROOM = "mem:public.orders"
WAIT = 30.0


@contextlib.asynccontextmanager
async def nodes_behind_haproxy(
    redis_target: RedisTarget, tmp_path: Path, extra: str = "", **balancer: Any
) -> AsyncIterator[tuple[list[FeedNode], LoadBalancer]]:
    """Two nodes of one cluster (memory connectors) behind the deploy file's HAProxy."""
    async with cluster_nodes(redis_target, tmp_path, extra=extra) as nodes:
        lb = LoadBalancer(tmp_path, [(n.name, n.port) for n in nodes], **balancer)
        try:
            yield nodes, await lb.start()
        finally:
            await lb.stop()


async def test_clients_of_a_node_stopping_for_a_deploy_move_to_another_at_once(
    redis_target: RedisTarget, tmp_path: Path
) -> None:
    """SIGTERM of the node a client's address sticks to (a rolling deploy): the client is
    disconnected and must land on another node at its first reconnect, and resume there.

    Until the balancer's checks see the node gone (`fall` x `inter`: 6 s with the deploy
    file's), `balance source` still picks it; without `option redispatch` HAProxy retried the
    refused connection on it three times, a second apart, then answered 503: every client of
    the node failed its reconnects for seconds, then waited out its backoff."""
    async with (
        nodes_behind_haproxy(redis_target, tmp_path, checks=deploy_checks()) as (nodes, lb),
        aiohttp.ClientSession() as http,
    ):
        sticky_name = await node_behind(http, lb.url)
        sticky = next(n for n in nodes if n.name == sticky_name)
        other = next(n for n in nodes if n is not sticky)
        sio = socketio.AsyncClient(reconnection=False)
        gone = asyncio.Event()
        sio.on("disconnect", lambda *args: gone.set())
        await sio.connect(lb.url, transports=["websocket"], wait_timeout=5)
        ack = await sio.call("subscribe", {"room": ROOM}, timeout=10)
        assert ack["ok"], ack
        try:
            assert sticky.process is not None
            sticky.process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(gone.wait(), WAIT)
            assert not listens_on(sticky.process.pid, sticky.port)
            # The node is gone, the balancer's checks have not noticed yet. A long-polling
            # session (many requests, each of which must reach one node) and a websocket.
            for transports in (["polling"], ["websocket"]):
                started = time.monotonic()
                again = socketio.AsyncClient(reconnection=False)
                try:
                    await again.connect(lb.url, transports=transports, wait_timeout=5)
                    resume = {"room": ROOM, "since": ack["seq"], "epoch": ack["epoch"]}
                    answer = await again.call("subscribe", resume, timeout=10)
                    catalog = await again.call("catalog", {}, timeout=10)
                finally:
                    await again.disconnect()
                took = time.monotonic() - started
                assert answer["ok"] and answer["recovered"] is True, answer
                assert catalog["ok"], catalog
                assert took < 2.0, f"{transports}: {took:.1f} s to reconnect through the balancer"
            assert await node_behind(http, lb.url) == other.name
        finally:
            await sio.disconnect()


async def test_tls_at_the_balancer_accepts_the_feeds_own_https_pages(
    redis_target: RedisTarget, tmp_path: Path
) -> None:
    """TLS ends at HAProxy (wss:// for clients), the nodes speak plain HTTP behind it. A page
    of the feed's own origin (the dashboard, or an app served by the same host name) comes as
    `Origin: https://host`; the feed rebuilt its own origin as http://host, so every browser was
    refused (403) unless the balancer says the scheme (X-Forwarded-Proto). Other origins stay
    refused."""
    tls_port = free_port()
    cert, key = self_signed(tmp_path)
    pem = tmp_path / "feed.pem"
    pem.write_text(cert.read_text() + key.read_text())
    binds = (f"127.0.0.1:{tls_port} ssl crt {pem}",)
    async with (
        nodes_behind_haproxy(redis_target, tmp_path, binds=binds) as (_, lb),
        aiohttp.ClientSession() as http,
    ):
        tls = f"https://127.0.0.1:{tls_port}"
        assert await websocket_status(http, tls.replace("https", "wss"), tls) == 101
        assert await websocket_status(http, lb.url, lb.url) == 101
        assert await websocket_status(http, tls, "https://elsewhere.example") == 403
        http_page = f"http://127.0.0.1:{tls_port}"
        assert await websocket_status(http, tls, http_page) == 403, "an http page, an https feed"


async def test_the_feed_logs_the_clients_address_not_one_it_claims(
    redis_target: RedisTarget, tmp_path: Path
) -> None:
    """Behind HAProxy on the feed's machine (the address the feed trusts proxy headers from by
    default, FORWARDED_ALLOW_IPS), the log's client address is what HAProxy saw: the client's
    own, not the balancer's, and not an X-Forwarded-For the client sent itself (HAProxy
    passed that through, so any client could put any address in the feed's log)."""
    async with nodes_behind_haproxy(redis_target, tmp_path) as (nodes, lb):
        connector = aiohttp.TCPConnector(local_addr=("127.0.0.3", 0))
        async with aiohttp.ClientSession(connector=connector) as http:
            headers = {"X-Forwarded-For": "203.0.113.9"}
            async with http.get(f"{lb.url}/healthz?probe=xff", headers=headers) as response:
                assert response.status == 200
        await wait_until(lambda: bool(request_lines(nodes, "probe=xff")), WAIT, "the log line")
        lines = request_lines(nodes, "probe=xff")
        assert "127.0.0.3:" in lines[0] and "203.0.113.9" not in lines[0], lines


async def connect_from(url: str, source: str, headers: dict[str, str] | None = None) -> Any:
    """A Socket.IO client from `source` (a loopback address): the client, or the code of the
    server's refusal."""
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source, 0)))
    client = socketio.AsyncClient(reconnection=False, http_session=http)
    reasons: asyncio.Queue[Any] = asyncio.Queue()
    client.on("connect_error", reasons.put_nowait)
    try:
        await client.connect(
            url, headers=headers or {}, transports=["websocket"], wait_timeout=WAIT
        )
    except socketio.exceptions.ConnectionError:
        await http.close()
        return (await asyncio.wait_for(reasons.get(), WAIT))["data"]["code"]
    client.feed_http = http
    return client


async def test_connections_per_address_counts_each_client_behind_haproxy(
    redis_target: RedisTarget, tmp_path: Path
) -> None:
    """Every connection comes from HAProxy's address; the deploy file sets X-Forwarded-For to
    the client's, which the feed believes from it (FORWARDED_ALLOW_IPS), so the cap counts each
    client, not the balancer (which would refuse everyone past it), and a client's own
    X-Forwarded-For does not get it a fresh allowance. Sticky by address (`balance source`),
    one client's connections land on one node, whose cap they meet."""
    extra = "\n[limits]\nconnections_per_address = 2\n"
    async with nodes_behind_haproxy(redis_target, tmp_path, extra=extra) as (_nodes, lb):
        held = [await connect_from(lb.url, "127.0.0.2") for _ in range(2)]
        assert all(isinstance(c, socketio.AsyncClient) for c in held), held
        assert await connect_from(lb.url, "127.0.0.2") == "too_many_connections"
        forged = {"X-Forwarded-For": "203.0.113.50"}
        assert await connect_from(lb.url, "127.0.0.2", forged) == "too_many_connections"
        others = [await connect_from(lb.url, "127.0.0.3") for _ in range(2)]
        assert all(isinstance(c, socketio.AsyncClient) for c in others), others
        for client in [*held, *others]:
            await client.disconnect()
            await client.feed_http.close()
