"""Lightweight Socket.IO clients for load: Engine.IO 4 over a raw WebSocket, as asyncio protocols.

Thousands of python-socketio AsyncClients would cost far more CPU than the server they measure
(the clients share the machine's two cores with it), so the load clients speak the wire protocol
themselves: the same HTTP upgrade, `0` open packet, `40` namespace connect, `420["subscribe",...]`
with its ack, and `42["change",...]` / `42["changes",[...]]` events that socket.io-client sees
with `transports: ["websocket"]`. The server cannot tell them from any other client.

A client counts the changes it receives with one C-level scan of each frame (every change carries
one `"seq":`), and a few "probe" clients per process also parse every frame to time it: the
payload's `after.t` (or the key, for Redis) holds the writer's `time.time()` before the commit.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import time
from collections.abc import Callable
from typing import Any

SEQ = b'"seq":'
CHANGE = b'42["change",'
CHANGES = b'42["changes",'
GAP = b'42["gap",'


def default_stamp(change: dict[str, Any]) -> float | None:
    """The writer's timestamp of a change: `after.t` for rows, `key` `bench:<n>:<t>` for Redis."""
    after = change.get("after")
    if isinstance(after, dict) and isinstance(after.get("t"), int | float):
        return float(after["t"])
    key = change.get("key")
    if isinstance(key, str) and key.count(":") >= 2:
        try:
            return float(key.rsplit(":", 1)[1])
        except ValueError:
            return None
    return None


def frame(text: str | bytes, opcode: int = 0x1) -> bytes:
    """A masked client frame (clients must mask, RFC 6455 5.3); text unless `opcode` says."""
    payload = text.encode() if isinstance(text, str) else text
    mask = os.urandom(4)
    n = len(payload)
    first = 0x80 | opcode
    if n < 126:
        header = struct.pack("!BB", first, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, n)
    masked = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
    return header + mask + masked


def upgrade_request(host: str, port: int) -> bytes:
    """The HTTP request that opens Engine.IO's websocket transport, with a fresh key."""
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        "GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def upgrade_status(buf: bytearray) -> bytes | None:
    """The status line of the answer to `upgrade_request` once all its head is in `buf` (the
    head then taken off `buf`, leaving the first frames), else None: wait for more. It holds
    " 101 " when the server switched to the websocket."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    status = bytes(buf[: buf.find(b"\r\n")])
    del buf[: end + 4]
    return status


class Stats:
    """Counters shared by the clients of one process."""

    def __init__(self) -> None:
        self.changes = 0
        self.frames = 0
        self.latencies: list[float] = []
        self.gaps: list[str] = []
        self.disconnected = 0
        self.last_receive = 0.0

    def reset(self) -> None:
        self.changes = 0
        self.frames = 0
        self.latencies = []


class SioClient(asyncio.Protocol):
    """One Socket.IO client: connect, join `room`, count (and optionally time) what arrives."""

    def __init__(
        self,
        host: str,
        port: int,
        room: str,
        stats: Stats,
        probe: bool = False,
        stamp: Callable[[dict[str, Any]], float | None] = default_stamp,
        subscribe: dict[str, Any] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.room = room
        self.stats = stats
        self.probe = probe
        self.stamp = stamp
        self.subscribe_body = subscribe or {"room": room}
        self.buf = bytearray()
        self.upgraded = False
        self.ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(upgrade_request(self.host, self.port))

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.disconnected += 1
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"connection lost: {exc}"))

    def send_text(self, text: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(text))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            status = upgrade_status(buf)
            if status is None:
                return
            if b" 101 " not in status:
                if not self.ready.done():
                    self.ready.set_exception(ConnectionError(status.decode(errors="replace")))
                self.close()
                return
            self.upgraded = True
        pos = 0
        size = len(buf)
        frames = 0
        while size - pos >= 2:
            b1 = buf[pos + 1] & 0x7F
            head = 2
            if b1 == 126:
                if size - pos < 4:
                    break
                b1 = (buf[pos + 2] << 8) | buf[pos + 3]
                head = 4
            elif b1 == 127:
                if size - pos < 10:
                    break
                b1 = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            start = pos + head
            end = start + b1
            if end > size:
                break
            opcode = buf[pos] & 0x0F
            pos = end
            if opcode != 1:
                if opcode == 9 and self.transport is not None:  # WebSocket ping (uvicorn's)
                    self.transport.write(frame(bytes(buf[start:end]), opcode=0xA))
                elif opcode == 8:
                    self.close()
                continue
            frames += 1
            if buf.startswith(CHANGE, start) or buf.startswith(CHANGES, start):
                self.stats.changes += buf.count(SEQ, start, end)
                if self.probe:
                    self._time(bytes(buf[start + 2 : end]))
            else:
                self._control(bytes(buf[start:end]))
        if pos:
            del buf[:pos]
        if frames:
            self.stats.frames += frames
            self.stats.last_receive = time.monotonic()

    def _time(self, body: bytes) -> None:
        now = time.time()
        event, data = json.loads(body)
        for change in data if event == "changes" else [data]:
            t = self.stamp(change)
            if t is not None:
                self.stats.latencies.append(now - t)

    def _control(self, message: bytes) -> None:
        kind = message[:1]
        if kind == b"0":  # Engine.IO open
            self.send_text("40")
        elif kind == b"2":  # Engine.IO ping
            self.send_text("3")
        elif message.startswith(b"40"):  # namespace connected
            self.send_text("420" + json.dumps(["subscribe", self.subscribe_body]))
        elif message.startswith(b"430"):  # our subscribe ack
            ack = json.loads(message[3:])[0]
            if not self.ready.done():
                if ack.get("ok"):
                    self.ready.set_result(ack)
                else:
                    self.ready.set_exception(ConnectionError(f"subscribe refused: {ack}"))
        elif message.startswith(GAP):  # loss announced for our room: the bench reports it
            self.stats.gaps.append(str(json.loads(message[2:])[1].get("reason")))
        elif message.startswith(b"44") and not self.ready.done():  # connect error
            self.ready.set_exception(ConnectionError(message.decode(errors="replace")))


async def connect_many(
    host: str,
    port: int,
    room: str | list[str],
    count: int,
    stats: Stats,
    probes: int = 1,
    concurrency: int = 64,
    timeout: float = 60.0,
    stamp: Callable[[dict[str, Any]], float | None] = default_stamp,
) -> list[SioClient]:
    """Open `count` clients (the first `probes` of them time what they receive, from `stamp`)."""
    loop = asyncio.get_running_loop()
    rooms = [room] if isinstance(room, str) else room
    clients: list[SioClient] = []
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            target = rooms[i % len(rooms)]
            _, client = await loop.create_connection(
                lambda: SioClient(host, port, target, stats, probe=i < probes, stamp=stamp),
                host,
                port,
            )
            clients.append(client)
            await client.ready

    async with asyncio.timeout(timeout):
        await asyncio.gather(*(one(i) for i in range(count)))
    return clients
