"""Waiting for state that has no event to await, always with a deadline."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from feed.routing.hub import cancel_and_wait

DEFAULT_TIMEOUT = 10.0


async def wait_until(
    condition: Callable[[], bool], timeout: float = DEFAULT_TIMEOUT, what: str = "condition"
) -> None:
    """Poll `condition` until it holds; fail with `what` after `timeout` seconds.

    For state inside the server (a room's seq, a room's expiry) that the test cannot subscribe
    to; anything a client can observe is awaited as an event instead.
    """
    try:
        async with asyncio.timeout(timeout):
            while not condition():  # noqa: ASYNC110 - no event exists for this state
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


async def stopped(task: asyncio.Task[Any], what: str = "the task") -> None:
    """Cancel `task` and wait until it ends, as the hub stops its connector tasks
    (feed.routing.hub.cancel_and_wait: cancelled again while it runs on, since a driver can
    swallow a cancellation that lands just as its reply arrives; redis-py has done so). One
    cancel and an unbounded wait would hang the test instead of failing it."""
    await cancel_and_wait([task], grace=0.5)
    assert task.done(), f"{what} ignored cancellation"
