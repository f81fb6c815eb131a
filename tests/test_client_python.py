"""dbfeed_client (clients/python) against the real feed server, the same scenarios as the
JavaScript client's tests (clients/js/test): tests/support/client_harness.py runs the server
behind a proxy the tests cut, and restarts it on the same port."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from dbfeed_client import FeedClient, FeedError, SubscribeError, Subscription, key_text
from dbfeed_client.rows import patched

from tests.support.client_harness import Harness, harness, make_token, snapshot_chunks

ROOM = "mem:public.orders"
WAIT = 20.0


class Log:
    """Everything a subscription reports, in order; waits are on events, with a deadline."""

    def __init__(self, sub: Subscription) -> None:
        self.changes: list[dict[str, Any]] = []
        self.states: list[tuple[str, dict[str, Any]]] = []
        self.snapshots: list[list[dict[str, Any]]] = []
        self.event = asyncio.Event()
        sub.on("change", lambda c: self._add(self.changes, c))
        sub.on("state", lambda s, info: self._add(self.states, (s, info)))
        sub.on("snapshot", lambda rows, info: self._add(self.snapshots, rows))

    def _add(self, into: list[Any], item: Any) -> None:
        into.append(item)
        self.event.set()

    @property
    def names(self) -> list[str]:
        return [s for s, _ in self.states]

    async def until(self, condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not condition():
                    self.event.clear()
                    await self.event.wait()
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


def assert_once_in_order(changes: list[dict[str, Any]], first: int, last: int) -> None:
    assert [c["seq"] for c in changes] == list(range(first, last + 1))
    assert len({c["id"] for c in changes}) == len(changes)


@pytest.fixture
async def feed_server() -> AsyncIterator[Harness]:
    async with harness() as h:
        yield h


def client(url: str | list[str], **options: Any) -> FeedClient:
    return FeedClient(url, reconnection_delay=0.1, reconnection_delay_max=1.0, **options)


async def test_a_burst_arrives_as_changes_and_is_iterated_one_change_at_a_time(
    feed_server: Harness,
) -> None:
    async with (
        client(feed_server.url) as feed,
        feed.subscribe("mem:public.customers", snapshot=True) as sub,
    ):
        assert sub.state == "live"
        feed_server.burst("public.customers", 1, 500)
        got = []
        async with asyncio.timeout(WAIT):
            async for change in sub:
                got.append(change)
                if len(got) == 500:
                    break
        assert_once_in_order(got, 1, 500)
        assert sub.rows is not None and len(sub.rows) == 500
        assert sub.rows["42"] == {"id": 42, "status": "new", "amount": 42}


async def test_the_server_batches_a_burst_into_changes_frames(feed_server: Harness) -> None:
    async with client(feed_server.url) as feed:
        frames: list[int] = []
        assert feed._sio is not None
        library = feed._on_changes

        async def spy(batch: Any) -> None:
            frames.append(len(batch))
            await library(batch)

        feed._sio.on("changes", spy)
        async with feed.subscribe(ROOM) as sub:
            log = Log(sub)
            feed_server.burst("public.orders", 1, 300)
            await log.until(lambda: len(log.changes) == 300, "300 changes")
        assert frames and max(frames) > 1
        assert_once_in_order(log.changes, 1, 300)


async def test_rows_through_inserts_updates_leaving_the_filter_deletes_and_truncate(
    feed_server: Harness,
) -> None:
    db = feed_server
    db.write("public.orders", "insert", {"id": 1, "status": "paid", "amount": 10})
    db.write("public.orders", "insert", {"id": 2, "status": "new", "amount": 20})
    await db.delivered()
    async with client(db.url) as feed:
        paid = feed.subscribe(ROOM, filter="status=eq.paid", snapshot=True)
        every = feed.subscribe(ROOM, snapshot=True)
        log = Log(paid)
        await paid.ready()
        await every.ready()
        assert paid.room == "mem:public.orders?status=eq.paid"
        assert paid.rows == {"1": {"id": 1, "status": "paid", "amount": 10}}

        db.write("public.orders", "update", {"id": 2, "status": "paid"})  # enters the filter
        db.write("public.orders", "update", {"id": 1, "amount": 11})  # stays
        db.write("public.orders", "update", {"id": 1, "status": "refunded"})  # leaves it
        db.write("public.orders", "insert", {"id": 3, "status": "paid", "amount": 30})
        db.write("public.orders", "delete", {"id": 3})
        await log.until(lambda: len(log.changes) == 5, "5 changes in the filter room")
        assert paid.rows == {"2": {"id": 2, "status": "paid", "amount": 20}}
        assert every.rows == db.rows("public.orders")

        db.source.truncate("public.orders")
        await log.until(lambda: paid.rows == {}, "the truncate")
        await db.delivered()
        async with asyncio.timeout(WAIT):
            while every.rows:  # noqa: ASYNC110 - the other subscription's rows
                await asyncio.sleep(0.01)


async def test_a_cut_in_the_middle_of_a_burst_loses_nothing_and_doubles_nothing(
    feed_server: Harness,
) -> None:
    async with client(feed_server.url) as feed, feed.subscribe("mem:public.customers") as sub:
        log = Log(sub)
        first = (sub.seq or 0) + 1

        def cut_at_100(_: Any) -> None:
            if len(log.changes) == 100:
                feed_server.proxy.cut()

        sub.on("change", cut_at_100)
        burst = asyncio.create_task(
            feed_server.spread_burst("public.customers", 10001, 3000, pad=300)
        )
        await log.until(lambda: sub.state == "pending", "the client to notice the cut")
        assert len(log.changes) < 3000, "cut in the middle of the burst"
        feed_server.proxy.restore()
        await log.until(lambda: len(log.changes) == 3000, "all 3000 changes")
        await burst
        assert_once_in_order(log.changes, first, first + 2999)
        recovered = [info for state, info in log.states if state == "recovered"]
        assert recovered and recovered[0]["replayed"] > 0, log.states
        assert "reload" not in log.names
        # The iterator hands out the same changes, once each.
        got = [sub._queue.get_nowait() for _ in range(sub._queue.qsize())]
        assert [c["seq"] for c in got] == [c["seq"] for c in log.changes]


async def test_a_bad_filter_raises_a_typed_error_with_the_servers_message(
    feed_server: Harness,
) -> None:
    async with client(feed_server.url) as feed:
        with pytest.raises(SubscribeError) as caught:
            async with feed.subscribe(ROOM, filter="status=zz.paid"):
                pass
        assert caught.value.code == "bad_filter"
        assert "unknown operator 'zz'" in caught.value.message
        assert isinstance(caught.value, FeedError)
        sub = feed.subscribe("mem:no.such.table")
        with pytest.raises(SubscribeError, match="unknown_target"):
            await sub.ready()
        assert sub.state == "error"


async def test_a_gap_reloads_with_a_fresh_snapshot(feed_server: Harness) -> None:
    async with client(feed_server.url) as feed, feed.subscribe(ROOM, snapshot=True) as sub:
        log = Log(sub)
        feed_server.source.announce_gap("lost events")
        await log.until(lambda: len(log.snapshots) == 1 and sub.state == "live", "a snapshot")
        assert log.names == ["reload", "pending", "live"]
        assert log.states[0][1]["reason"] == "lost events"


async def test_a_server_restart_reloads_with_a_fresh_snapshot_and_the_right_rows() -> None:
    async with harness() as h:
        h.burst("public.orders", 1, 20)
        await h.delivered()
        async with client(h.url) as feed, feed.subscribe(ROOM, snapshot=True) as sub:
            log = Log(sub)
            assert sub.rows is not None and len(sub.rows) == 20
            epoch = sub.epoch
            await h.restart()
            await log.until(lambda: len(log.snapshots) == 1 and sub.state == "live", "snapshot")
            assert sub.epoch != epoch
            assert log.names[-2:] == ["reload", "live"], log.names
            h.write("public.orders", "update", {"id": 5, "status": "paid"})
            h.write("public.orders", "delete", {"id": 6})
            await log.until(lambda: "6" not in (sub.rows or {}), "live after the restart")
            assert sub.rows == h.rows("public.orders")


async def test_a_token_is_refreshed_before_it_expires_and_the_connection_stays_up() -> None:
    async with harness(auth=True) as h:
        minted = 0

        def token() -> str:
            nonlocal minted
            minted += 1
            return make_token(2)

        disconnects: list[str] = []
        async with client(h.url, token=token) as feed:
            feed.on("disconnect", disconnects.append)
            async with feed.subscribe(ROOM) as sub:
                log = Log(sub)
                async with asyncio.timeout(10):
                    # The first token lives 2 s; three refreshes outlive it.
                    while minted < 4:  # noqa: ASYNC110 - no event for a refresh
                        await asyncio.sleep(0.05)
                h.write("public.orders", "insert", {"id": 900, "status": "new"})
                await log.until(lambda: len(log.changes) == 1, "a change after the expiry")
                assert disconnects == []
                assert log.names == []  # never left "live"


async def test_an_expired_token_reconnects_with_a_new_one_and_resumes() -> None:
    async with harness(auth=True) as h:
        minted = 0

        async def token() -> str:
            nonlocal minted
            minted += 1
            return make_token(1.5 if minted == 1 else 300)

        errors: list[str] = []
        async with client(h.url, token=token, refresh_tokens=False) as feed:
            feed.on("error", lambda e: errors.append(e.code))
            async with feed.subscribe(ROOM) as sub:
                log = Log(sub)
                h.write("public.orders", "insert", {"id": 901, "status": "new"})
                await log.until(lambda: "recovered" in log.names, "a resume after the expiry")
                h.write("public.orders", "insert", {"id": 902, "status": "new"})
                await log.until(lambda: len(log.changes) == 2, "both changes")
        assert errors == ["token_expired"]
        assert_once_in_order(log.changes, 1, 2)


async def test_a_refused_token_raises_connect_error() -> None:
    async with harness(auth=True) as h:
        with pytest.raises(FeedError) as caught:
            async with client(h.url, token="not-a-valid-token"):
                pass
        assert caught.value.code == "invalid_token"


async def test_a_fixed_token_refused_for_now_is_retried_until_a_connection_is_free() -> None:
    """`too_many_connections` says "not now", not "not this token": a client with a string token
    whose reconnect is refused so keeps its subscriptions and retries, and comes back when the
    identity's other connection goes (before, every subscription ended in `error` for good)."""
    async with harness("[limits]\nconnections_per_identity = 1\n", auth=True) as h:
        token = make_token(300)
        refused = asyncio.Event()
        async with client(h.url, token=token) as feed, feed.subscribe(ROOM) as sub:

            def on_error(error: FeedError) -> None:
                if error.code == "too_many_connections":
                    refused.set()

            feed.on("error", on_error)
            log = Log(sub)
            h.proxy.cut()  # its connection dropped; the proxy refuses new ones for now
            other = client(h.direct, token=lambda: token)  # retried until the slot is free
            async with other:
                h.proxy.restore()
                async with asyncio.timeout(WAIT):
                    await refused.wait()
            # `other` closed: its slot is free, and the retried reconnect gets it.
            await log.until(lambda: log.names[-1:] == ["recovered"], "a resume", timeout=20)
            h.write("public.orders", "insert", {"id": 904, "status": "new"})
            await log.until(lambda: len(log.changes) == 1, "a change after the resume")
            assert "error" not in log.names


async def test_a_slow_consumer_is_told_to_reload_and_its_rows_stay_right(
    feed_server: Harness,
) -> None:
    async with (
        client(feed_server.url) as feed,
        feed.subscribe(ROOM, snapshot=True, max_queue=50) as sub,
    ):
        log = Log(sub)
        seen: list[dict[str, Any]] = []

        async def consume() -> None:
            async for change in sub:
                seen.append(change)
                log.event.set()
                await asyncio.sleep(0.005)  # a consumer slower than the feed

        consumer = asyncio.create_task(consume())
        try:
            feed_server.burst("public.orders", 1, 500)
            await log.until(lambda: len(log.snapshots) == 1 and sub.state == "live", "reload")
            reasons = [info.get("reason", "") for state, info in log.states if state == "reload"]
            assert any("fell behind" in r for r in reasons), log.states
            assert sub.rows == feed_server.rows("public.orders")
            # Still live afterwards, and the consumer gets what comes next.
            feed_server.write("public.orders", "update", {"id": 7, "status": "paid"})
            await log.until(lambda: any(c["key"] == 7 for c in seen), "the next change")
            assert sub.rows is not None and sub.rows["7"]["status"] == "paid"
            seqs = [c["seq"] for c in seen]
            assert seqs == sorted(set(seqs)), "in order, nothing twice"
            assert len(seen) < 500  # what waited when it fell behind was dropped, and said so
        finally:
            consumer.cancel()


async def test_a_loop_without_snapshot_that_fell_behind_still_resumes_after_a_drop(
    feed_server: Harness,
) -> None:
    """A subscription without a snapshot whose loop fell behind goes `reload` -> `live` and on
    (as in JavaScript); it used to be left marked to subscribe afresh, so the next reconnect
    asked for no replay: what came while disconnected was skipped with no `reload` at all
    (states pending -> live)."""
    async with client(feed_server.url) as feed, feed.subscribe(ROOM, max_queue=10) as sub:
        log = Log(sub)
        first = sub.seq or 0
        aiter(sub)  # a loop that never gets to take a change
        feed_server.burst("public.orders", 5001, 300)  # frames of up to 59 changes
        await log.until(lambda: len(log.changes) == 300, "300 changes to the callbacks")
        assert "reload" in log.names, log.states
        assert log.names[-1] == "live"
        feed_server.proxy.cut()
        await log.until(lambda: sub.state == "pending", "the drop")
        for i in range(5):
            feed_server.write("public.orders", "insert", {"id": 6001 + i, "status": "new"})
        feed_server.proxy.restore()
        await log.until(lambda: sub.state in ("live", "recovered", "reload"), "the resume")
        assert ("recovered", {"replayed": 5}) in log.states, log.states
        await log.until(lambda: len(log.changes) == 305, "the changes made while away")
        assert_once_in_order(log.changes, first + 1, first + 305)


async def test_one_frame_longer_than_max_queue_is_not_a_consumer_falling_behind(
    feed_server: Harness,
) -> None:
    """The consumer cannot run in the middle of a frame: a `changes` frame longer than
    `max_queue` (the catch-up after a snapshot sends all the room had meanwhile in one) was
    counted change by change and always "fell behind", and a reload's snapshot then did the
    same for as long as the writes went on. The queue's bound is judged by what waited before
    the frame."""
    async with (
        client(feed_server.url) as feed,
        feed.subscribe(ROOM, snapshot=True, max_queue=5) as sub,
    ):
        log = Log(sub)
        seen: list[dict[str, Any]] = []

        async def consume() -> None:
            async for change in sub:
                seen.append(change)
                log.event.set()

        consumer = asyncio.create_task(consume())
        try:
            feed_server.burst("public.orders", 1001, 60)  # frames of up to 59 changes
            await log.until(lambda: len(seen) == 60 or "reload" in log.names, "the 60 changes")
            assert "reload" not in log.names, log.states
            assert [c["key"] for c in seen] == list(range(1001, 1061))
            assert sub.rows == feed_server.rows("public.orders")
        finally:
            consumer.cancel()


async def test_a_slow_consumer_within_its_queue_gets_everything(feed_server: Harness) -> None:
    async with client(feed_server.url) as feed, feed.subscribe(ROOM) as sub:
        feed_server.burst("public.orders", 1, 300)
        seen = []
        async with asyncio.timeout(WAIT):
            async for change in sub:
                seen.append(change)
                await asyncio.sleep(0.001)
                if len(seen) == 300:
                    break
        assert_once_in_order(seen, 1, 300)


async def test_callbacks_without_iteration_keep_no_backlog_and_never_reload(
    feed_server: Harness,
) -> None:
    async with client(feed_server.url) as feed, feed.subscribe(ROOM, max_queue=10) as sub:
        log = Log(sub)
        start = sub.seq or 0
        feed_server.burst("public.orders", 1001, 100)
        await log.until(lambda: len(log.changes) == 100, "100 changes to the callback")
        assert "reload" not in log.names, log.states  # nobody fell behind: nobody iterates
        assert sub.seq == start + 100
        assert sub._queue.qsize() == 0, "nothing kept for an iteration nobody runs"


async def test_a_snapshot_in_chunks_is_assembled_before_the_live_changes() -> None:
    config = "[server]\nreplay_buffer = 5000\nsnapshot_chunk_bytes = 4096\n"
    async with harness(config) as h:
        h.burst("public.orders", 1, 300, pad=100)
        await h.delivered()
        async with client(h.url) as feed:
            chunks = snapshot_chunks(feed)
            async with feed.subscribe(ROOM, snapshot=True) as sub:
                log = Log(sub)
                assert chunks, "the server sent the snapshot in chunks"
                assert sub.rows is not None and len(sub.rows) == 300
                h.write("public.orders", "update", {"id": 7, "status": "paid"})
                await log.until(lambda: len(log.changes) == 1, "a live change after the chunks")
                assert sub.rows == h.rows("public.orders")


async def test_several_nodes_when_one_goes_away_whichever_answers_is_used() -> None:
    async with (
        harness() as a,
        harness() as b,
        client([a.url, b.url]) as feed,
        feed.subscribe(ROOM) as sub,
    ):
        log = Log(sub)
        assert feed.url == a.url
        a.proxy.cut()  # node a is gone (its connections dropped, new ones refused)
        await log.until(lambda: feed.url == b.url and sub.state == "live", "node b")
        # Two separate feeds here, so b cannot replay a's numbers: a reload. (The nodes of a
        # cluster share room numbers and history, and the same resume would be `recovered`.)
        assert "reload" in log.names, log.states
        b.write("public.orders", "insert", {"id": 1, "status": "new"})
        await log.until(lambda: len(log.changes) == 1, "a change from node b")


def test_key_text_renders_keys_as_row_room_names_do() -> None:
    assert key_text(42) == "42"
    assert key_text("abc") == "abc"
    assert key_text([7, 2]) == "7,2"
    assert key_text({"order_id": 7, "line": 2}) == "7,2"
    assert key_text({"$oid": "64b7f0c2a1b2c3d4e5f60718"}) == "64b7f0c2a1b2c3d4e5f60718"
    assert key_text(True) == "true"
    assert key_text(None) is None


@pytest.mark.parametrize(
    "key, text",
    json.loads((Path(__file__).parent / "support" / "key_text.json").read_text())["cases"],
)
def test_key_text_follows_the_servers_rule(key: Any, text: str | None) -> None:
    """The server's table (tests/test_change.py checks it there): a Decimal128 `_id` is
    `9.90` on both sides, a whole double `2`, a value inside a key compact JSON."""
    assert key_text(key) == text


async def test_changes_seen_before_are_dropped_by_id(feed_server: Harness) -> None:
    """A resume from an older position (as after restoring a saved one) replays changes this
    subscription already delivered: they are dropped by id, the rest goes on in order."""
    async with client(feed_server.url) as feed, feed.subscribe(ROOM) as sub:
        log = Log(sub)
        feed_server.burst("public.orders", 1, 10)
        await log.until(lambda: len(log.changes) == 10, "10 changes")
        assert sub.seq == 10
        sub.seq = 5  # the server will replay 6..10, which were delivered already
        await sub._send()
        assert log.states[-1] == ("recovered", {"replayed": 5})
        feed_server.burst("public.orders", 11, 2)
        await log.until(lambda: len(log.changes) == 12, "2 more changes")
        assert_once_in_order(log.changes, 1, 12)


async def test_a_hole_in_seq_becomes_a_reload_with_a_fresh_snapshot(feed_server: Harness) -> None:
    async with client(feed_server.url) as feed, feed.subscribe(ROOM, snapshot=True) as sub:
        log = Log(sub)
        feed_server.burst("public.orders", 1, 3)
        await log.until(lambda: len(log.changes) == 3, "3 changes")
        sub.seq = 1  # as if changes 2 and 3 had never arrived
        sub._ids.clear()
        feed_server.write("public.orders", "update", {"id": 2, "status": "paid"})
        await log.until(lambda: len(log.snapshots) == 1 and sub.state == "live", "a reload")
        assert ("reload", {"reason": "changes 2..3 never arrived"}) in log.states
        assert len(log.changes) == 3  # the change after the hole was not passed on
        assert sub.rows == feed_server.rows("public.orders")
        assert sub.rows is not None and sub.rows["2"]["status"] == "paid"


async def test_a_hole_without_snapshot_is_announced_then_the_stream_goes_on(
    feed_server: Harness,
) -> None:
    async with client(feed_server.url) as feed, feed.subscribe(ROOM) as sub:
        log = Log(sub)
        feed_server.burst("public.orders", 1, 3)
        await log.until(lambda: len(log.changes) == 3, "3 changes")
        sub.seq = 1
        sub._ids.clear()
        feed_server.write("public.orders", "insert", {"id": 4})
        await log.until(lambda: len(log.changes) == 4, "the change after the hole")
        assert log.names == ["reload", "live"]
        assert log.states[0][1]["reason"] == "changes 2..3 never arrived"


async def test_a_refused_first_connection_raises_even_with_a_token_function() -> None:
    async with harness(auth=True) as h:
        with pytest.raises(FeedError) as caught:
            async with client(h.url, token=lambda: "not-a-valid-token"):
                pass
        assert caught.value.code == "invalid_token"


async def test_a_gap_while_the_subscribe_is_answered_is_acted_on_after_it(
    feed_server: Harness,
) -> None:
    """A gap can reach a member whose snapshot is still on its way: never dropped silently."""
    async with client(feed_server.url) as feed:
        sub = feed.subscribe(ROOM, snapshot=True)
        log = Log(sub)
        await asyncio.sleep(0)  # the subscribe is on its way
        assert sub._phase == "subscribing"
        sub._gap({"room": ROOM, "reason": "lost while subscribing", "seq": 0})  # as it arrives
        await sub.ready()
        await log.until(lambda: len(log.snapshots) == 2 and sub.state == "live", "a reload")
        assert ("reload", {"reason": "lost while subscribing"}) in log.states


async def test_a_long_poll_answer_cut_mid_body_reconnects_and_resumes(
    feed_server: Harness,
) -> None:
    """A node killed while a poll answer crosses the load balancer: python-engineio's polling
    client loses its read loop without a disconnect (and would stall forever); the client's
    watchdog notices, reconnects and resumes with nothing lost or doubled."""
    async with (
        client(feed_server.url, transports=("polling",)) as feed,
        feed.subscribe("mem:public.customers") as sub,
    ):
        log = Log(sub)
        first = (sub.seq or 0) + 1
        disconnects: list[str] = []
        feed.on("disconnect", disconnects.append)
        feed_server.burst("public.customers", 1, 5)
        await log.until(lambda: len(log.changes) == 5, "the first 5 changes")
        feed_server.proxy.truncate_marker = b'"status":"cut-here"'
        feed_server.write("public.customers", "insert", {"id": 6, "status": "cut-here"})
        await log.until(lambda: "pending" in log.names, "the client to notice the cut answer")
        assert feed_server.proxy.truncate_marker is None, "the answer was cut"
        feed_server.burst("public.customers", 7, 10)
        await log.until(lambda: len(log.changes) == 16, "all 16 changes", timeout=WAIT)
        assert_once_in_order(log.changes, first, first + 15)
        assert disconnects, "the cut was reported as a disconnect"
        assert "recovered" in log.names, log.states


async def test_clients_cut_off_together_come_back_spread_over_time(feed_server: Harness) -> None:
    """Every client of a node that goes away retries: at the same instant, the next node would
    take all their handshakes as one burst. Each retry waits its delay spread by ±50%."""
    feeds = [FeedClient(feed_server.url, reconnection_delay=1.0) for _ in range(20)]
    back: list[float] = []
    loop = asyncio.get_running_loop()
    all_back = asyncio.Event()

    def came_back() -> None:
        back.append(loop.time())
        if len(back) == len(feeds):
            all_back.set()

    try:
        for feed in feeds:
            await feed.connect()
            feed.on("connect", came_back)
        feed_server.proxy.cut()
        feed_server.proxy.restore()
        await asyncio.wait_for(all_back.wait(), WAIT)
        # 20 delays drawn from 0.5 to 1.5 s: without the spread they came back within a few ms.
        assert max(back) - min(back) > 0.4, sorted(t - min(back) for t in back)
    finally:
        for feed in feeds:
            await feed.close()


async def test_a_connect_cancelled_before_the_server_answers_leaves_nothing_running() -> None:
    """`asyncio.timeout` around `async with FeedClient(...)`, or a shutdown, cancels the connect:
    the client stops trying and closes what it opened. Before, its background task went on
    connecting to the server, and its HTTP session and connection were never closed."""
    opened: asyncio.Queue[asyncio.Event] = asyncio.Queue()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        closed = asyncio.Event()
        opened.put_nowait(closed)
        await reader.read()  # the handshake's request, never answered, until the client's EOF
        closed.set()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        before = asyncio.all_tasks()
        feed = FeedClient(f"http://127.0.0.1:{port}", timeout=30.0)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                async with feed:
                    raise AssertionError("the server never answers: not connected")
        closed = await asyncio.wait_for(opened.get(), WAIT)
        await asyncio.wait_for(closed.wait(), WAIT)  # the client closed its connection
        assert not (asyncio.all_tasks() - before - {asyncio.current_task()})
        assert opened.empty()  # and made no new attempt
    finally:
        server.close()
        await server.wait_closed()


def test_an_update_description_applied_to_a_row_gives_the_servers_document() -> None:
    """The same description and document as the JavaScript library's rows.test.mjs."""
    row = {"_id": 1, "status": "new", "lines": [1, 2, 3], "ship": {"city": "Oslo", "zip": "0150"}}
    first = patched(
        row,
        {
            "updatedFields": {"status": "paid", "ship.city": "Bergen", "lines.4": 9, "note.a": 1},
            "removedFields": ["ship.zip"],
        },
    )
    assert first == {
        "_id": 1,
        "status": "paid",
        "lines": [1, 2, 3, None, 9],
        "ship": {"city": "Bergen"},
        "note": {"a": 1},
    }
    assert row["ship"] == {"city": "Oslo", "zip": "0150"}  # the kept row is not changed in place
    second = patched(first, {"truncatedArrays": [{"field": "lines", "newSize": 2}]})
    assert second["lines"] == [1, 2]
    # A path through a value that is neither a document nor an array changes nothing.
    assert patched(second, {"updatedFields": {"status.x": 1}}) == second


async def test_a_change_larger_than_4_mib_is_received_once_without_reconnecting(
    feed_server: Harness,
) -> None:
    # A row with a 5 MB text column (Postgres takes up to 1 GB): aiohttp's websocket refuses a
    # message over 4 MiB by default, so the client closed with 1009, resumed, was replayed the
    # same change and closed again, forever, and never saw it or anything after it.
    async with client(feed_server.url) as feed, feed.subscribe(ROOM) as sub:
        log = Log(sub)
        feed_server.burst("public.orders", 1, 1, pad=5_000_000)
        feed_server.burst("public.orders", 2, 1)
        await log.until(lambda: len(log.changes) == 2, "the wide change and the next", 10.0)
        assert len(log.changes[0]["after"]["pad"]) == 5_000_000
        assert "pending" not in log.names, log.states  # never cut off
