"""The soak's clients: sessions that connect, follow rooms, read slowly, misbehave and leave.

    python -m bench.soak_clients --urls http://127.0.0.1:8001,... --sessions 30 --seed 1
    (started by `python -m bench.soak`; prints "ready", then its counts as JSON after "bye")

Each session loops: connect to one of the nodes, live for 10 to 90 s doing one thing every 1
to 5 s (subscribe to a target, row or filter room, some with a snapshot; unsubscribe; read
nothing for a while; now and then send something hostile; ask for the catalog), then leave,
cleanly or by dropping the TCP connection, and come back a few seconds later resuming some of
its rooms with `since` and the epoch it was given. The clients speak Engine.IO 4 over a raw
WebSocket as bench/wire.py's do, with acks and a socket they can stop reading, and parse every
frame (the rates are modest), keeping each room's last `seq` for their resumes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

from bench.wire import frame, upgrade_request, upgrade_status

TARGETS = ("main:public.orders", "main:public.events")
ROWS = 500
"""Order ids the writer updates (bench.soak's writer keeps `orders` at these ids)."""
USERS = 200
"""The writer's user ids (0..199): `user_id=eq.<n>` filters of these match rows."""
MAX_HELD = 20
"""Rooms a session follows at most (it unsubscribes before it goes past)."""


class Client(asyncio.Protocol):
    """One Socket.IO connection: `request` sends an event and awaits its ack."""

    def __init__(self, host: str, port: int, counts: Counter[str]) -> None:
        self.host, self.port, self.counts = host, port, counts
        self.buf = bytearray()
        self.upgraded = False
        loop = asyncio.get_running_loop()
        self.connected: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.acks: dict[int, asyncio.Future[Any]] = {}
        self.next_id = 0
        self.seqs: dict[str, int] = {}
        """Room -> the last seq seen (from acks, `change` and `changes` frames)."""
        self.epochs: dict[str, str | None] = {}
        """Room -> the epoch its subscribe answered."""
        self.transport: asyncio.Transport | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(upgrade_request(self.host, self.port))

    def connection_lost(self, exc: Exception | None) -> None:
        error = ConnectionError(f"connection lost: {exc}")
        for future in (self.connected, *self.acks.values()):
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: nobody may be waiting for it
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            status = upgrade_status(buf)
            if status is None:
                return
            if b" 101 " not in status:
                self.counts["refused_upgrade"] += 1
                self.abort()
                return
            self.upgraded = True
        # bench/wire.py's frame walk, written out in both: shared as a generator it cost its
        # measuring client about 100 ns more a frame (736 -> 830 ns for one small change).
        pos, size = 0, len(buf)
        while size - pos >= 2:
            length, head = buf[pos + 1] & 0x7F, 2
            if length == 126:
                if size - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            start = pos + head
            if start + length > size:
                break
            opcode, body = buf[pos] & 0x0F, bytes(buf[start : start + length])
            pos = start + length
            if opcode == 9:  # WebSocket ping
                self.write(frame(body, opcode=0xA))
            elif opcode == 8:
                self.close()
            elif opcode == 1:
                self._message(body)
        del buf[:pos]

    # -- Engine.IO / Socket.IO -------------------------------------------------------------

    def _message(self, message: bytes) -> None:
        if message[:1] == b"0":  # Engine.IO open
            self.send("40")
        elif message == b"2":  # Engine.IO ping
            self.send("3")
        elif message.startswith(b"40"):
            if not self.connected.done():
                self.connected.set_result(None)
        elif message.startswith(b"44"):
            self.counts["connect_error"] += 1
            if not self.connected.done():
                self.connected.set_exception(ConnectionError(message.decode(errors="replace")))
        elif message.startswith(b"43"):
            bracket = message.index(b"[")
            future = self.acks.pop(int(message[2:bracket]), None)
            if future is not None and not future.done():
                future.set_result(json.loads(message[bracket:])[0])
        elif message.startswith(b"42"):
            event, data = json.loads(message[2:])[:2]
            self.counts[f"event_{event}"] += 1
            for change in data if event == "changes" else [data] if event == "change" else []:
                self.counts["changes"] += 1
                room, seq = change.get("room"), change.get("seq")
                if isinstance(room, str) and isinstance(seq, int):
                    self.seqs[room] = max(seq, self.seqs.get(room, 0))

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send(self, text: str) -> None:
        self.write(frame(text))

    async def request(self, event: str, body: Any, timeout: float = 30.0) -> Any:
        if self.closed.done():
            raise ConnectionError("connection closed")
        self.next_id += 1
        ack_id = self.next_id
        future = self.acks[ack_id] = asyncio.get_running_loop().create_future()
        self.send(f"42{ack_id}" + json.dumps([event, body]))
        try:
            async with asyncio.timeout(timeout):
                return await future
        finally:
            self.acks.pop(ack_id, None)

    def pause(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


HOSTILE: list[tuple[str, bytes]] = [
    ("bad_json", frame('42["subscribe",{"room":')),
    ("wrong_type", frame('42["subscribe",{"room":5}]')),
    ("bad_filter", frame('42["subscribe",{"room":"main:public.orders","filter":"amount=zz.1"}]')),
    ("unknown_event", frame('42["nosuchevent",{}]')),
    ("negative_since", frame('42["subscribe",{"room":"main:public.orders","since":-5}]')),
    ("unknown_connector", frame('42["subscribe",{"room":"nope:whatever"}]')),
    ("long_room", frame('42["subscribe",{"room":"main:public.orders:' + "x" * 4000 + '"}]')),
    ("oversized", frame('42["subscribe",{"room":"' + "y" * 70_000 + '"}]')),
    ("binary", frame(os.urandom(64), opcode=0x2)),
    ("bad_packet", frame("9nonsense")),
]
"""Things a broken or hostile client sends (each answered with an error, or a disconnect)."""


def random_filter(rng: random.Random) -> str:
    pick = rng.random()
    if pick < 0.3:
        return f"user_id=eq.{rng.randrange(USERS)}"
    if pick < 0.6:  # a room never seen before, as a feed running for days sees many: what the
        # feed keeps per room name it ever saw must go with the room
        return f"user_id=eq.{rng.randrange(USERS, 10**9)}"
    if pick < 0.9:
        return f"status=eq.{rng.choice(['new', 'paid', 'shipped'])}&amount=gt.{rng.randrange(1000)}"
    return f"status=in.(new,paid)&user_id=lt.{rng.randrange(200)}"


class Session:
    """One user of the feed, over many connections."""

    def __init__(self, urls: list[str], rng: random.Random, counts: Counter[str]) -> None:
        self.urls, self.rng, self.counts = urls, rng, counts
        self.memory: dict[str, tuple[dict[str, Any], int, str | None]] = {}
        """Room -> (the subscribe that made it, its last seq, its epoch): resumed after a
        reconnect. The epoch is the room's own: in a cluster every room has one."""

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.connection(stop)
            except Exception as exc:  # counted, and the session goes on with a new connection
                self.counts[f"session_{type(exc).__name__}"] += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.rng.uniform(0.5, 5)):
                    await stop.wait()

    async def connection(self, stop: asyncio.Event) -> None:
        where = urlsplit(self.rng.choice(self.urls))
        host, port = where.hostname or "127.0.0.1", where.port or 80
        loop = asyncio.get_running_loop()
        _, client = await asyncio.wait_for(
            loop.create_connection(lambda: Client(host, port, self.counts), host, port), 10
        )
        try:
            await asyncio.wait_for(client.connected, 10)
            self.counts["connects"] += 1
            held: dict[str, dict[str, Any]] = {}
            for body, seq, epoch in list(self.memory.values())[:5]:  # resume some
                await self.subscribe(client, held, {**body, "since": seq, "epoch": epoch})
            until = loop.time() + self.rng.uniform(10, 90)
            while loop.time() < until and not stop.is_set() and not client.closed.done():
                await self.act(client, held)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.rng.uniform(1, 5)):
                        await asyncio.shield(client.closed)
            self.memory = {
                room: (body, client.seqs.get(room, 0), client.epochs.get(room))
                for room, body in held.items()
            }
        finally:
            if client.closed.done():
                self.counts["dropped_by_server"] += 1
            elif self.rng.random() < 0.3:
                client.abort()
                self.counts["left_abruptly"] += 1
            else:
                client.close()
                self.counts["left_cleanly"] += 1

    async def act(self, client: Client, held: dict[str, dict[str, Any]]) -> None:
        rng = self.rng
        action = rng.choices(
            ["target", "row", "filter", "unsubscribe", "slow", "hostile", "catalog"],
            weights=[5, 4, 6, 6, 0.7, 0.4, 1],
        )[0]
        if action in ("target", "row", "filter") and len(held) >= MAX_HELD:
            action = "unsubscribe"
        self.counts[f"act_{action}"] += 1
        if action == "target":
            body: dict[str, Any] = {"room": rng.choice(TARGETS)}
            if rng.random() < 0.2:
                body["snapshot"] = True
            await self.subscribe(client, held, body)
        elif action == "row":
            await self.subscribe(
                client, held, {"room": f"main:public.orders:{rng.randint(1, ROWS)}"}
            )
        elif action == "filter":
            body = {"room": "main:public.orders", "filter": random_filter(rng)}
            if rng.random() < 0.3:
                body["snapshot"] = True
            await self.subscribe(client, held, body)
        elif action == "unsubscribe" and held:
            room = rng.choice(list(held))
            del held[room]
            ack = await client.request("unsubscribe", {"room": room})
            self.counts["unsubscribed" if ack.get("ok") else "unsubscribe_refused"] += 1
        elif action == "slow":  # stop reading: the server's backlog, or its cut, or a ping timeout
            client.pause()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(rng.uniform(5, 40)):
                    await asyncio.shield(client.closed)
            client.resume()
        elif action == "hostile":
            kind, data = rng.choice(HOSTILE)
            self.counts[f"hostile_{kind}"] += 1
            client.write(data)
        elif action == "catalog":
            await client.request("catalog", {})

    async def subscribe(
        self, client: Client, held: dict[str, dict[str, Any]], body: dict[str, Any]
    ) -> None:
        ack = await client.request("subscribe", body)
        if not ack.get("ok"):
            self.counts[f"refused_{ack.get('error', {}).get('code')}"] += 1
            return
        room = ack["room"]
        client.epochs[room] = ack.get("epoch")
        # A resume has what it missed still to come: its position is its `since` until then.
        start = body["since"] if "since" in body else ack.get("seq")
        client.seqs[room] = max(int(start or 0), client.seqs.get(room, 0))
        held[room] = {k: v for k, v in body.items() if k not in ("since", "epoch", "snapshot")}
        self.counts[f"recovered_{ack.get('recovered')}" if "since" in body else "subscribed"] += 1


async def churn(urls: list[str], sessions: int, seed: int) -> dict[str, int]:
    counts: Counter[str] = Counter()
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(Session(urls, random.Random(seed * 1000 + i), counts).run(stop))
        for i in range(sessions)
    ]
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    while (await loop.run_in_executor(None, sys.stdin.readline)).strip() not in ("bye", ""):
        pass
    stop.set()
    done, pending = await asyncio.wait(tasks, timeout=30)
    for task in pending:
        task.cancel()
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            counts[f"crashed_{type(task.exception()).__name__}"] += 1
    return dict(counts)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak_clients")
    parser.add_argument("--urls", required=True)
    parser.add_argument("--sessions", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    counts = asyncio.run(churn(args.urls.split(","), args.sessions, args.seed))
    print(json.dumps(counts, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
