"""Connections the server refuses in HTTP, before Socket.IO: a host name it does not accept
([server] allowed_hosts), an origin it does not accept (cors_allowed_origins), its connection
limit (503). The Python library took them for an unreachable server: `connect()` waited out
`timeout` and said `unreachable`, and a reconnect refused so was retried for ever without an
`error`. As the JavaScript library does (clients/js/test/refusals.test.mjs): a ConnectError
with the reason, final for a name or an origin, retried for a 503. Real server, real Socket.IO."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from dbfeed_client import ConnectError, FeedClient, FeedError

from tests.support.client_harness import harness, make_token

ROOM = "mem:public.orders"
WAIT = 20.0
ORIGINS = '[server]\nreplay_buffer = 5000\ncors_allowed_origins = ["http://app.example"]\n'
BUSY = "[limits]\nmax_connections = 2\n"
"""Two connections the server takes: a long-polling client needs two (its poll, its posts)."""


def client(url: str | list[str], **options: Any) -> FeedClient:
    return FeedClient(url, reconnection_delay=0.1, reconnection_delay_max=0.5, **options)


@pytest.mark.parametrize(
    ("transport", "status", "header"),
    [
        ("websocket", 403, {"Host": "feed.internal"}),
        ("polling", 400, {"Host": "feed.internal"}),
        ("polling", 400, {"Origin": "http://other.example"}),
    ],
)
async def test_a_name_or_origin_the_feed_refuses_fails_connect_at_once(
    transport: str, status: int, header: dict[str, str]
) -> None:
    async with harness(ORIGINS) as h:  # no auth: only IP addresses and localhost by default
        h.proxy.rename(header)
        errors: list[FeedError] = []
        feed = client(h.url, transports=(transport,), timeout=30.0)
        feed.on("error", errors.append)
        with pytest.raises(ConnectError) as refused:
            async with asyncio.timeout(5.0):  # well within `timeout`: not waited out
                await feed.connect()
        assert (refused.value.code, refused.value.status) == ("handshake_refused", status)
        assert f"HTTP {status}" in refused.value.message
        assert "allowed_hosts" in refused.value.message
        assert [e.code for e in errors] == ["handshake_refused"]


async def test_a_name_refused_at_a_reconnect_ends_the_subscription_with_the_reason() -> None:
    async with harness() as h:
        errors: list[str] = []
        async with client(h.url, transports=("polling",)) as feed:
            feed.on("error", lambda e: errors.append(e.code))
            sub = feed.subscribe(ROOM)
            async with asyncio.timeout(WAIT):
                await sub.ready()
            # A balancer now passes the name clients reach it by, which the feed does not accept.
            h.proxy.rename({"Host": "feed.internal"})
            h.proxy.cut()
            h.proxy.restore()
            with pytest.raises(ConnectError) as ended:
                async with asyncio.timeout(WAIT):
                    async for _ in sub:
                        pass
            assert ended.value.code == "handshake_refused"
            assert sub.state == "error"
            assert errors == ["handshake_refused"]


async def test_a_server_at_its_connection_limit_fails_the_first_connect_as_server_busy() -> None:
    async with harness(BUSY) as h, client(h.direct) as one, client(h.direct) as two:
        assert one.connected and two.connected
        with pytest.raises(ConnectError) as refused:
            async with asyncio.timeout(5.0):
                await client(h.direct, timeout=30.0).connect()
        assert (refused.value.code, refused.value.status) == ("server_busy", 503)


@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_a_reconnect_refused_with_503_is_reported_and_retried_until_there_is_room(
    transport: str,
) -> None:
    async with harness(BUSY) as h:
        busy = asyncio.Event()
        async with client(h.url, transports=(transport,)) as feed:
            feed.on("error", lambda e: busy.set() if e.code == "server_busy" else None)
            sub = feed.subscribe(ROOM)
            async with asyncio.timeout(WAIT):
                await sub.ready()
            back = asyncio.Event()
            sub.on("state", lambda state, *_: back.set() if state == "recovered" else None)
            h.proxy.cut()  # its connections dropped: two others take the server's two
            async with client(h.direct), client(h.direct):
                h.proxy.restore()
                async with asyncio.timeout(WAIT):
                    await busy.wait()
                assert sub.state == "pending"
            # Room again: the retried reconnect gets in, and the subscription resumes.
            async with asyncio.timeout(WAIT):
                await back.wait()
            h.write("public.orders", "insert", {"id": 1, "status": "new"})
            async with asyncio.timeout(WAIT):
                change = await anext(aiter(sub))
            assert change["key"] == 1


async def test_a_server_unreachable_for_timeout_is_said_once_per_outage_and_retried() -> None:
    """Before, a reconnect that kept failing was retried for ever without a word (the first
    connect alone raised `unreachable`)."""
    async with harness() as h:
        errors: list[FeedError] = []
        told = asyncio.Event()
        async with client(h.url, timeout=1.0) as feed:
            sub = feed.subscribe(ROOM)
            async with asyncio.timeout(WAIT):
                await sub.ready()
            back = asyncio.Event()
            sub.on("state", lambda state, *_: back.set() if state == "recovered" else None)
            feed.on("error", errors.append)
            feed.on("error", lambda _: told.set())
            h.proxy.cut()  # connections dropped, new ones refused
            async with asyncio.timeout(WAIT):
                await told.wait()
            h.proxy.restore()
            async with asyncio.timeout(WAIT):
                await back.wait()
        assert [e.code for e in errors] == ["unreachable"]
        assert errors[0].message.startswith(f"{h.url}: no connection for ")
        assert errors[0].message.endswith("; still trying")


PER_IDENTITY = "[limits]\nconnections_per_identity = 1\n"
"""One connection per identity on each node: a second one there is `too_many_connections`."""


async def test_a_first_connect_refused_for_now_by_one_node_connects_to_the_next() -> None:
    """Nodes [A, B], the identity's one connection on A already taken: `too_many_connections`
    says "not now, here", and B takes the client at once. Before, `connect()` raised it, with B
    never tried (the JavaScript client retried A alone, for ever)."""
    async with harness(PER_IDENTITY, auth=True) as a, harness(PER_IDENTITY, auth=True) as b:
        token = make_token(300)
        async with client(a.direct, token=token):  # holds the identity's connection on A
            errors: list[str] = []
            feed = client([a.url, b.url], token=token, timeout=30.0)
            feed.on("error", lambda e: errors.append(e.code))
            started = asyncio.get_running_loop().time()
            try:
                async with asyncio.timeout(WAIT):
                    await feed.connect()
                took = asyncio.get_running_loop().time() - started
                print(f"connected on B {took * 1000:.0f} ms after A refused")
                assert feed.url == b.url
                assert errors == ["too_many_connections"]
                assert took < 1.0, f"connected after {took:.1f} s"
            finally:
                await feed.close()


async def test_a_first_connect_refused_for_now_by_every_node_raises_the_refusal() -> None:
    """Nodes [A, B], both holding the identity's one connection: `connect()` raises the refusal
    once each node was tried (and only then), as for nodes that do not answer."""
    async with harness(PER_IDENTITY, auth=True) as a, harness(PER_IDENTITY, auth=True) as b:
        token = make_token(300)
        async with client(a.direct, token=token), client(b.direct, token=token):
            errors: list[str] = []
            feed = client([a.url, b.url], token=token, timeout=30.0)
            feed.on("error", lambda e: errors.append(e.code))
            with pytest.raises(ConnectError) as refused:
                async with asyncio.timeout(5.0):
                    await feed.connect()
            assert refused.value.code == "too_many_connections"
            assert errors == ["too_many_connections", "too_many_connections"]


async def test_a_bad_token_stays_final_with_several_nodes() -> None:
    """A refusal of the token itself is the same on every node: `connect()` raises it at once,
    the other node untried."""
    async with harness(auth=True) as a, harness(auth=True) as b:
        errors: list[str] = []
        feed = client([a.url, b.url], token="not-a-valid-token", timeout=30.0)
        feed.on("error", lambda e: errors.append(e.code))
        with pytest.raises(ConnectError) as refused:
            async with asyncio.timeout(5.0):
                await feed.connect()
        assert refused.value.code == "invalid_token"
        assert errors == ["invalid_token"]
        assert not b.proxy.links, "the other node was tried"


async def test_a_reconnect_refused_for_now_by_one_node_goes_on_to_the_next() -> None:
    """Nodes [A, B], connected on A; the identity's one connection on B is taken. A goes away
    and the reconnect reaches B: `too_many_connections`. A comes back: the client must get
    there, B still refusing. Before, the refusal was retried on B alone (with a backoff
    doubling to `reconnection_delay_max`) until B's other connection closed."""
    async with harness(PER_IDENTITY, auth=True) as a, harness(PER_IDENTITY, auth=True) as b:
        token = make_token(300)
        refused = asyncio.Event()
        async with client([a.url, b.url], token=token) as feed, feed.subscribe(ROOM) as sub:
            back = asyncio.Event()
            sub.on("state", lambda state, *_: back.set() if state == "recovered" else None)
            feed.on("error", lambda e: refused.set() if e.code == "too_many_connections" else None)
            async with asyncio.timeout(WAIT):
                await sub.ready()
            async with client(b.direct, token=token):  # holds the identity's connection on B
                a.proxy.cut()  # A's connections dropped, new ones refused for now
                async with asyncio.timeout(WAIT):
                    await refused.wait()
                a.proxy.restore()
                restored = asyncio.get_running_loop().time()
                async with asyncio.timeout(10.0):
                    await back.wait()
                took = asyncio.get_running_loop().time() - restored
                print(f"back on A {took * 1000:.0f} ms after it came back")
                assert feed.url == a.url
                a.write("public.orders", "insert", {"id": 1, "status": "new"})
                async with asyncio.timeout(WAIT):
                    change = await anext(aiter(sub))
                assert change["key"] == 1
