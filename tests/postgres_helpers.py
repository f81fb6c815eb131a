"""Helpers shared by the Postgres connector tests: build a connector, read its stream."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from connectors.base import State
from connectors.postgres import PostgresConnector
from feed.change import Change, Gap
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

    def __init__(self, connector: PostgresConnector) -> None:
        self.connector = connector
        self.queue: asyncio.Queue[Change | Gap | BaseException] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.states: list[State] = []
        connector.on_status(lambda status: self.states.append(status.state))

    async def _run(self) -> None:
        try:
            async for item in self.connector.changes():
                self.queue.put_nowait(item)
        except Exception as exc:
            self.queue.put_nowait(exc)

    def begin(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def end(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self.task, WAIT)

    async def next(self, timeout: float = WAIT) -> Change:
        item = await asyncio.wait_for(self.queue.get(), timeout)
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, Change), item
        return item

    async def take(self, count: int, timeout: float = WAIT) -> list[Change]:
        return [await self.next(timeout) for _ in range(count)]

    def assert_idle(self) -> None:
        assert self.queue.empty(), f"unexpected extra item: {self.queue.get_nowait()!r}"

    async def wait_active(self, timeout: float = WAIT) -> None:
        """Until this connector holds the reader lock and listens."""
        await wait_until(lambda: self.connector._active, timeout, "the reader to become active")


@asynccontextmanager
async def streaming(connector: PostgresConnector) -> AsyncIterator[Stream]:
    """Start the connector, read its stream in the background, stop both afterwards."""
    stream = Stream(connector)
    await asyncio.wait_for(connector.start(), WAIT)
    stream.begin()
    try:
        await stream.wait_active()
        yield stream
    finally:
        await stream.end()
        await asyncio.wait_for(connector.stop(), WAIT)
