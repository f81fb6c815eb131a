"""The protocol end to end: real uvicorn, real Socket.IO clients, the in-memory connector."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from connectors.memory import MemoryConnector
from tests.support.server import RunningFeed, feed_client, http_get, running_feed
from tests.support.waiting import wait_until


def source(feed: RunningFeed) -> MemoryConnector:
    connector = feed.hub.connectors["mem"]
    assert isinstance(connector, MemoryConnector)
    return connector


async def test_subscriber_receives_changes_in_order_with_per_room_seq(
    memory_feed: RunningFeed,
) -> None:
    db = source(memory_feed)
    async with feed_client(memory_feed.url) as client:
        ack = await client.subscribe("mem:public.orders")
        assert ack == {
            "ok": True,
            "room": "mem:public.orders",
            "seq": 0,
            "recovered": None,
            "epoch": memory_feed.hub.epoch,
        }
        db.write("public.orders", "insert", {"id": 1, "status": "new"})
        db.write("public.customers", "insert", {"id": 9, "name": "Ann"})
        db.write("public.orders", "update", {"id": 1, "status": "paid"})
        first, second = await client.take(2)
    assert [first["op"], second["op"]] == ["insert", "update"]
    assert [first["seq"], second["seq"]] == [1, 2]
    assert second["before"] == {"id": 1, "status": "new"}
    assert second["after"] == {"id": 1, "status": "paid"}
    assert second["room"] == "mem:public.orders" and second["target"] == "public.orders"
    assert first["id"] != second["id"] and second["ts"].endswith("Z")


async def test_row_room_gets_only_that_row(memory_feed: RunningFeed) -> None:
    db = source(memory_feed)
    async with feed_client(memory_feed.url) as client:
        ack = await client.subscribe("mem:public.orders:2")
        assert ack["ok"] and ack["room"] == "mem:public.orders:2"
        db.write("public.orders", "insert", {"id": 1})
        db.write("public.orders", "insert", {"id": 2})
        change = await client.next_change()
    assert change["key"] == 2 and change["room"] == "mem:public.orders:2" and change["seq"] == 1


async def test_filter_room_delivers_matching_and_rows_that_stop_matching(
    memory_feed: RunningFeed,
) -> None:
    db = source(memory_feed)
    async with feed_client(memory_feed.url) as a, feed_client(memory_feed.url) as b:
        ack_a = await a.subscribe("mem:public.orders", filter="status=eq.paid&amount=gt.100")
        ack_b = await b.subscribe("mem:public.orders", filter="amount=gt.100&status=eq.paid")
        assert ack_a["room"] == ack_b["room"] == "mem:public.orders?amount=gt.100&status=eq.paid"
        db.write("public.orders", "insert", {"id": 1, "status": "paid", "amount": 50})
        db.write("public.orders", "insert", {"id": 2, "status": "paid", "amount": 150})
        db.write("public.orders", "update", {"id": 2, "status": "refunded"})
        got_a = await a.take(2)
        got_b = await b.take(2)
    assert [(c["key"], c["op"]) for c in got_a] == [(2, "insert"), (2, "update")]
    assert got_a == got_b
    assert got_a[1]["after"]["status"] == "refunded"
    filter_rooms = [r for r in memory_feed.hub.rooms.values() if r.filter is not None]
    assert len(filter_rooms) == 1


async def test_unsubscribe_stops_delivery(memory_feed: RunningFeed) -> None:
    db = source(memory_feed)
    async with feed_client(memory_feed.url) as client:
        await client.subscribe("mem:public.orders")
        await client.subscribe("mem:public.customers")
        assert await client.call("unsubscribe", {"room": "mem:public.orders"}) == {
            "ok": True,
            "room": "mem:public.orders",
        }
        db.write("public.orders", "insert", {"id": 1})
        db.write("public.customers", "insert", {"id": 2})
        change = await client.next_change()
    assert change["room"] == "mem:public.customers"


async def test_resume_with_since_replays_missed_changes(memory_feed: RunningFeed) -> None:
    db = source(memory_feed)
    async with feed_client(memory_feed.url) as client:
        await client.subscribe("mem:public.orders")
        db.write("public.orders", "insert", {"id": 1})
        seen = await client.next_change()
    for i in range(2, 5):
        db.write("public.orders", "insert", {"id": i})
    room = memory_feed.hub.rooms["mem:public.orders"]
    await wait_until(lambda: room.seq == 4, what="four changes routed")
    async with feed_client(memory_feed.url) as client:
        ack = await client.subscribe(
            "mem:public.orders", since=seen["seq"], epoch=memory_feed.hub.epoch
        )
        assert ack["ok"] and ack["recovered"] is True and ack["seq"] == 4
        db.write("public.orders", "insert", {"id": 5})
        got = await client.take(4)
    assert [c["seq"] for c in got] == [2, 3, 4, 5]
    assert [c["key"] for c in got] == [2, 3, 4, 5]


async def test_resume_beyond_the_buffer_is_not_recovered(memory_feed: RunningFeed) -> None:
    db = source(memory_feed)
    for i in range(60):  # the buffer holds 50
        db.write("public.orders", "insert", {"id": i})
    room = memory_feed.hub._target_rooms("mem", "public.orders").room
    await wait_until(lambda: room.seq == 60, what="sixty changes routed")
    async with feed_client(memory_feed.url) as client:
        ack = await client.subscribe("mem:public.orders", since=3)
        assert ack["recovered"] is False and ack["seq"] == 60
        other_epoch = await client.subscribe("mem:public.orders", since=59, epoch="0" * 16)
        assert other_epoch["recovered"] is False


async def test_snapshot_then_live_without_loss_or_doubles(memory_feed: RunningFeed) -> None:
    db = source(memory_feed)
    for i in range(1, 4):
        db.write("public.orders", "insert", {"id": i, "status": "paid" if i != 2 else "new"})
    async with feed_client(memory_feed.url) as client:
        ack = await client.subscribe("mem:public.orders", filter="status=eq.paid", snapshot=True)
        assert ack["ok"], ack
        assert sorted(r["id"] for r in ack["snapshot"]) == [1, 3]
        db.write("public.orders", "update", {"id": 2, "status": "paid"})
        change = await client.next_change()
    assert change["key"] == 2 and change["seq"] > ack["seq"]


async def test_gap_is_announced_and_breaks_resume(memory_feed: RunningFeed) -> None:
    db = source(memory_feed)
    async with feed_client(memory_feed.url) as client:
        await client.subscribe("mem:public.orders")
        db.write("public.orders", "insert", {"id": 1})
        await client.next_change()
        db.announce_gap("redis restarted")
        gap = await client.next_gap()
        assert gap["reason"] == "redis restarted" and gap["room"] == "mem:public.orders"
        ack = await client.subscribe("mem:public.orders", since=0)
        assert ack["recovered"] is False


async def test_crashed_connector_restarts_and_others_keep_working(memory_feed: RunningFeed) -> None:
    db = source(memory_feed)
    async with feed_client(memory_feed.url) as client:
        await client.subscribe("mem:public.orders")
        db.crash("connection reset")
        status = await asyncio.wait_for(client.statuses.get(), 5)
        assert status["state"] == "down" and "connection reset" in status["detail"]
        up = await asyncio.wait_for(client.statuses.get(), 5)
        assert up["state"] == "up"
        db.write("public.orders", "insert", {"id": 7})
        change = await client.next_change()
    assert change["key"] == 7 and db.started == 2


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (None, "bad_request"),
        (42, "bad_request"),
        ({"room": ""}, "bad_request"),
        ({"room": 5}, "bad_request"),
        ({"room": "x" * 5000}, "bad_request"),
        ({"room": "nope:public.orders"}, "unknown_connector"),
        ({"room": "mem"}, "unknown_connector"),
        ({"room": "mem:public.nothing"}, "unknown_target"),
        ({"room": "mem:public.orders", "filter": "status=like.x"}, "bad_filter"),
        ({"room": "mem:public.orders", "filter": "status"}, "bad_filter"),
        ({"room": "mem:public.orders", "filter": ["a"]}, "bad_filter"),
        ({"room": "mem:public.orders", "since": "17"}, "bad_since"),
        ({"room": "mem:public.orders", "since": -1}, "bad_since"),
        ({"room": "mem:public.orders", "since": True}, "bad_since"),
        ({"room": "mem:public.orders", "snapshot": "yes"}, "bad_request"),
        ({"room": "mem:public.orders", "extra": 1}, "bad_request"),
    ],
)
async def test_bad_subscribe_gets_error_ack_and_connection_survives(
    memory_feed: RunningFeed, payload: Any, code: str
) -> None:
    db = source(memory_feed)
    async with feed_client(memory_feed.url) as client:
        ack = await client.call("subscribe", payload)
        assert ack["ok"] is False and ack["error"]["code"] == code, ack
        assert isinstance(ack["error"]["message"], str) and ack["error"]["message"]
        assert (await client.subscribe("mem:public.orders"))["ok"]
        db.write("public.orders", "insert", {"id": 1})
        assert (await client.next_change())["key"] == 1


async def test_subscription_limit(memory_feed: RunningFeed) -> None:
    memory_feed.hub.settings = type(memory_feed.hub.settings)(max_subscriptions=2)
    async with feed_client(memory_feed.url) as client:
        assert (await client.subscribe("mem:public.orders"))["ok"]
        assert (await client.subscribe("mem:public.customers"))["ok"]
        ack = await client.subscribe("mem:public.orders:1")
        assert ack["error"]["code"] == "too_many_subscriptions"


async def test_catalog_lists_connectors_targets_and_status(memory_feed: RunningFeed) -> None:
    async with feed_client(memory_feed.url) as client:
        catalog = await client.call("catalog")
    [mem] = catalog["connectors"]
    assert mem["name"] == "mem" and mem["type"] == "memory"
    assert mem["targets"] == ["public.orders", "public.customers"]
    assert mem["status"]["state"] == "up"


async def test_health_readiness_and_metrics(memory_feed: RunningFeed) -> None:
    db = source(memory_feed)
    async with feed_client(memory_feed.url) as client:
        await client.subscribe("mem:public.orders")
        db.write("public.orders", "insert", {"id": 1})
        await client.next_change()
        assert await http_get(memory_feed.url + "/healthz") == (200, '{"status": "ok"}')
        status, body = await http_get(memory_feed.url + "/readyz")
        assert status == 200 and json.loads(body)["ready"] is True
        status, metrics = await http_get(memory_feed.url + "/metrics")
    assert status == 200
    assert 'feed_changes_in_total{connector="mem"} 1' in metrics
    assert 'feed_changes_out_total{connector="mem"} 1' in metrics
    assert "feed_clients 1" in metrics
    assert 'feed_connector_up{connector="mem"} 1' in metrics


async def test_filter_room_expires_after_grace(memory_feed: RunningFeed) -> None:
    async with feed_client(memory_feed.url) as client:
        ack = await client.subscribe("mem:public.orders", filter="status=eq.paid")
        name = ack["room"]
        assert name in memory_feed.hub.rooms
    await wait_until(lambda: name not in memory_feed.hub.rooms, what="filter room expiry")
    assert "mem:public.orders" in memory_feed.hub.rooms


async def test_resume_from_the_seq_of_a_gap_is_not_recovered(memory_feed: RunningFeed) -> None:
    """Whatever the source lost came after the last numbered change: resuming from it is unsafe."""
    db = source(memory_feed)
    async with feed_client(memory_feed.url) as client:
        await client.subscribe("mem:public.orders")
        db.write("public.orders", "insert", {"id": 1})
        last = await client.next_change()
        db.announce_gap("pubsub connection dropped")
        await client.next_gap()
        db.write("public.orders", "insert", {"id": 2})
        after_gap = await client.next_change()
    async with feed_client(memory_feed.url) as client:
        stale = await client.subscribe("mem:public.orders", since=last["seq"])
        fresh = await client.subscribe("mem:public.orders", since=after_gap["seq"])
    assert stale["recovered"] is False
    assert fresh["recovered"] is True


async def test_a_row_leaving_a_filter_is_marked_left_and_a_truncate_reaches_every_room(
    memory_feed: RunningFeed,
) -> None:
    """What the client libraries rely on to keep `rows` right in filter and row rooms."""
    db = source(memory_feed)
    async with feed_client(memory_feed.url) as client:
        assert (await client.subscribe("mem:public.orders", filter="status=eq.paid"))["ok"]
        assert (await client.subscribe("mem:public.orders:1"))["ok"]
        db.write("public.orders", "insert", {"id": 1, "status": "paid"})
        db.write("public.orders", "update", {"id": 1, "status": "refunded"})
        got = await client.take(4)
        by_room: dict[str, list[dict[str, Any]]] = {}
        for change in got:
            by_room.setdefault(change["room"], []).append(change)
        entered, left = by_room["mem:public.orders?status=eq.paid"]
        assert "left" not in entered
        assert left["left"] is True and left["after"]["status"] == "refunded"
        assert all("left" not in c for c in by_room["mem:public.orders:1"])  # no filter there

        db.truncate("public.orders")
        truncates = await client.take(2)
        assert {c["room"] for c in truncates} == {
            "mem:public.orders?status=eq.paid",
            "mem:public.orders:1",
        }
        assert all(c["op"] == "truncate" and c["key"] is None for c in truncates)


async def test_a_replay_is_exactly_what_was_sent_live_left_flag_included(
    memory_feed: RunningFeed,
) -> None:
    """Replay buffers keep the change, not the payload sent: the payload rebuilt for a replay
    must be the live one, byte for byte in meaning (`left` too)."""
    db = source(memory_feed)
    room, paid = "mem:public.orders", "status=eq.paid"
    async with feed_client(memory_feed.url) as live:
        assert (await live.subscribe(room, filter=paid))["ok"]
        db.write("public.orders", "insert", {"id": 1, "status": "paid", "n": 1.5})
        db.write("public.orders", "update", {"id": 1, "status": "refunded"})
        sent = await live.take(2)
        assert [c.get("left") for c in sent] == [None, True]
        async with feed_client(memory_feed.url) as late:
            ack = await late.subscribe(room, filter=paid, since=0)
            assert ack["recovered"] is True
            replayed = await late.take(2)
    assert replayed == sent


NO_BEFORE = """
[server]
replay_buffer = 100

[[connectors]]
name = "mem"
type = "memory"
targets = ["public.orders"]
before_images = false
"""


async def test_a_snapshot_taken_after_a_gap_is_not_told_of_it_again(
    memory_feed: RunningFeed,
) -> None:
    """A client reloads after a gap: its snapshot, read after the gap, is whole. When changes
    came while it was read, the catch-up used to find the room's number at the gap and send a
    second gap for it, and the client reloaded again (one more snapshot per client per gap)."""
    db = source(memory_feed)
    async with feed_client(memory_feed.url) as watcher:
        await watcher.subscribe("mem:public.orders")
        db.write("public.orders", "insert", {"id": 1})
        await watcher.next_change()
        db.announce_gap("pubsub connection dropped")
        await watcher.next_gap()
    read = db.snapshot

    async def read_then_write(address: Any, where: Any, limit: int) -> Any:
        snapshot = await read(address, where, limit)
        late = db.write("public.orders", "insert", {"id": 2})  # after the snapshot's point
        await db.routed(late.position)
        return snapshot

    db.snapshot = read_then_write  # type: ignore[method-assign]
    async with feed_client(memory_feed.url) as client:
        ack = await client.subscribe("mem:public.orders", snapshot=True)
        assert ack["snapshot_keys"] == ["1"]
        assert (await client.next_change())["key"] == 2
        db.write("public.orders", "insert", {"id": 3})  # a marker: all before it has come
        assert (await client.next_change())["key"] == 3
        assert client.gaps.empty()


async def test_a_second_subscription_to_a_room_takes_nothing_from_the_first(
    memory_feed: RunningFeed,
) -> None:
    """A client follows a room, then subscribes to it again with a snapshot (the libraries open
    one server subscription per call). The catch-up left out what the new snapshot covers, but
    the client's stream of the room is one: the first subscription lost those changes, and
    after a snapshot a jump in numbers is expected, so nothing told it."""
    db = source(memory_feed)
    read = db.snapshot

    async def write_then_read(address: Any, where: Any, limit: int) -> Any:
        covered = db.write("public.orders", "insert", {"id": 2})  # the snapshot reflects it
        await db.routed(covered.position)
        return await read(address, where, limit)

    async with feed_client(memory_feed.url) as client:
        first = await client.subscribe("mem:public.orders")
        db.write("public.orders", "insert", {"id": 1})
        assert (await client.next_change())["seq"] == first["seq"] + 1
        db.snapshot = write_then_read  # type: ignore[method-assign]
        again = await client.subscribe("mem:public.orders", snapshot=True)
        assert again["snapshot_keys"] == ["1", "2"]
        db.write("public.orders", "insert", {"id": 3})
        got = [await client.next_change(), await client.next_change()]
    assert [(c["seq"], c["key"]) for c in got] == [
        (first["seq"] + 2, 2),
        (first["seq"] + 3, 3),
    ]


def gap_while_the_snapshot_is_read(feed: RunningFeed) -> None:
    """The next snapshot of the memory connector announces a gap, with no change after it in
    the room, once its rows are read; the snapshots after it are plain."""
    db = source(feed)
    db.write("public.orders", "insert", {"id": 1})
    read = db.snapshot

    async def read_then_gap(address: Any, where: Any, limit: int) -> Any:
        snapshot = await read(address, where, limit)
        db.snapshot = read  # type: ignore[method-assign]
        db.announce_gap("lost while you subscribed")
        marker = db.write("public.customers", "insert", {"id": 9})  # routed after the gap
        await db.routed(marker.position)
        return snapshot

    db.snapshot = read_then_gap  # type: ignore[method-assign]


async def test_a_gap_while_a_snapshot_is_read_reaches_the_client_library(
    memory_feed: RunningFeed,
) -> None:
    """A gap announced while a subscriber's snapshot is read goes to the room's members, the
    new one too, but before its subscribe's answer: a client then has no subscription to give
    it to (the room's name comes in the answer). The catch-up sends it again after the answer,
    so the library reloads; with no change after the gap, nothing told it before."""
    from dbfeed_client import FeedClient

    gap_while_the_snapshot_is_read(memory_feed)
    async with FeedClient(memory_feed.url) as client:
        sub = client.subscribe("mem:public.orders", snapshot=True)
        states: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        sub.on("state", lambda state, info=None: states.put_nowait((state, info)))
        await asyncio.wait_for(sub.ready(), 10)
        seen = [await asyncio.wait_for(states.get(), 10) for _ in range(4)]
        await sub.unsubscribe()
    assert [state for state, _ in seen] == ["live", "reload", "pending", "live"], seen
    assert seen[1][1]["reason"] == "lost while you subscribed"


async def test_every_gap_carries_the_documented_fields(memory_feed: RunningFeed) -> None:
    """A gap announced while a subscribe is answered reaches the new member twice: with the
    room (before the answer) and again from its catch-up (after it). docs/protocol.md lists
    `{connector, room, target, reason, seq, epoch, ts}`; the catch-up's copy had no `ts`."""
    gap_while_the_snapshot_is_read(memory_feed)
    async with feed_client(memory_feed.url) as client:
        ack = await client.subscribe("mem:public.orders", snapshot=True)
        assert ack["ok"], ack
        gaps = [await client.next_gap(), await client.next_gap()]
    fields = {"connector", "room", "target", "reason", "seq", "epoch", "ts"}
    for gap in gaps:
        assert set(gap) == fields, gap
        assert gap["room"] == "mem:public.orders" and gap["epoch"] == ack["epoch"]
        assert isinstance(gap["ts"], str) and gap["ts"].endswith("Z")


async def test_rows_leaving_while_a_snapshot_is_read_reach_the_subscriber_or_a_gap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without before images, a row of the snapshot that leaves after its point, before the
    room holds its rows, is sent to the room then (`left`); when too many rows changed during
    the read to tell, the subscriber gets a gap after its snapshot instead."""
    async with running_feed(NO_BEFORE) as feed:
        db = source(feed)
        for key in (1, 2, 3):
            db.write("public.orders", "insert", {"id": key, "status": "paid"})
        read = db.snapshot

        async def read_then_write(address: Any, where: Any, limit: int) -> Any:
            snapshot = await read(address, where, limit)
            db.write("public.orders", "update", {"id": 1, "status": "refunded"})  # after its point
            db.write("public.orders", "update", {"id": 3, "status": "refunded"})
            back = db.write("public.orders", "update", {"id": 3, "status": "paid"})  # sent live
            await db.routed(back.position)  # all three routed before the snapshot returns
            return snapshot

        db.snapshot = read_then_write  # type: ignore[method-assign]
        async with feed_client(feed.url) as client:
            ack = await client.subscribe(
                "mem:public.orders", filter="status=eq.paid", snapshot=True
            )
            assert sorted(ack["snapshot_keys"]) == ["1", "2", "3"]
            got = await client.take(2)
            assert sorted((c["key"], c["after"]["status"], c.get("left")) for c in got) == [
                (1, "refunded", True),
                (3, "paid", None),
            ]
            db.write("public.orders", "update", {"id": 1, "status": "new"})  # not held: not sent
            db.write("public.orders", "update", {"id": 2, "status": "new"})
            assert (await client.next_change())["key"] == 2
        monkeypatch.setattr("feed.core.filter_index.WATCH_LIMIT", 1)
        async with feed_client(feed.url) as client:
            ack = await client.subscribe("mem:public.orders", filter="status=eq.new", snapshot=True)
            assert ack["ok"]
            gap = await client.next_gap()
            assert gap["reason"].startswith("too many rows changed while the snapshot was read")
