"""dbfeed_client's requests against the real feed server: many rooms on one client, rooms left
and joined at once, and a resume from a saved position. The JavaScript client's tests (clients/js/test/requests.test.mjs) run
the same scenarios."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from dbfeed_client import ClosedError, FeedClient, FeedError, Subscription

from tests.support.client_harness import harness, make_token

ROOM = "mem:public.orders"
WAIT = 30.0
# A small burst, so that a client with a hundred-odd rooms goes past it (the default burst is
# the default `max_subscriptions`, 100; an operator who raises one need not raise the other).
LIMITED = (
    "[server]\nreplay_buffer = 5000\nmax_subscriptions = 300\n"
    "[limits]\nsubscribe_burst = 10\nsubscribe_rate = 50.0\n"
)
ROOMS = 130
"""More rooms than the burst, and refusals in a row enough to be cut off (100) if all went at once."""


def client(url: str, **options: Any) -> FeedClient:
    return FeedClient(url, reconnection_delay=0.1, reconnection_delay_max=1.0, **options)


async def test_more_rooms_than_the_servers_burst_are_paced_not_cut_off() -> None:
    """Before: the client sent every subscribe at once, the server refused those past its burst,
    and after 100 refusals in a row cut the client off: it reconnected, sent them all again and
    was cut off again, for a minute. Its unsubscribes raised `rate_limited`, leaving the rooms
    joined on the server. Now the client paces its requests and retries refused ones."""
    async with harness(LIMITED) as h:
        disconnects: list[str] = []
        async with client(h.url) as feed:
            feed.on("disconnect", disconnects.append)
            subs = [feed.subscribe(f"{ROOM}:{i}") for i in range(1, ROOMS + 1)]
            async with asyncio.timeout(WAIT):
                await asyncio.gather(*(sub.ready() for sub in subs))
            assert disconnects == []
            assert all(sub.state == "live" for sub in subs)

            got = asyncio.Event()
            subs[-1].on("change", lambda change: got.set())
            h.write("public.orders", "insert", {"id": ROOMS, "status": "paid"})
            async with asyncio.timeout(WAIT):
                await got.wait()

            async with asyncio.timeout(WAIT):
                await asyncio.gather(*(sub.unsubscribe() for sub in subs))  # none raises
            assert disconnects == []
            assert feed.subscriptions == set()


async def test_a_room_left_while_another_subscribe_to_it_is_answered_still_delivers() -> None:
    """Before: a second subscription to a room, asked while the first one's unsubscribe was
    sent, went `live` but the server had taken the client out of the room: it received nothing,
    silently. Now it asks again when its answer comes after such an unsubscribe."""
    async with harness() as h, client(h.url) as feed:
        first = feed.subscribe(ROOM)
        await first.ready()
        second = feed.subscribe(ROOM, snapshot=True)
        async with asyncio.timeout(WAIT):
            while second._phase != "subscribing":  # noqa: ASYNC110 - its task has not run yet
                await asyncio.sleep(0)
        await asyncio.sleep(0)  # its subscribe is on the wire, before the unsubscribe below
        await first.unsubscribe()
        async with asyncio.timeout(WAIT):
            await second.ready()
        got = asyncio.Event()
        second.on("change", lambda change: got.set())
        h.write("public.orders", "insert", {"id": 1, "status": "new"})
        async with asyncio.timeout(WAIT):
            await got.wait()
        assert second.rows is not None and second.rows["1"]["status"] == "new"


async def test_a_position_without_its_epoch_is_refused_rather_than_dropped() -> None:
    """Before: `subscribe(room, since=17)` without `epoch` dropped `since` and went `live`: the
    changes after 17 were missed without a word. Now it raises; with the epoch it resumes."""
    async with harness() as h, client(h.url) as feed:
        async with feed.subscribe(ROOM) as first:
            for i in (1, 2, 3):
                h.write("public.orders", "insert", {"id": i, "status": "new"})
            await h.delivered()
            async with asyncio.timeout(WAIT):
                async for change in first:
                    if change["seq"] == 3:
                        break
            epoch = first.epoch
        with pytest.raises(FeedError) as caught:
            feed.subscribe(ROOM, since=1)
        assert caught.value.code == "bad_request"
        assert "epoch" in caught.value.message
        async with feed.subscribe(ROOM, since=1, epoch=epoch) as resumed:
            assert resumed.state == "recovered"
            async with asyncio.timeout(WAIT):
                assert [(await anext(resumed))["seq"] for _ in range(2)] == [2, 3]


async def test_a_change_sent_again_by_a_restarted_server_is_dropped_by_its_id() -> None:
    """Before: after a restart (a new epoch) the libraries forgot the ids they had seen, so a
    change the new server read again from its source (a feed killed before it saved its
    position) reached a subscription twice. Ids belong to the source: now it is dropped."""
    async with harness() as h, client(h.url) as feed, feed.subscribe(ROOM) as sub:
        got: list[dict[str, Any]] = []
        states: list[str] = []
        arrived = asyncio.Event()

        def changed(change: dict[str, Any]) -> None:
            got.append(change)
            arrived.set()

        def stated(state: str, info: dict[str, Any]) -> None:
            states.append(state)
            arrived.set()

        sub.on("change", changed)
        sub.on("state", stated)

        async def until(condition: Callable[[], bool]) -> None:
            async with asyncio.timeout(WAIT):
                while not condition():
                    arrived.clear()
                    await arrived.wait()

        first = h.write("public.orders", "insert", {"id": 1, "status": "new"})
        await until(lambda: len(got) == 1)
        epoch = sub.epoch
        await h.restart()
        await until(lambda: sub.epoch != epoch and sub.state == "live")
        h.redeliver(str(first["id"]))  # the new run reads it again
        second = h.write("public.orders", "insert", {"id": 2, "status": "new"})
        await until(lambda: any(c["id"] == second["id"] for c in got))
        assert [c["id"] for c in got] == [first["id"], second["id"]]
        assert "reload" in states


def on_send(feed: FeedClient, event: str) -> asyncio.Event:
    """An event set once the client's current connection sends `event` (a request goes out
    through the socket's `emit`, whether python-socketio's `call` or the library sends it)."""
    sio = feed._sio
    assert sio is not None
    sent = asyncio.Event()
    emit = sio.emit

    async def spy(name: str, *args: Any, **kwargs: Any) -> Any:
        result = await emit(name, *args, **kwargs)
        if name == event:
            sent.set()
        return result

    sio.emit = spy
    return sent


async def test_close_ends_a_request_waiting_for_its_answer_at_once() -> None:
    """Before: close() left a request on its way (the network silent, say) waiting for the
    answer of a connection closed under it: `catalog()` raised RequestTimeout `timeout`
    seconds later, not ClosedError at once, and an application's shutdown waited for it."""
    async with harness() as h:
        feed = client(h.url, timeout=30.0)
        await feed.connect()
        try:
            sent = on_send(feed, "catalog")
            h.proxy.hold()  # the answer will not come
            asking = asyncio.create_task(feed.catalog())
            async with asyncio.timeout(WAIT):
                await sent.wait()
            # close() itself may wait a little for the silent connection (python-engineio gives
            # the websocket's closing handshake 5 s): the request must not wait with it.
            closing = asyncio.create_task(feed.close())
            with pytest.raises(ClosedError):
                async with asyncio.timeout(2.0):
                    await asking  # raised RequestTimeout 30 s later
            async with asyncio.timeout(WAIT):
                await closing
        finally:
            await feed.close()
            h.proxy.restore()


async def test_requests_cut_off_by_a_dropped_connection_end_at_once() -> None:
    """Before: a request whose connection dropped before its answer waited out `timeout` for
    an answer that could not come (python-socketio's `call` waits through a drop), then raised
    RequestTimeout; `unsubscribe()` raised it too, though the room was left (a new connection
    starts in none). Now unsubscribe() returns and other requests raise `not_connected`."""
    async with harness() as h, client(h.url, timeout=30.0) as feed:
        gone = feed.subscribe(f"{ROOM}:1")
        kept = feed.subscribe(f"{ROOM}:2")
        async with asyncio.timeout(WAIT):
            await asyncio.gather(gone.ready(), kept.ready())
        heard: list[dict[str, Any]] = []
        gone.on("change", heard.append)
        states: list[str] = []
        changed = asyncio.Event()

        def stated(state: str, info: dict[str, Any]) -> None:
            states.append(state)
            changed.set()

        kept.on("state", stated)

        async def resumed() -> None:
            async with asyncio.timeout(WAIT):
                while "recovered" not in states:
                    changed.clear()
                    await changed.wait()
            states.clear()

        sent = on_send(feed, "unsubscribe")
        h.proxy.hold()
        leaving = asyncio.create_task(gone.unsubscribe())
        async with asyncio.timeout(WAIT):
            await sent.wait()
        h.proxy.cut()  # the connection drops before the answer
        h.proxy.restore()
        async with asyncio.timeout(5.0):
            await leaving  # raised RequestTimeout after 30 s
        await resumed()

        sent = on_send(feed, "catalog")
        h.proxy.hold()
        asking = asyncio.create_task(feed.catalog())
        async with asyncio.timeout(WAIT):
            await sent.wait()
        h.proxy.cut()
        h.proxy.restore()
        with pytest.raises(FeedError) as caught:
            async with asyncio.timeout(5.0):
                await asking
        assert caught.value.code == "not_connected"
        await resumed()

        got: list[dict[str, Any]] = []
        arrived = asyncio.Event()

        def received(change: dict[str, Any]) -> None:
            got.append(change)
            arrived.set()

        kept.on("change", received)
        h.write("public.orders", "insert", {"id": 1, "status": "new"})
        h.write("public.orders", "insert", {"id": 2, "status": "new"})
        async with asyncio.timeout(WAIT):
            await arrived.wait()
        await h.delivered()
        assert [c["after"]["id"] for c in got] == [2]
        assert heard == []


async def test_unsubscribe_of_a_room_whose_resubscribe_waits_for_a_retry_returns() -> None:
    """Before: after a reconnect whose resubscribe the server refused for now (`server_busy`,
    retried later), unsubscribe() raised `not_subscribed`: the server has the client outside
    the room already, which is what was asked. One row or filter room at most: after a cut,
    another client's room takes the slot of this one's (idle meanwhile)."""
    config = "[server]\nfilter_room_grace = 30\n[limits]\nmax_rooms = 1\n"
    async with harness(config) as h, client(h.url) as feed, client(h.direct) as holder:
        sub = feed.subscribe(f"{ROOM}:1")
        async with asyncio.timeout(WAIT):
            await sub.ready()
        refused = asyncio.Event()
        on_ack = sub._on_ack

        async def spy(attempt: int, request: dict[str, Any], ack: dict[str, Any]) -> None:
            if ack.get("ok") is False and ack["error"]["code"] == "server_busy":
                refused.set()
            await on_ack(attempt, request, ack)

        sub._on_ack = spy  # type: ignore[method-assign]
        dropped = asyncio.Event()
        feed.on("disconnect", lambda reason: dropped.set())
        h.proxy.cut()
        async with asyncio.timeout(WAIT):
            await dropped.wait()
            await holder.subscribe(f"{ROOM}:2").ready()  # the idle room 1 makes way for room 2
        h.proxy.restore()
        async with asyncio.timeout(WAIT):
            await refused.wait()
        assert sub.state == "pending"
        async with asyncio.timeout(5.0):
            await sub.unsubscribe()  # raised FeedError not_subscribed
        assert feed.subscriptions == set()


async def test_a_reconnect_while_subscribes_wait_their_turn_asks_for_each_room_once() -> None:
    """Before: the subscribes still waiting for their turn (past the burst, the client pausing
    after `rate_limited` refusals) when the connection dropped were sent on the new connection
    too once the pause was over, beside each subscription's own new subscribe: rooms were asked
    for twice, taking the new connection's burst, and every reconnect in a pause added more.
    Here the connection drops during a pause longer than the reconnect takes (the pause doubles
    while the server, at 2 subscribes a second, goes on refusing)."""
    config = "[limits]\nsubscribe_burst = 10\nsubscribe_rate = 2.0\n"
    rooms = 20
    async with (
        harness(config) as h,
        FeedClient(h.url, reconnection_delay=0.05, reconnection_delay_max=1.0) as feed,
    ):
        loop = asyncio.get_running_loop()
        paused = asyncio.Event()
        refused = feed._pacer.refused

        def spy_refused() -> None:
            refused()
            if feed._pacer._resume_at - loop.time() > 0.3:  # the reconnect takes under 0.1 s
                paused.set()

        feed._pacer.refused = spy_refused  # type: ignore[method-assign]
        subs = [feed.subscribe(f"{ROOM}:{i}") for i in range(1, rooms + 1)]
        answers = [0] * rooms  # subscribe answers taken (not rate_limited) after the drop
        dropped = asyncio.Event()  # (not at the cut: answers in before it may still be handled)
        feed.on("disconnect", lambda reason: dropped.set())
        progress = asyncio.Event()

        def spy_on(index: int, sub: Subscription) -> None:
            on_ack = sub._on_ack

            async def spy(attempt: int, request: dict[str, Any], ack: dict[str, Any]) -> None:
                if dropped.is_set() and ack.get("ok"):
                    answers[index] += 1
                await on_ack(attempt, request, ack)
                progress.set()

            sub._on_ack = spy  # type: ignore[method-assign]

        for index, sub in enumerate(subs):
            spy_on(index, sub)

        async with asyncio.timeout(WAIT):
            await paused.wait()
        assert any(sub.state == "pending" for sub in subs), "some still wait their turn"
        h.proxy.cut()
        async with asyncio.timeout(WAIT):
            await dropped.wait()
        h.proxy.restore()
        async with asyncio.timeout(WAIT):
            while not all(sub.state in ("live", "recovered") for sub in subs):
                progress.clear()
                await progress.wait()
        twice = [(i + 1, n) for i, n in enumerate(answers) if n != 1]
        assert twice == [], "rooms answered other than once after the reconnect"


async def test_a_token_refresh_goes_ahead_of_the_subscribes_waiting_their_turn() -> None:
    """130 rooms at 20 a second past a burst of 10 take about 6 s; the token lasts 4 s and is
    refreshed at 3 s. Before: behind the subscribes, the refresh came after the token expired,
    the server closed the connection, the client subscribed everything again, and so on."""
    config = (
        "[server]\nmax_subscriptions = 300\n[limits]\nsubscribe_burst = 10\nsubscribe_rate = 20.0\n"
    )
    async with (
        harness(config, auth=True) as h,
        client(h.url, token=lambda: make_token(4)) as feed,
    ):
        disconnects: list[str] = []
        feed.on("disconnect", disconnects.append)
        subs = [feed.subscribe(f"{ROOM}:{i}") for i in range(1, ROOMS + 1)]
        async with asyncio.timeout(WAIT):
            await asyncio.gather(*(sub.ready() for sub in subs))
        assert disconnects == []
        assert all(sub.state == "live" for sub in subs)
