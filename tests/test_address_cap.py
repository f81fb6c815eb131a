"""`[limits] connections_per_address`: anonymous connections per client address.

Before it, anonymous clients were bounded only by `max_connections`: one client completed the
Socket.IO connect 17,000 times in 20 s and did nothing, and every other user then got 503.
The address is the connection's own, or the one a trusted proxy (uvicorn's
`FORWARDED_ALLOW_IPS`) put in `X-Forwarded-For`; these tests use both, with real connections
from 127.0.0.2, 127.0.0.3 (loopback source addresses) and through 127.0.0.1 (trusted).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from typing import Any

import pytest
import socketio
import websockets
from websockets.asyncio.client import ClientConnection, connect

from feed.app.config import parse_config
from feed.errors import ConfigError
from feed.security.addresses import client_address
from tests.auth_helpers import BASE, TOKENS, static_tokens, ws_url
from tests.support.server import RunningFeed, running_feed
from tests.support.waiting import wait_until

CAP = 3
CONFIG = BASE + f"[limits]\nconnections_per_address = {CAP}\n"
WAIT = 10.0


async def raw_from(
    feed: RunningFeed, source: str, headers: dict[str, str] | None = None
) -> tuple[ClientConnection, str]:
    """A websocket from `source` (a loopback address of this machine) that sends the Socket.IO
    connect; the connection and the server's answer to the connect (`40...` or `44...`)."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", int(feed.url.rsplit(":", 1)[1])))
    ws = await connect(ws_url(feed), sock=sock, proxy=None, additional_headers=headers)
    async with asyncio.timeout(WAIT):
        opened = await ws.recv()
        assert isinstance(opened, str) and opened.startswith("0"), opened
        await ws.send("40")
        answer = await ws.recv()
    assert isinstance(answer, str)
    return ws, answer


def refused_code(answer: str) -> str | None:
    if not answer.startswith("44"):
        assert answer.startswith("40"), answer
        return None
    code: str = json.loads(answer[2:])["data"]["code"]
    return code


async def connect_as(
    feed: RunningFeed,
    forwarded: str | None = None,
    transport: str = "websocket",
    auth: dict[str, Any] | None = None,
) -> socketio.AsyncClient | str:
    """A python-socketio client through 127.0.0.1 (a trusted proxy by uvicorn's default),
    saying `forwarded` in `X-Forwarded-For`: the client, or the code it was refused with."""
    client = socketio.AsyncClient(reconnection=False)
    reasons: asyncio.Queue[Any] = asyncio.Queue()
    client.on("connect_error", reasons.put_nowait)
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    try:
        await client.connect(
            feed.url, headers=headers, auth=auth, transports=[transport], wait_timeout=WAIT
        )
    except socketio.exceptions.ConnectionError:
        reason = await asyncio.wait_for(reasons.get(), WAIT)
        return str(reason["data"]["code"])
    return client


def metric(feed: RunningFeed, line: str) -> bool:
    return line in feed.hub.metrics.render().splitlines()


async def test_one_address_is_refused_past_the_cap_while_another_connects(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="feed.guard")
    async with running_feed(CONFIG) as feed:
        held = [await raw_from(feed, "127.0.0.2") for _ in range(CAP)]
        assert [refused_code(answer) for _, answer in held] == [None] * CAP
        refused = [await raw_from(feed, "127.0.0.2") for _ in range(5)]
        assert [refused_code(answer) for _, answer in refused] == ["too_many_connections"] * 5
        other, answer = await raw_from(feed, "127.0.0.3")
        assert refused_code(answer) is None  # another address is not affected
        # The refused sessions do not wait out their handshake_timeout (10 s) in the
        # max_handshakes places, where one client's refused retries kept everyone else out:
        # they are closed at once after their refusal.
        assert not feed.app._handshakes, feed.app._handshakes
        for ws, _ in refused:
            with pytest.raises(websockets.ConnectionClosed):
                async with asyncio.timeout(WAIT):
                    await ws.recv()
        assert metric(feed, 'feed_client_errors_total{kind="too_many_from_address"} 5')
        assert metric(feed, 'feed_auth_refused_total{code="too_many_connections"} 5')
        lines = [r.getMessage() for r in caplog.records if "too_many_from_address" in r.message]
        assert len(lines) == 1, lines  # rate-limited: one line for the five
        assert "127.0.0.2" in lines[0] and "connections_per_address" in lines[0], lines
        # A connection that closes gives its slot back.
        await held[0][0].close()
        await wait_until(
            lambda: feed.app.addresses.counts.get("127.0.0.2") == CAP - 1, what="slot given back"
        )
        again, answer = await raw_from(feed, "127.0.0.2")
        assert refused_code(answer) is None
        for ws, _ in [*held[1:], *refused, (other, ""), (again, "")]:
            await ws.close()
        await wait_until(lambda: feed.app.addresses.counts == {}, what="every slot given back")


async def test_the_cap_counts_long_polling_and_websocket_sessions_of_a_trusted_proxys_clients() -> (
    None
):
    """Through a trusted proxy (127.0.0.1, uvicorn's default FORWARDED_ALLOW_IPS) the address is
    the one in X-Forwarded-For: the proxy's own connections are not what is counted."""
    async with running_feed(CONFIG) as feed:
        held = [
            await connect_as(feed, "203.0.113.7", "polling"),
            await connect_as(feed, "203.0.113.7", "websocket"),
            await connect_as(feed, "203.0.113.7", "polling"),
        ]
        assert all(isinstance(c, socketio.AsyncClient) for c in held), held
        assert await connect_as(feed, "203.0.113.7", "polling") == "too_many_connections"
        assert await connect_as(feed, "203.0.113.7", "websocket") == "too_many_connections"
        others = [await connect_as(feed, "203.0.113.8", t) for t in ("polling", "websocket")]
        others.append(await connect_as(feed))  # the proxy's machine itself: its own address
        assert all(isinstance(c, socketio.AsyncClient) for c in others), others
        for client in [*held, *others]:
            assert isinstance(client, socketio.AsyncClient)
            await client.disconnect()
        await wait_until(lambda: feed.app.addresses.counts == {}, what="every slot given back")


async def test_a_balancer_not_trusted_is_not_capped_and_is_named_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A balancer whose address is not in FORWARDED_ALLOW_IPS: every client seems to come from
    it. Capping that address would refuse everyone past the cap; its connections are left
    uncapped instead, and the log says what to set."""
    caplog.set_level(logging.WARNING, logger="feed.addresses")
    async with running_feed(CONFIG) as feed:
        forwarded = {"X-Forwarded-For": "203.0.113.9"}
        held = [await raw_from(feed, "127.0.0.2", forwarded) for _ in range(CAP + 3)]
        assert [refused_code(answer) for _, answer in held] == [None] * (CAP + 3)
        lines = [r.getMessage() for r in caplog.records if r.name == "feed.addresses"]
        assert len(lines) == 1, lines
        assert "127.0.0.2" in lines[0] and "FORWARDED_ALLOW_IPS" in lines[0], lines
        for ws, _ in held:
            await ws.close()


async def test_authenticated_connections_are_not_counted_per_address() -> None:
    """They have `connections_per_identity`; an office's users behind one address must not
    share one allowance."""
    config = BASE + static_tokens() + "[limits]\nconnections_per_address = 1\n"
    async with running_feed(config) as feed:
        auth = {"token": TOKENS["acme-svc"]}
        clients = [await connect_as(feed, "203.0.113.7", auth=auth) for _ in range(3)]
        clients.append(await connect_as(feed, "203.0.113.7"))  # the one anonymous slot
        assert all(isinstance(c, socketio.AsyncClient) for c in clients), clients
        assert await connect_as(feed, "203.0.113.7") == "too_many_connections"
        for client in clients:
            assert isinstance(client, socketio.AsyncClient)
            await client.disconnect()


def scope(peer: str, forwarded: str | None = None) -> dict[str, Any]:
    """An Engine.IO environ, as python-engineio builds it from the ASGI scope."""
    environ: dict[str, Any] = {"asgi.scope": {"type": "websocket", "client": (peer, 4000)}}
    if forwarded:
        environ["HTTP_X_FORWARDED_FOR"] = forwarded
    return environ


def test_client_address_keys() -> None:
    assert client_address(scope("203.0.113.7")).key == "203.0.113.7"
    # An IPv6 host is given a /64 by its provider: one key for all of it.
    assert client_address(scope("2001:db8:1:2:aaaa::1")).key == "2001:db8:1:2::/64"
    assert client_address(scope("2001:db8:1:2:bbbb::9")).key == "2001:db8:1:2::/64"
    assert client_address(scope("::ffff:203.0.113.7")).key == "203.0.113.7"
    # A public peer sending its own X-Forwarded-For (not believed): capped as itself, or any
    # client could escape the cap with a header.
    forged = client_address(scope("93.184.216.34", "203.0.113.1"))
    assert forged.key == "93.184.216.34" and forged.balancer is None
    # A private peer whose X-Forwarded-For was not believed: a balancer nobody told us of.
    unseen = client_address(scope("10.0.0.5", "203.0.113.1"))
    assert unseen.key is None and unseen.balancer == "10.0.0.5"
    assert client_address(scope("::ffff:10.0.0.5", "203.0.113.1")).balancer == "::ffff:10.0.0.5"
    assert client_address(scope("::ffff:93.184.216.34", "203.0.113.1")).balancer is None
    # What uvicorn put there from a trusted proxy's header (the address is one of its entries).
    assert client_address(scope("203.0.113.1", "203.0.113.1, 10.0.0.5")).key == "203.0.113.1"
    assert client_address({"asgi.scope": {"type": "websocket", "client": None}}).key is None
    assert client_address({}).key is None


@pytest.mark.parametrize("value", ["-1", "1_000_001", "2.5", '"many"'])
def test_connections_per_address_is_checked(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(BASE + f"[limits]\nconnections_per_address = {value}\n", "feed.toml", {})
    message = str(caught.value)
    assert "limits.connections_per_address" in message and "\n" not in message, message


def test_connections_per_address_default() -> None:
    assert parse_config(BASE, "feed.toml", {}).limits.connections_per_address == 100


async def test_a_connect_again_on_the_same_session_is_counted_again() -> None:
    """A client that leaves the namespace (`41`) and connects again on the same Engine.IO
    session is counted under its address again, though the session's request environ is let go
    after its first connect (feed.delivery.eio_websocket)."""
    async with running_feed(CONFIG) as feed:
        held = [await raw_from(feed, "127.0.0.2") for _ in range(CAP)]
        ws = held[-1][0]
        for _ in range(3):
            await ws.send("41")
            await wait_until(
                lambda: feed.app.addresses.counts.get("127.0.0.2") == CAP - 1, what="released"
            )
            await ws.send("40")
            answer = await asyncio.wait_for(ws.recv(), WAIT)
            assert isinstance(answer, str) and refused_code(answer) is None, answer
            assert feed.app.addresses.counts.get("127.0.0.2") == CAP
        late, answer = await raw_from(feed, "127.0.0.2")
        assert refused_code(answer) == "too_many_connections"
        for connection, _ in [*held, (late, "")]:
            await connection.close()


async def test_the_python_client_retries_a_refusal_at_the_cap_and_comes_back() -> None:
    """The refusal is `too_many_connections`, which the client library takes for "not now":
    an anonymous client whose reconnect is refused at the cap (its session closed a second
    later) keeps its subscription, retries, and resumes once the address has a free place."""
    from dbfeed_client import FeedClient, FeedError

    from tests.support.client_harness import harness

    async with harness("[limits]\nconnections_per_address = 1\n") as h:
        refused = asyncio.Event()
        resumed = asyncio.Event()
        feed = FeedClient(h.url, reconnection_delay=0.1, reconnection_delay_max=1.0)
        async with feed, feed.subscribe("mem:public.orders") as sub:

            def on_error(error: FeedError) -> None:
                if error.code == "too_many_connections":
                    refused.set()

            def on_state(state: str, info: Any) -> None:
                if state == "recovered" and refused.is_set():
                    resumed.set()

            feed.on("error", on_error)
            sub.on("state", on_state)
            h.proxy.cut()  # its connection dropped; the proxy refuses new ones for now
            other = FeedClient(h.direct)  # the same address (this machine) takes the place
            async with other:
                h.proxy.restore()
                await asyncio.wait_for(refused.wait(), WAIT)
            await asyncio.wait_for(resumed.wait(), 20)  # its place was given back


def test_ipv4_clients_through_nat64_are_counted_each_by_its_own_address() -> None:
    """Behind a stateless NAT64 (SIIT-DC: an IPv6-only feed reached by IPv4 clients) every IPv4
    client arrives as `64:ff9b::<its IPv4 address>`. By their /64 they were all one key, so the
    whole IPv4 internet shared one allowance of `connections_per_address`."""
    one = client_address(scope("64:ff9b::cb00:7107"))
    other = client_address(scope("64:ff9b::5db8:d822"))
    assert (one.key, other.key) == ("203.0.113.7", "93.184.216.34")


async def test_a_long_forwarded_header_is_not_kept_for_the_sessions_life() -> None:
    """After connect a session keeps only what names its client (its address, and whether it
    was among its X-Forwarded-For entries), for a connect again on it. The header itself was
    kept: 7,000 characters per session for as long as it lived, from any client that sent one
    (8 KB passes the websocket handshake), where the rest of the request is let go."""
    async with running_feed(CONFIG) as feed:
        junk = ", ".join(f"198.51.100.{i % 250}" for i in range(500))[:7000]
        ws, answer = await raw_from(feed, "127.0.0.2", {"X-Forwarded-For": junk})
        assert refused_code(answer) is None
        (environ,) = feed.app.sio.environ.values()
        assert sum(len(str(value)) for value in environ.values()) < 100, environ
        # Not believed from 127.0.0.2 (a balancer nobody listed): not counted, again as first.
        assert feed.app.addresses.counts == {}
        await ws.send("41")
        await ws.send("40")
        again = await asyncio.wait_for(ws.recv(), WAIT)
        assert isinstance(again, str) and refused_code(again) is None, again
        assert feed.app.addresses.counts == {}
        await ws.close()


def test_what_a_session_keeps_names_its_client_as_the_request_did() -> None:
    from feed.delivery.eio_websocket import client_environ

    for peer, forwarded in [
        ("203.0.113.1", "203.0.113.1, 10.0.0.5"),  # believed from a trusted proxy
        ("10.0.0.5", "203.0.113.1"),  # a balancer nobody listed
        ("93.184.216.34", "203.0.113.1"),  # a client's own header, not believed
        ("2001:db8::1", "[2001:db8::1]:443"),
        ("127.0.0.2", ""),
    ]:
        request = scope(peer, forwarded or None)
        if not forwarded:
            request["HTTP_X_FORWARDED_FOR"] = ""
        kept = client_environ(request)
        assert client_address(kept) == client_address(request), (peer, forwarded, kept)
        assert client_address(client_environ(kept)) == client_address(request)
