"""Requests larger than the server takes in one message ([server] max_message_bytes, announced as
Engine.IO's `maxPayload`). The server cuts the connection on one (websocket close 1009, a POST
answered 413): the client reconnected and sent it again, for ever, with no error, and every other
subscription went down with it each time; a token that large made the first connect wait out
`timeout` and say `unreachable`. As in the JavaScript library (clients/js/test/toolarge.test.mjs):
not sent, `too_large`, and the rest goes on. Real server, real Socket.IO."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any

import pytest
from dbfeed_client import ConnectError, FeedClient, SubscribeError
from dbfeed_client.wire import Engine

from tests.support.client_harness import harness

ROOM = "mem:public.orders"
WAIT = 20.0
HUGE = "status=eq." + "x" * 70000
"""A filter over the default 64 KiB."""


def client(url: str | list[str], **options: Any) -> FeedClient:
    return FeedClient(url, reconnection_delay=0.1, reconnection_delay_max=0.5, **options)


@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_a_subscribe_larger_than_the_server_takes_fails_and_the_rest_goes_on(
    transport: str,
) -> None:
    async with harness() as h, client(h.url, transports=(transport,)) as feed:
        disconnects: list[str] = []
        feed.on("disconnect", disconnects.append)
        other = feed.subscribe(ROOM)
        async with asyncio.timeout(WAIT):
            await other.ready()
        big = feed.subscribe(ROOM, filter=HUGE)
        with pytest.raises(SubscribeError) as refused:
            async with asyncio.timeout(WAIT):
                await big.ready()
        assert refused.value.code == "too_large"
        assert refused.value.message.startswith("subscribe is ")
        assert refused.value.message.endswith(
            "bytes, more than the 65536 the server takes in one message"
            " ([server] max_message_bytes): not sent"
        )
        assert big.state == "error"
        h.write("public.orders", "insert", {"id": 1, "status": "new"})
        async with asyncio.timeout(WAIT):
            change = await anext(aiter(other))
        assert change["key"] == 1
        assert disconnects == [], "the connection stayed up"
        assert (await feed.catalog())["ok"]


@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_a_token_larger_than_the_server_takes_fails_connect_at_once(transport: str) -> None:
    async with harness() as h:
        feed = client(h.url, transports=(transport,), token="x" * 70000, timeout=30.0)
        with pytest.raises(ConnectError) as refused:
            async with asyncio.timeout(5.0):  # well within `timeout`: not waited out
                await feed.connect()
        assert refused.value.code == "too_large"
        assert refused.value.message.startswith("the token is ")
        assert "more than the 65536 the server takes" in refused.value.message


async def test_a_limit_the_server_did_not_announce_fails_the_request_after_one_cut(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server (or a proxy in front of it) whose limit the client was not told: the first cut
    cannot be avoided; sending the same request again after every reconnect can."""
    monkeypatch.setattr(Engine, "_opened", lambda self, text: None)  # nothing announced
    async with harness() as h, client(h.url) as feed:
        disconnects: list[str] = []
        feed.on("disconnect", disconnects.append)
        other = feed.subscribe(ROOM)
        async with asyncio.timeout(WAIT):
            await other.ready()
        back = asyncio.Event()
        other.on("state", lambda state, *_: back.set() if state == "recovered" else None)
        big = feed.subscribe(ROOM, filter=HUGE)
        with pytest.raises(SubscribeError) as refused:
            async with asyncio.timeout(WAIT):
                await big.ready()
        assert refused.value.code == "too_large"
        async with asyncio.timeout(WAIT):
            await back.wait()
        assert len(disconnects) == 1, "one cut, not a loop"
        again = feed.subscribe(ROOM, filter=HUGE)
        with pytest.raises(SubscribeError):
            async with asyncio.timeout(WAIT):
                await again.ready()
        h.write("public.orders", "insert", {"id": 1, "status": "new"})
        async with asyncio.timeout(WAIT):
            change = await anext(aiter(other))
        assert change["key"] == 1
        assert len(disconnects) == 1


async def test_a_failed_attempt_moves_to_the_next_node_once() -> None:
    """Nodes [free, busy]: the connection to the free one is lost; the busy one (at its
    connection limit) takes a long-polling handshake, then refuses the poll or the post. The
    JavaScript client moved on twice for such an attempt (`connect_error`, then `disconnect`),
    back to the node that had just failed; this library moves on once per attempt (`_run`)."""
    async with AsyncExitStack() as stack:
        busy = await stack.enter_async_context(harness("[limits]\nmax_connections = 1\n"))
        free = await stack.enter_async_context(harness())
        feed = client([free.url, busy.direct], transports=("polling",), timeout=2.0)
        tried: list[str] = []
        new_socket = feed._new_socket

        def attempt() -> Any:
            tried.append(feed.url)
            return new_socket()

        feed._new_socket = attempt  # type: ignore[method-assign]
        await stack.enter_async_context(feed)
        sub = await stack.enter_async_context(feed.subscribe(ROOM))
        back = asyncio.Event()
        sub.on("state", lambda state, *_: back.set() if state == "recovered" else None)
        free.proxy.cut()  # the connection is lost, and the free node unreachable for a moment
        free.proxy.restore()
        async with asyncio.timeout(WAIT):
            await back.wait()
        assert tried == [free.url, busy.direct, free.url]
