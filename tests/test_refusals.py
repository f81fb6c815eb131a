"""Every plain-text refusal the feed writes itself, as a client or a load balancer sees it on
the wire: its status, its text, its headers, whether the connection ends with it, and that the
server goes on serving everyone else.

The refusals were built by hand where they were made and differed: `text/plain` with or
without a charset, `X-Content-Type-Options` on some, `Connection: close` on others, and the
plain HTTP side's other hardening headers on none (feed/security/answers.py builds them all
now)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from feed.security.guard import OPERATOR_RESERVE
from tests.auth_helpers import BASE, source
from tests.support.server import RunningFeed, feed_client, read_answer, running_feed
from tests.support.waiting import wait_until

POLL = "/socket.io/?EIO=4&transport=polling"
WS = "/socket.io/?EIO=4&transport=websocket"

HARDENING = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "content-security-policy": "frame-ancestors 'none'; object-src 'none'",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}
HOST_REFUSED = (
    b"host 'evil.example' is not allowed: reach the feed by IP address or localhost, or add the"
    b" name to [server] allowed_hosts\n"
)
BUSY = b"the server is at its connection limit.\n"


def port_of(feed: RunningFeed) -> int:
    return int(feed.url.rsplit(":", 1)[1])


def upgrade(host: str, path: str = WS) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nOrigin: http://{host}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


Answer = tuple[str, dict[str, str], bytes]


@asynccontextmanager
async def connection(
    feed: RunningFeed,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(feed))
    try:
        yield reader, writer
    finally:
        writer.close()


async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> Answer:
    writer.write(request)
    await writer.drain()
    return await read_answer(reader)


def assert_refusal(answer: Answer, status: int, text: bytes, *, close: bool) -> None:
    """The answer is the plain-text refusal `status` saying `text`, with the same headers as
    every other, and `Connection: close` if it ends the connection."""
    line, headers, body = answer
    assert line.split(" ", 2)[:2] == ["HTTP/1.1", str(status)], (line, body)
    assert body == text
    assert headers["content-type"] == "text/plain; charset=utf-8", headers
    assert headers["content-length"] == str(len(body)), headers
    assert {name: headers.get(name) for name in HARDENING} == HARDENING, headers
    assert (headers.get("connection", "").lower() == "close") is close, headers


async def closed(reader: asyncio.StreamReader) -> None:
    """The server ended the connection after its answer: nothing more came, then EOF."""
    async with asyncio.timeout(5):
        assert await reader.read() == b""


async def refused_and_closed(feed: RunningFeed, request: bytes, status: int, text: bytes) -> None:
    async with connection(feed) as (reader, writer):
        assert_refusal(await ask(reader, writer, request), status, text, close=True)
        await closed(reader)


async def a_client_is_served(feed: RunningFeed, key: int) -> None:
    async with feed_client(feed.url) as client:
        assert (await client.subscribe("mem:public.orders"))["ok"]
        source(feed).write("public.orders", "insert", {"id": key})
        assert (await client.next_change())["key"] == key


async def test_refused_requests_get_plain_text_with_the_same_headers() -> None:
    """A POST too large (413, its body left unread: the connection ends), a host not allowed
    (400, the request whole: the connection serves the next one), a websocket request for a
    host not allowed (403) or for another path (404), and everyone else is served meanwhile."""
    async with running_feed(BASE) as feed, feed_client(feed.url) as normal:
        assert (await normal.subscribe("mem:public.orders"))["ok"]
        limit = feed.app.config.server.max_message_bytes
        head = (
            f"POST {POLL}&sid=none HTTP/1.1\r\nHost: localhost\r\n"
            f"Content-Length: {limit + 1}\r\n\r\n"
        )
        too_large = b"the message is larger than the server's max_message_bytes"
        await refused_and_closed(feed, head.encode() + b"4xxx", 413, too_large)

        async with connection(feed) as (reader, writer):
            bad_host = f"GET {POLL} HTTP/1.1\r\nHost: evil.example\r\n\r\n".encode()
            assert_refusal(await ask(reader, writer, bad_host), 400, HOST_REFUSED, close=False)
            health = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
            status, _, body = await ask(reader, writer, health)
            assert status.startswith("HTTP/1.1 200") and body == b'{"status": "ok"}', status

        await refused_and_closed(feed, upgrade("evil.example"), 403, HOST_REFUSED)
        here = f"127.0.0.1:{port_of(feed)}"
        wrong_path = b"not found: Socket.IO clients connect at /socket.io/\n"
        await refused_and_closed(feed, upgrade(here, "/"), 404, wrong_path)

        source(feed).write("public.orders", "insert", {"id": 1})
        assert (await normal.next_change())["key"] == 1
        await a_client_is_served(feed, 2)


async def test_connections_over_the_cap_get_the_same_plain_text_503() -> None:
    """Past the cap: a request other than a probe's (answered through ASGI), a websocket
    upgrade, and past the operators' reserve any connection at all (both written to the socket
    before the request is parsed) get the same 503, and the connection ends with it."""
    cap = 3
    config = BASE + f"[limits]\nmax_connections = {cap}\nrequest_timeout = 30\n"
    async with running_feed(config) as feed, feed_client(feed.url) as normal:
        assert (await normal.subscribe("mem:public.orders"))["ok"]
        idle = [await asyncio.open_connection("127.0.0.1", port_of(feed)) for _ in range(cap - 1)]
        try:
            poll = f"GET {POLL} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
            await refused_and_closed(feed, poll, 503, BUSY)
            await refused_and_closed(feed, upgrade(f"127.0.0.1:{port_of(feed)}"), 503, BUSY)
            held = [
                await asyncio.open_connection("127.0.0.1", port_of(feed))
                for _ in range(OPERATOR_RESERVE)
            ]
            try:
                probe = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
                await refused_and_closed(feed, probe, 503, BUSY)
            finally:
                for _, writer in held:
                    writer.close()
            source(feed).write("public.orders", "insert", {"id": 1})
            assert (await normal.next_change())["key"] == 1  # the connected client is served
        finally:
            for _, writer in idle:
                writer.close()
        assert feed.hub.metrics.value("feed_connections_refused_total") == 3
        await wait_until(lambda: len(feed.server.server_state.connections) == 1, 5, "idle gone")
        await a_client_is_served(feed, 2)
