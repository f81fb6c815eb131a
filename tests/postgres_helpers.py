"""Helpers shared by the Postgres connector tests: build a connector, read its stream."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from connectors.base import State
from connectors.postgres import PostgresConnector
from feed.core.change import Change, Gap
from feed.options import Options
from tests.support.waiting import wait_until

WAIT = 15.0


def make_connector(
    url: str, tables: list[str], name: str = "main", **extra: Any
) -> PostgresConnector:
    options: dict[str, Any] = {
        "dsn": url,
        "tables": tables,
        "auto_migrate": True,
        "heartbeat_interval": 0.5,
        "heartbeat_timeout": 1.0,
        "reconnect_max": 0.5,
        "standby_interval": 0.1,
        "connect_timeout": 5.0,
    }
    options.update(extra)
    return PostgresConnector(name, Options(options, f"connectors.{name}"))


class Stream:
    """Iterates a started connector's changes() in the background, like the hub does."""

    def __init__(
        self,
        connector: PostgresConnector,
        pull_limit: int | None = None,
        pause_after: int | None = None,
    ) -> None:
        self.connector = connector
        self.pull_limit = pull_limit
        self.pause_after = pause_after
        self.paused = asyncio.Event()
        """Set once `pause_after` items were pulled: the reader waits for `carry_on`."""
        self._carry_on = asyncio.Event()
        self.queue: asyncio.Queue[Change | Gap | BaseException] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.states: list[State] = []
        self.history: list[str] = []  # what a timed-out wait reports: where the reader was
        self.started = time.monotonic()
        connector.on_status(self._on_status)

    def _on_status(self, status: Any) -> None:
        self.states.append(status.state)
        at = time.monotonic() - self.started
        self.history.append(f"{at:.2f}s {status.state.value}: {status.detail}")

    async def _run(self) -> None:
        try:
            pulled = 0
            async for item in self.connector.changes():
                self.queue.put_nowait(item)
                pulled += 1
                if self.pull_limit is not None and pulled >= self.pull_limit:
                    # Never ask for the next item: the last one stays unacknowledged, as
                    # when a hub stops between routing an item and asking for the next.
                    await asyncio.Event().wait()
                if pulled == self.pause_after:  # mid-batch: what commits now is not in it
                    self.paused.set()
                    await self._carry_on.wait()
        except Exception as exc:
            self.queue.put_nowait(exc)

    def carry_on(self) -> None:
        self._carry_on.set()

    def begin(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def end(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self.task, WAIT)

    async def next(self, timeout: float = WAIT) -> Change:
        try:
            item = await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"no change within {timeout}s; the connector's statuses:\n  "
                + "\n  ".join(self.history)
            ) from None
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, Change), item
        return item

    async def gap(self, timeout: float = WAIT) -> Gap:
        """The next item, which must be a gap."""
        try:
            item = await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"no gap within {timeout}s; the connector's statuses:\n  "
                + "\n  ".join(self.history)
            ) from None
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, Gap), item
        return item

    async def take(self, count: int, timeout: float = WAIT) -> list[Change]:
        return [await self.next(timeout) for _ in range(count)]

    def assert_idle(self) -> None:
        assert self.queue.empty(), f"unexpected extra item: {self.queue.get_nowait()!r}"

    async def wait_active(self, timeout: float = WAIT) -> None:
        """Until this connector holds the reader lock and listens."""
        await wait_until(lambda: self.connector._active, timeout, "the reader to become active")


@asynccontextmanager
async def streaming(
    connector: PostgresConnector, pull_limit: int | None = None, pause_after: int | None = None
) -> AsyncIterator[Stream]:
    """Start the connector, read its stream in the background, stop both afterwards."""
    stream = Stream(connector, pull_limit, pause_after)
    await asyncio.wait_for(connector.start(), WAIT)
    stream.begin()
    try:
        await stream.wait_active()
        yield stream
    finally:
        await stream.end()
        await asyncio.wait_for(connector.stop(), WAIT)


class TcpProxy:
    """A TCP forwarder between the connector and Postgres that a test can break on purpose.

    `cut()` closes every connection and refuses new ones (an outage the client notices at once);
    `freeze()` stops forwarding bytes on the open connections without closing them (a half-open
    connection: only a heartbeat can notice it); `restore()` accepts and forwards again.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.server: asyncio.Server | None = None
        self.refusing = False
        self.accepted = 0
        self._pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter, list[bool]]] = []
        self._frozen: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter, list[bool]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> TcpProxy:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        for a, b, _ in self._frozen:
            a.close()
            b.close()
        if self.server is not None:
            self.server.close()
        for task in list(self._tasks):
            task.cancel()

    @classmethod
    def for_url(cls, url: str) -> TcpProxy:
        match = re.match(r"^\w+://[^@/]*@([^:/]+):(\d+)/", url)
        assert match, f"cannot proxy {url!r}: the tests need a host:port URL"
        return cls(match.group(1), int(match.group(2)))

    def url(self, url: str) -> str:
        """`url` with its host:port replaced by the proxy's."""
        head, _, rest = url.partition("@")
        _, _, path = rest.partition("/")
        return f"{head}@127.0.0.1:{self.port}/{path}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        self.accepted += 1
        frozen_now = [False]
        self._pairs.append((writer, up_writer, frozen_now))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst, frozen_now))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, frozen_now: list[bool]
    ) -> None:
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                if frozen_now[0]:
                    continue  # swallowed: neither side hears from the other again
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            if not frozen_now[0]:
                dst.close()

    def cut(self) -> None:
        self.refusing = True
        for a, b, _ in self._pairs:
            a.close()
            b.close()
        self._pairs.clear()

    def freeze(self) -> None:
        """Open connections go silent; connections made afterwards work normally."""
        for pair in self._pairs:
            pair[2][0] = True
            self._frozen.append(pair)
        self._pairs.clear()

    def restore(self) -> None:
        self.refusing = False


@asynccontextmanager
async def feed_role(conn: Any, url: str, grants: str) -> AsyncIterator[tuple[str, str]]:
    """A login role with what a running feed needs on schema `feed` (made by a migrate before),
    plus `grants` (SQL, `{role}` filled in): its name and `url` as that role; dropped after."""
    role = f"feed_role_{uuid.uuid4().hex[:8]}"
    await conn.execute(
        f"""CREATE ROLE {role} LOGIN;
            GRANT USAGE ON SCHEMA feed TO {role};
            GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA feed TO {role};
            {grants.format(role=role)}"""
    )
    try:
        yield role, url.replace("postgresql://postgres@", f"postgresql://{role}@")
    finally:
        await conn.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
