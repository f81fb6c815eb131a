"""Fan-out mechanics with real clients: batching into `changes`, order, catch-up, direct writes."""

from __future__ import annotations

import asyncio
import gc
import json
from typing import Any

import pytest
import socketio
from engineio import packet as eio_packet

from connectors.memory import MemoryConnector
from feed.core.change import Change
from feed.core.filters import parse_filter
from feed.core.rooms import Payload, Room
from feed.delivery.transport import FlushBeforeWaiting, SocketIOTransport, _payload_json
from feed.security.access import Shape, ShapedRoom
from tests.support.server import RunningFeed, running_feed
from tests.support.waiting import wait_until

WAIT = 10.0

CONFIG = """
[server]
replay_buffer = 5000

[[connectors]]
name = "mem"
type = "memory"
targets = ["public.orders", "public.customers"]
"""

ROOM = "mem:public.orders"


class Recorder:
    """A python-socketio client that keeps every event in arrival order, frames unflattened."""

    def __init__(self) -> None:
        self.sio = socketio.AsyncClient(reconnection=False)
        self.events: list[tuple[str, Any]] = []
        self.changed = asyncio.Event()
        self.sio.on("*", self._any)

    async def _any(self, event: str, data: Any = None) -> None:
        self.events.append((event, data))
        self.changed.set()

    async def connect(self, url: str) -> Recorder:
        await self.sio.connect(url, transports=["websocket"], wait_timeout=WAIT)
        return self

    async def subscribe(self, room: str, **fields: Any) -> dict[str, Any]:
        ack: dict[str, Any] = await self.sio.call(
            "subscribe", {"room": room, **fields}, timeout=WAIT
        )
        assert ack["ok"], ack
        return ack

    def changes(self, room: str = ROOM) -> list[dict[str, Any]]:
        flat: list[dict[str, Any]] = []
        for event, data in self.events:
            if event == "change":
                flat.append(data)
            elif event == "changes":
                flat.extend(data)
        return [c for c in flat if c["room"] == room]

    def frames(self, event: str) -> list[Any]:
        return [data for name, data in self.events if name == event]

    async def until(self, count: int, room: str = ROOM, timeout: float = WAIT) -> None:
        async with asyncio.timeout(timeout):
            while len(self.changes(room)) < count:
                self.changed.clear()
                await self.changed.wait()

    async def close(self) -> None:
        await self.sio.disconnect()


def memory(feed: RunningFeed) -> MemoryConnector:
    connector = feed.hub.connectors["mem"]
    assert isinstance(connector, MemoryConnector)
    return connector


def transport(feed: RunningFeed) -> SocketIOTransport:
    assert isinstance(feed.hub.transport, SocketIOTransport)
    return feed.hub.transport


def seqs(changes: list[dict[str, Any]]) -> list[int]:
    return [c["seq"] for c in changes]


async def test_a_burst_arrives_in_order_as_changes_frames_and_a_lone_change_as_change() -> None:
    async with running_feed(CONFIG) as feed:
        client = await Recorder().connect(feed.url)
        try:
            await client.subscribe(ROOM)
            db = memory(feed)
            for i in range(600):  # one synchronous burst: routed within one loop pass
                db.write("public.orders", "insert", {"id": i})
            await client.until(600)
            assert seqs(client.changes()) == list(range(1, 601))
            batches = client.frames("changes")
            assert batches, "a burst should be batched into `changes` frames"
            assert max(len(b) for b in batches) <= 256
            assert all(isinstance(b, list) and b for b in batches)

            before = len(client.events)
            db.write("public.orders", "insert", {"id": 1000})
            await client.until(601)
            assert client.events[before:] == [("change", client.changes()[-1])]
            assert client.changes()[-1]["seq"] == 601
        finally:
            await client.close()


async def test_every_client_sees_every_seq_once_in_order_while_others_join_with_since() -> None:
    """Members join (with `since`, so the hub catches them up) while a writer keeps the room
    busy: changes routed between a join and the end of its catch-up skip the joiner and reach
    it in the catch-up frame instead; none may be lost, repeated or reordered."""
    async with running_feed(CONFIG) as feed:
        db = memory(feed)
        first = await Recorder().connect(feed.url)
        joiners: list[Recorder] = []
        written = 0
        stop = asyncio.Event()

        async def writer() -> None:
            nonlocal written
            while not stop.is_set():
                for _ in range(5):
                    db.write("public.orders", "insert", {"id": written})
                    written += 1
                await asyncio.sleep(0)

        try:
            await first.subscribe(ROOM)
            writing = asyncio.create_task(writer())
            sinces: list[int] = []
            for _ in range(12):
                joiner = await Recorder().connect(feed.url)
                joiners.append(joiner)
                since = max(0, written - 20)
                sinces.append(since)
                ack = await joiner.subscribe(ROOM, since=since)
                assert ack["recovered"] is True
            stop.set()
            await writing
            await first.until(written)
            assert seqs(first.changes()) == list(range(1, written + 1))
            for since, joiner in zip(sinces, joiners, strict=True):
                await joiner.until(written - since)
                assert seqs(joiner.changes()) == list(range(since + 1, written + 1))
        finally:
            stop.set()
            for client in [first, *joiners]:
                await client.close()


async def test_a_member_released_from_catch_up_mid_batch_gets_only_what_was_not_skipped() -> None:
    """Two changes buffered in one pass: the first skips a member being caught up, the second
    does not (it was released in between). Each member gets exactly its own changes, in order."""
    async with running_feed(CONFIG) as feed:
        a = await Recorder().connect(feed.url)
        b = await Recorder().connect(feed.url)
        try:
            await a.subscribe(ROOM)
            await b.subscribe(ROOM)
            sid_b = next(sid for sid in feed.hub.clients if sid != a.sio.get_sid("/"))
            t = transport(feed)
            payloads = [{"room": ROOM, "seq": n, "id": f"x{n}"} for n in (1, 2, 3)]
            await t.send_room(ROOM, "change", payloads[0], [sid_b])
            await t.send_room(ROOM, "change", payloads[1], [])
            await t.send_room(ROOM, "change", payloads[2], [sid_b])
            await a.until(3)
            await b.until(1)
            assert a.events == [("changes", payloads)]
            assert b.events == [("change", payloads[1])]
        finally:
            await a.close()
            await b.close()


async def test_buffered_changes_go_out_before_a_direct_send_or_broadcast() -> None:
    async with running_feed(CONFIG) as feed:
        client = await Recorder().connect(feed.url)
        try:
            await client.subscribe(ROOM)
            (sid,) = feed.hub.clients
            t = transport(feed)
            one = {"room": ROOM, "seq": 1}
            two = {"room": ROOM, "seq": 2}
            await t.send_room(ROOM, "change", one, [])
            await t.send_to(sid, "gap", {"room": ROOM})
            await t.send_room(ROOM, "change", two, [])
            await t.broadcast("status", {"state": "up"})
            async with asyncio.timeout(WAIT):
                while len(client.events) < 4:
                    client.changed.clear()
                    await client.changed.wait()
            assert [e for e, _ in client.events] == ["change", "gap", "change", "status"]
        finally:
            await client.close()


async def test_idle_websocket_clients_are_written_directly_and_busy_ones_through_the_queue() -> (
    None
):
    async with running_feed(CONFIG) as feed:
        clients = [await Recorder().connect(feed.url) for _ in range(3)]
        try:
            for client in clients:
                await client.subscribe(ROOM)
            t = transport(feed)
            direct = t.direct_writes
            db = memory(feed)
            db.write("public.orders", "insert", {"id": 1})
            for client in clients:
                await client.until(1)
            assert t.direct_writes - direct == 3
            # A packet already queued for a client means its writer has work in hand: the next
            # frame must queue behind it, never overtake it.
            for s in feed.app.sio.eio.sockets.values():
                s.queue.put_nowait(eio_packet.Packet(eio_packet.MESSAGE, '2["status",{"n":1}]'))
            queued = t.direct_writes
            await t.send_room(ROOM, "change", {"room": ROOM, "seq": 99}, [])
            t.flush()
            assert t.direct_writes == queued
            for client in clients:
                await client.until(2)
                names = [e for e, _ in client.events]
                assert names[-2:] == ["status", "change"]
        finally:
            for client in clients:
                await client.close()


async def test_a_client_with_compression_gets_frames_compressed_for_it_on_the_direct_path() -> None:
    """Browsers negotiate permessage-deflate: then each frame must go through that connection's
    own compressor (its context carries over between frames), never as the shared bytes."""
    import json

    from websockets.asyncio.client import connect

    async with running_feed(CONFIG) as feed:
        url = feed.url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"
        async with connect(url, compression="deflate", open_timeout=WAIT) as ws:
            assert ws.protocol.extensions, "the server should accept permessage-deflate"

            async def receive() -> str:
                message = await asyncio.wait_for(ws.recv(), WAIT)
                assert isinstance(message, str)
                return message

            assert (await receive()).startswith("0")
            await ws.send("40")
            assert (await receive()).startswith("40")
            await ws.send("420" + json.dumps(["subscribe", {"room": ROOM}]))
            assert (await receive()).startswith("430")
            t = transport(feed)
            direct = t.direct_writes
            db = memory(feed)
            for i in range(3):  # one burst, then a lone change
                db.write("public.orders", "insert", {"id": i})
            events: list[list[Any]] = []  # ["changes", [...]] or ["change", {...}]
            while sum(len(e[1]) if e[0] == "changes" else 1 for e in events) < 3:
                message = await receive()
                if message.startswith("42"):
                    events.append(json.loads(message[2:]))
            db.write("public.orders", "insert", {"id": 9})
            while True:
                message = await receive()
                if message.startswith("42"):
                    events.append(json.loads(message[2:]))
                    break
            assert t.direct_writes > direct
            flat = [c for name, data in events for c in (data if name == "changes" else [data])]
            assert [c["seq"] for c in flat] == [1, 2, 3, 4]
            assert events[-1][0] == "change" and events[-1][1]["after"] == {"id": 9}


async def test_a_client_that_starts_on_long_polling_and_upgrades_gets_everything_in_order() -> None:
    async with running_feed(CONFIG) as feed:
        client = Recorder()
        await client.sio.connect(feed.url, transports=["polling", "websocket"], wait_timeout=WAIT)
        try:
            await client.subscribe(ROOM)
            db = memory(feed)
            total = 0
            for _ in range(20):  # keep changes coming while the upgrade happens
                for _ in range(5):
                    db.write("public.orders", "insert", {"id": total})
                    total += 1
                await asyncio.sleep(0.01)
            await client.until(total)
            assert seqs(client.changes()) == list(range(1, total + 1))
            assert client.sio.transport() == "websocket"
        finally:
            await client.close()


async def test_frames_decode_as_python_socketio_frames_do_and_values_arrive_intact() -> None:
    """The transport writes the Socket.IO text itself (no per-value binary search, orjson):
    a client decodes exactly what python-socketio's own encoding would give it."""
    awkward = {
        "id": 1,
        "name": 'Zoë "quoted" \\ back\nslash \u2028 \U0001f600',
        "ratio": 0.1,
        "nested": {"list": [1, None, True, "x"], "empty": {}},
    }
    huge = {"id": 2, "big": 2**70}  # past 64 bits: orjson refuses, the Packet path takes it
    async with running_feed(CONFIG) as feed:
        for payload in ([awkward, {"id": 3}], [huge]):
            [packet] = transport(feed)._packets("changes", payload).packets
            reference = socketio.packet.Packet(
                socketio.packet.EVENT, namespace="/", data=["changes", payload]
            ).encode()
            text = packet.encode()
            assert text.startswith('42["changes",')
            assert json.loads(text[2:]) == json.loads(reference[1:]) == ["changes", payload]

        client = await Recorder().connect(feed.url)
        try:
            await client.subscribe(ROOM)
            memory(feed).write("public.orders", "insert", awkward)
            memory(feed).write("public.orders", "insert", huge)
            await client.until(2)
            assert [c["after"] for c in client.changes()] == [awkward, huge]
        finally:
            await client.close()


def test_a_change_is_encoded_once_and_each_room_gets_its_own_room_and_seq() -> None:
    """Rooms splice their `room` and `seq` into the change's JSON, encoded once per change; a
    payload edited after numbering (a shaped room masking fields) is encoded as it now is."""
    change = Change(
        "c1", "mem", "memory", "t", "update", 7, {"id": 7, "pw": "a"}, {"id": 7, "pw": "b"}
    )
    plain, other = Room("mem:t", "mem", "t"), Room("mem:t?id=eq.7", "mem", "t")
    shaped = ShapedRoom("mem:t@x", "mem", "t", shape=Shape(None, (("pw",),)))
    payloads = [
        plain.record(change),
        other.record(change),
        other.record(change),
        shaped.record(change),
    ]
    decoded = [json.loads(_payload_json(p)) for p in payloads]
    assert decoded == [dict(p) for p in payloads]
    assert [(d["room"], d["seq"]) for d in decoded] == [
        ("mem:t", 1),
        ("mem:t?id=eq.7", 1),
        ("mem:t?id=eq.7", 2),
        ("mem:t@x", 1),
    ]
    assert decoded[3]["before"] == {"id": 7} and decoded[3]["after"] == {"id": 7}  # masked
    assert "wire_tail" in change.__dict__  # encoded once, shared by the rooms
    leaving = Room("mem:t?pw=eq.a", "mem", "t", filter=parse_filter("pw=eq.a")).record(change)
    assert json.loads(_payload_json(leaving)) == dict(leaving) and leaving["left"] is True
    assert isinstance(payloads[0], Payload) and payloads[0].json_body() is not None
    payloads[0]["after"] = None
    assert payloads[0].json_body() is None  # edited: the splice no longer applies
    assert json.loads(_payload_json(payloads[0]))["after"] is None


async def test_routed_changes_are_flushed_when_the_stream_would_wait_and_not_before() -> None:
    """FlushBeforeWaiting calls `idle` only when the awaited item is not ready, then waits for
    it as a plain `await` would (results, exceptions and cancellation pass through)."""
    flushed: list[str] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    queue.put_nowait(1)
    assert await FlushBeforeWaiting(queue.get(), lambda: flushed.append("x")) == 1
    assert flushed == []  # ready: no flush
    waiter = asyncio.ensure_future(FlushBeforeWaiting(queue.get(), lambda: flushed.append("y")))
    await asyncio.sleep(0)
    assert flushed == ["y"]  # about to wait: flushed first
    queue.put_nowait(2)
    assert await asyncio.wait_for(waiter, WAIT) == 2

    async def failing() -> None:
        await asyncio.sleep(0)
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await FlushBeforeWaiting(failing(), lambda: None)
    stuck = asyncio.ensure_future(FlushBeforeWaiting(queue.get(), lambda: None))
    await asyncio.sleep(0)
    stuck.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stuck
    queue.put_nowait(3)
    assert queue.get_nowait() == 3  # the cancelled getter took nothing


async def test_a_lone_change_goes_out_in_the_writers_call_and_a_burst_behind_it_as_one_frame() -> (
    None
):
    """A pushed change that finds nothing waiting is written before `write` returns (no frame
    buffered for the end of the loop pass); the room's further changes in the same pass leave
    together, as one `changes` frame, when the pass ends."""
    async with running_feed(CONFIG) as feed:
        client = await Recorder().connect(feed.url)
        try:
            await client.subscribe(ROOM)
            t = transport(feed)
            sent = t.frames_sent
            memory(feed).write("public.orders", "insert", {"id": 1})
            assert t.frames_sent == sent + 1 and t.buffered == 0  # written in the call
            for i in range(2, 12):  # the same pass: buffered behind the first
                memory(feed).write("public.orders", "insert", {"id": i})
            assert t.frames_sent == sent + 1 and t.buffered == 10
            await client.until(11)
            assert seqs(client.changes()) == list(range(1, 12))
            batches = [len(body) for body in client.frames("changes")]
            assert batches == [10], f"the rest of the pass as one frame, got {batches}"
        finally:
            await client.close()


async def test_changes_a_stream_had_ready_go_out_as_the_first_then_one_frame() -> None:
    """The stream path (the hub holds the transport while it drains what the stream has ready):
    a room's first change is written as it is routed, the rest leave as one `changes` frame
    when the stream would wait, all in order."""
    async with running_feed(CONFIG) as feed:
        client = await Recorder().connect(feed.url)
        db = memory(feed)
        try:
            await client.subscribe(ROOM)
            await wait_until(lambda: db.sink is not None, what="the hub waiting for the stream")
            db.announce_gap("test gap")  # queued: the writes behind it go through the stream
            for i in range(10):
                db.write("public.orders", "insert", {"id": i})
            await client.until(10)
            assert seqs(client.changes()) == list(range(1, 11))
            after_gap = client.events[[name for name, _ in client.events].index("gap") + 1 :]
            shapes = [(name, len(data) if name == "changes" else 1) for name, data in after_gap]
            assert shapes == [("change", 1), ("changes", 9)], shapes
        finally:
            await client.close()


async def test_a_write_while_the_hub_waits_is_routed_in_the_writers_own_call() -> None:
    """The push path (connectors.base `sink`): a change written while the hub waits for the
    stream is numbered before `write` returns, with no queue or task wake-up in between; a burst
    is still batched, a change written behind a queued gap stays behind it, and a failure while
    routing a pushed change restarts the connector as a failed dispatch does."""
    async with running_feed(CONFIG) as feed:
        client = await Recorder().connect(feed.url)
        db = memory(feed)
        hub = feed.hub
        try:
            await client.subscribe(ROOM)
            await wait_until(lambda: db.sink is not None, what="the hub waiting for the stream")
            room = hub.rooms[ROOM]
            db.write("public.orders", "insert", {"id": 1})
            assert room.seq == 1 and db._queue.empty()  # routed in the call, nothing queued
            assert db._delivered == db._written == 1
            for i in range(2, 302):  # a burst in one pass: one flush at its end
                db.write("public.orders", "insert", {"id": i})
            assert room.seq == 301
            await client.until(301)
            assert seqs(client.changes()) == list(range(1, 302))
            assert len(client.frames("changes")) <= 2, "a pushed burst should go out batched"

            # A gap queued for the stream: a write right behind it must not overtake it.
            db.announce_gap("test gap")
            db.write("public.orders", "insert", {"id": 400})
            assert room.seq == 301  # queued behind the gap, not pushed
            await client.until(302)
            names = [name for name, _ in client.events]
            assert names.index("gap") < len(names) - 1 and names[-1] == "change"
            assert client.changes()[-1]["seq"] == 302

            # Routing a pushed change fails: the writer is unaffected, the stream raises the
            # error and the hub restarts the connector, which then delivers again.
            await wait_until(lambda: db.sink is not None, what="the hub waiting again")
            started = db.started
            original = hub._send

            def broken(change: Change, counted: Any) -> Any:
                hub._send = original  # type: ignore[method-assign]
                raise RuntimeError("routing failed")

            hub._send = broken  # type: ignore[method-assign,assignment]
            db.write("public.orders", "insert", {"id": 500})  # lost, as a failed dispatch is
            await wait_until(lambda: db.started > started, what="the connector restarted")
            db.write("public.orders", "insert", {"id": 501})
            await client.until(303)
            assert client.changes()[-1]["after"]["id"] == 501
        finally:
            await client.close()


async def test_buffered_changes_are_not_objects_the_collector_walks_sent_or_replayed() -> None:
    """A change waits in its room's replay buffer for as long as the buffer keeps it (at many
    rooms, most of the feed's long-lived objects), and every full pass of the garbage collector
    walks every tracked object: a buffer keeps a change's fields in tuples the collector stops
    tracking (docs/benchmarks.md, "Replay buffers and the garbage collector"), and neither the
    live send nor a replay leaves a tracked object per change behind."""
    count = 2000
    async with running_feed(CONFIG) as feed:
        live = await Recorder().connect(feed.url)
        late = await Recorder().connect(feed.url)
        db = memory(feed)
        try:
            await live.subscribe(ROOM)

            def tracked() -> int:
                gc.collect()
                return len(gc.get_objects())

            before = tracked()
            for i in range(count):
                db.write("public.orders", "insert", {"id": i, "total": i * 1.5})
            await live.until(count)
            live.events.clear()  # what the client kept is not the server's
            grown = tracked() - before
            assert grown < count / 2, f"{grown} tracked objects for {count} buffered changes"
            await late.subscribe(ROOM, since=0)  # every change replayed from its buffer
            await late.until(count)
            assert seqs(late.changes()) == list(range(1, count + 1))
            late.events.clear()
            grown = tracked() - before
            assert grown < count / 2, f"{grown} tracked objects after replaying {count} changes"
        finally:
            await live.close()
            await late.close()
