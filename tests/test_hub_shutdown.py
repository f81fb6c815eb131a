"""Shutdown is bounded even when a connector's task swallows its cancellation; status in the log."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import pytest

import feed.routing.hub
from connectors.memory import MemoryConnector
from feed.core.change import Change, Gap
from feed.options import Options
from feed.routing.hub import Hub


class SwallowingConnector(MemoryConnector):
    """Ignores the first cancellation, as a driver that swallows it mid-reply would."""

    swallowed = 0

    async def changes(self) -> AsyncIterator[Change | Gap]:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if self.swallowed:
                    raise
                self.swallowed += 1
        yield  # pragma: no cover - an async generator that never yields


async def test_a_connector_that_swallows_its_cancel_does_not_hang_shutdown(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(feed.routing.hub, "STOP_GRACE", 0.3)
    connector = SwallowingConnector("stubborn", Options({"targets": ["t"]}, "test"))
    hub = Hub([connector])
    await hub.__aenter__()
    async with asyncio.timeout(5):
        while not connector.started:  # noqa: ASYNC110 - no event for "the task is running"
            await asyncio.sleep(0.01)
    await asyncio.sleep(0)  # let it reach the sleep it will be cancelled in
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="feed.hub"):
        await asyncio.wait_for(hub.__aexit__(None, None, None), 5)
    assert connector.swallowed == 1  # it did ignore the first cancel...
    assert time.monotonic() - started < 2  # ...and the second one ended it, after the grace
    assert "ignored cancellation" not in caplog.text


async def test_status_changes_are_logged_as_one_readable_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What an operator reads in the log: the state, then its detail after a colon, and no
    dangling space when there is no detail (`connector main is stopped `, before)."""
    from connectors.base import State

    connector = MemoryConnector("orders", Options({"targets": ["t"]}, "test"))
    hub = Hub([connector])
    with caplog.at_level(logging.INFO, logger="feed.hub"):
        await hub.__aenter__()
        connector.set_status(State.DOWN, "the database is unreachable")
        await asyncio.wait_for(hub.__aexit__(None, None, None), 5)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("connector ")]
    assert "connector orders is down: the database is unreachable" in lines
    assert "connector orders is up" in lines  # the memory connector's `up` has no detail
    assert all(line == line.rstrip() for line in lines)
