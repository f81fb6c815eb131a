"""deploy/nginx.conf in front of two nodes: TLS at nginx, the feed under the path /feed/.

What an operator who already runs nginx gets from the example: browsers of the site's own
origin connect (websocket and long-polling) through the prefix, a long-polling session stays
on one node, the feed logs the client's address, and a node stopping for a deploy hands its
clients to the other at their first reconnect.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import socketio

from tests.support import redis as redis_support
from tests.support.balancers import (
    Nginx,
    cluster_nodes,
    nginx_binary,
    node_behind,
    request_lines,
    self_signed,
    websocket_status,
)
from tests.support.redis import RedisTarget
from tests.support.waiting import wait_until

pytestmark = [
    pytest.mark.redis,
    pytest.mark.timeout(120),
    pytest.mark.skipif(nginx_binary() is None, reason="nginx missing: apt-get install nginx"),
]

redis_target = redis_support.redis_target
ROOM = "mem:public.orders"
WAIT = 30.0


async def follow(
    url: str, transports: list[str], since: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Connect as the JavaScript client would under the prefix (`path: "/feed/socket.io/"`),
    subscribe (resuming from `since`), ask for the catalog, leave; the subscribe's answer."""
    sio = socketio.AsyncClient(reconnection=False, ssl_verify=False)
    try:
        await sio.connect(
            url, transports=transports, socketio_path="feed/socket.io", wait_timeout=5
        )
        answer = await sio.call("subscribe", {"room": ROOM, **(since or {})}, timeout=10)
        assert answer["ok"], answer
        for _ in range(3):  # more requests of one long-polling session: all to its node
            catalog = await sio.call("catalog", {}, timeout=10)
            assert catalog["ok"], catalog
        return dict(answer)
    finally:
        await sio.disconnect()


async def test_nginx_example_serves_the_feed_under_a_path_with_tls(
    redis_target: RedisTarget, tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path)
    async with cluster_nodes(redis_target, tmp_path) as nodes:
        nginx = await Nginx(tmp_path, [n.port for n in nodes], cert, key).start()
        try:
            feed = f"{nginx.url}/feed"
            async with aiohttp.ClientSession() as http:
                sticky_name = await node_behind(http, feed)
                # A page of the site's own origin; a page from elsewhere stays refused.
                wss = feed.replace("https", "wss")
                assert await websocket_status(http, wss, nginx.url) == 101
                assert await websocket_status(http, wss, "https://elsewhere.example") == 403
                headers = {"Origin": nginx.url, "X-Forwarded-For": "203.0.113.9"}
                poll = f"{feed}/socket.io/?EIO=4&transport=polling&probe=nginx"
                async with http.get(poll, headers=headers, ssl=False) as response:
                    assert response.status == 200, await response.text()
            await wait_until(lambda: bool(request_lines(nodes, "probe=nginx")), WAIT, "log line")
            line = request_lines(nodes, "probe=nginx")[0]
            assert "127.0.0.1:" in line and "203.0.113.9" not in line, line

            first = await follow(nginx.url, ["polling"])
            since = {"since": first["seq"], "epoch": first["epoch"]}
            assert (await follow(nginx.url, ["websocket"], since))["recovered"] is True

            # A deploy stops the node the address sticks to: the next connection goes to the
            # other node at once, resuming there.
            sticky = next(n for n in nodes if n.name == sticky_name)
            assert sticky.process is not None
            sticky.process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(sticky.process.wait(), WAIT)
            for transports in (["polling"], ["websocket"]):
                started = time.monotonic()
                assert (await follow(nginx.url, transports, since))["recovered"] is True
                assert time.monotonic() - started < 2.0, transports
            async with aiohttp.ClientSession() as http:
                assert await node_behind(http, feed) != sticky_name
        finally:
            await nginx.stop()
