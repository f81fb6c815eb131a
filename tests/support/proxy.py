"""A TCP proxy a test can cut like a dropped network (shared by the examples' and clients' tests)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


class CuttableProxy:
    """Forwards TCP to the feed; `cut()` drops every connection and refuses new ones until
    `restore()`, which is what a client sees when the network goes away and comes back.
    `hold()` keeps the connections open but forwards nothing (a network that goes silent, so a
    request waits for an answer that does not come) until `cut()` or `restore()`."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.refusing = False
        self.writers: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.truncate_marker: bytes | None = None
        """When set: the next answer from the feed holding it is forwarded up to the middle of
        its body, then the connection drops (a node killed while its answer crosses a load
        balancer: the client has the headers and part of the body)."""
        self.answer_cut = asyncio.Event()
        """Set when an answer was cut for `truncate_marker`."""
        self.links: set[_Link] = set()
        self._polling = asyncio.Event()
        """Set when a link starts waiting for a long-poll answer (see `cut_waiting_polls`)."""
        self._flowing = asyncio.Event()
        self._flowing.set()
        """Clear while held (`hold`): what arrives waits, unforwarded."""
        self.headers: dict[bytes, bytes] = {}
        """Request headers every request sent from now on carries instead of its own (`rename`)."""

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.writers |= {writer, up_writer}
        link = _Link(writer, up_writer)
        self.links.add(link)
        for source, sink, down in ((reader, up_writer, False), (up_reader, writer, True)):
            task = asyncio.create_task(self._pipe(source, sink, down, link))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _pipe(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, down: bool, link: _Link
    ) -> None:
        try:
            while data := await source.read(65536):
                await self._flowing.wait()
                if down:
                    link.waiting = False  # the answer has begun
                else:
                    if self.headers:
                        data = _renamed(data, self.headers)
                    if _is_poll(data):  # marked before it goes up, so its answer cannot come first
                        link.waiting = True
                        self._polling.set()
                marker = self.truncate_marker
                if down and marker is not None and _mid_body(data, marker):
                    self.truncate_marker = None
                    self.answer_cut.set()
                    sink.write(data[: data.index(marker, data.index(b"\r\n\r\n"))])
                    await sink.drain()
                    break
                sink.write(data)
                await sink.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            sink.transport.abort()
            self.writers.discard(sink)
            self.links.discard(link)

    def cut(self) -> None:
        self.refusing = True
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()
        self._flowing.set()  # what was held goes nowhere now: its connections are gone

    def rename(self, headers: dict[str, str]) -> None:
        """From now on, requests carry these headers instead of their own, as a balancer or a
        browser would send them: `{"Host": "feed.internal"}` (the feed reached by a DNS name),
        `{"Origin": "http://other.example"}` (a page on another site); `{}` stops it. Clients
        cannot send those themselves (socket.io-client's XMLHttpRequest refuses to, as a
        browser's does)."""
        self.headers = {k.lower().encode(): v.encode() for k, v in headers.items()}

    def hold(self) -> None:
        """Forward nothing more, in either direction, and drop nothing (see the class)."""
        self._flowing.clear()

    async def cut_waiting_polls(self, timeout: float) -> int:
        """Drop the connections of the long-poll GETs waiting for their answer (once one waits),
        leaving every other connection, new ones too, alone: a proxy restart or idle timeout
        that closes a pending poll mid-wait. Returns how many were cut."""
        await self.poll_waiting(timeout)
        waiting = [link for link in self.links if link.waiting]
        for link in waiting:
            link.client.transport.abort()
            link.upstream.transport.abort()
        return len(waiting)

    async def poll_waiting(self, timeout: float) -> None:
        """Until a long-poll GET has gone up and no byte of its answer has come back."""
        async with asyncio.timeout(timeout):
            while not any(link.waiting for link in self.links):
                self._polling.clear()
                await self._polling.wait()

    def restore(self) -> None:
        self.refusing = False
        self._flowing.set()

    async def close(self) -> None:
        self.cut()
        for task in list(self.tasks):
            task.cancel()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@dataclass(eq=False)
class _Link:
    """One client connection through the proxy, both of its ends."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    waiting: bool = False
    """A long-poll GET went up and no byte of its answer came back yet: it waits for data."""


def _is_poll(data: bytes) -> bool:
    """Whether `data` starts an Engine.IO long-poll GET (what a polling client leaves waiting)."""
    line = data.split(b"\r\n", 1)[0]
    return line.startswith(b"GET ") and b"transport=polling" in line


def _renamed(data: bytes, headers: dict[bytes, bytes]) -> bytes:
    """`data` with the named headers of the request head it starts with replaced (or added).

    A request head arrives in one piece from the clients (small, one write); anything else, a
    body or a websocket's frames, is passed on as it is."""
    end = data.find(b"\r\n\r\n")
    line = data.split(b"\r\n", 1)[0]
    if end < 0 or not line.endswith(b" HTTP/1.1") or b" " not in line:
        return data
    lines = data[:end].split(b"\r\n")
    kept = [lines[0]] + [h for h in lines[1:] if h.split(b":", 1)[0].strip().lower() not in headers]
    added = [name + b": " + value for name, value in headers.items()]
    return b"\r\n".join(kept + added) + data[end:]


def _mid_body(data: bytes, marker: bytes) -> bool:
    """Whether `data` holds a whole HTTP head and, after it, `marker` in the body."""
    head = data.find(b"\r\n\r\n")
    return data.startswith(b"HTTP/") and head >= 0 and data.find(marker, head) > head


class Blackhole:
    """A TCP proxy that can be switched into a network partition that drops packets.

    `blackhole()`: nothing is forwarded either way and no connection is closed (no RST, no FIN
    reaches either side); what is sent meanwhile is held, as TCP retransmits it, and so is a
    side's close; a new connection is accepted (the kernel would retry its SYN) but reaches the
    target only once the partition lifts. `heal()` connects those, delivers what was held in
    order, then the closes: what a node sent into a partition can reach Redis long after the
    node gave up on it. Unlike `CuttableProxy.hold`, a close on one side never cuts the other
    while the partition lasts.
    """

    def __init__(self, target_port: int, port: int = 0) -> None:
        self.target_port = target_port
        self.port = port
        self.blocked = False
        self.links: set[_Held] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> Blackhole:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Held(self, writer)
        self.links.add(link)
        link.pump(reader, upward=True)
        if not self.blocked:
            await link.connect()

    def blackhole(self) -> None:
        self.blocked = True

    def drop(self) -> None:
        """Reset every connection through it now; the partition, if any, stays: with
        `blackhole()` first, a client's connection is lost at once and its new attempts
        hang (a node whose host went down: the reset reached the client, SYNs go unanswered)."""
        for link in list(self.links):
            link.abort()

    async def heal(self) -> None:
        self.blocked = False
        for link in list(self.links):
            if link.upstream is None and not link.closed:
                await link.connect()
            link.flush()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for link in list(self.links):
            link.abort()
        for link in list(self.links):
            for task in link.tasks:
                task.cancel()
        self.links.clear()
        if self.server is not None:
            await self.server.wait_closed()

    async def __aenter__(self) -> Blackhole:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _Held:
    """One connection through a `Blackhole`, with what waits for the partition to lift."""

    def __init__(self, proxy: Blackhole, client: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.held: dict[bool, list[bytes | None]] = {True: [], False: []}
        """Per direction (upward: towards the target), what waits: data, or None for a close."""
        self.closed = False
        self.tasks: set[asyncio.Task[None]] = set()

    def pump(self, reader: asyncio.StreamReader, upward: bool) -> None:
        task = asyncio.create_task(self._pump(reader, upward))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def connect(self) -> None:
        try:
            up_reader, self.upstream = await asyncio.open_connection(
                "127.0.0.1", self.proxy.target_port
            )
        except OSError:
            self.abort()
            return
        self.pump(up_reader, upward=False)
        if not self.proxy.blocked:
            self.flush()

    async def _pump(self, reader: asyncio.StreamReader, upward: bool) -> None:
        try:
            while data := await reader.read(65536):
                self._forward(upward, data)
        except (OSError, asyncio.IncompleteReadError):
            pass
        self._forward(upward, None)

    def _forward(self, upward: bool, data: bytes | None) -> None:
        waiting = self.proxy.blocked or self.held[upward] or (upward and self.upstream is None)
        if waiting:
            self.held[upward].append(data)
        else:
            self._deliver(upward, data)

    def _deliver(self, upward: bool, data: bytes | None) -> None:
        sink = self.upstream if upward else self.client
        if sink is None or self.closed:
            return
        if data is None:
            self.abort()
        elif not sink.transport.is_closing():
            sink.write(data)

    def flush(self) -> None:
        for upward in (True, False):
            held, self.held[upward] = self.held[upward], []
            for data in held:
                self._deliver(upward, data)

    def abort(self) -> None:
        self.closed = True
        self.proxy.links.discard(self)
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.transport.abort()
