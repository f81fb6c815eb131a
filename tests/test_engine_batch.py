"""The reader's batches on the loop `feed serve` runs on (uvloop): spaced by `publish_interval`,
without the loop spinning while it waits.

The end-to-end behaviour (a lone change at once, a steady stream a few changes per script call,
against a real Redis) is tests/test_cluster.py's; this file holds what only the loop shows. The
publish callable here stands for the script call: it records the batch and yields to the loop for
about a Redis round trip.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from feed.engine.batch import Batcher

uvloop = pytest.importorskip("uvloop")


class CountingLoop(uvloop.Loop):  # type: ignore[misc,name-defined]
    """uvloop, counting the timers armed (asyncio.sleep arms one per call too)."""

    armed = 0

    def call_later(self, delay: float, callback: Any, *args: Any, context: Any = None) -> Any:
        CountingLoop.armed += 1
        return super().call_later(delay, callback, *args, context=context)


def test_a_steady_stream_waits_for_the_interval_without_spinning() -> None:
    """uvloop's timers count whole milliseconds and fire up to one early: a batcher that checked
    the interval again when its timer fired re-armed it for the fraction left, round after round
    (7,500 timers for 79 publishes of 200 changes 1 ms apart, three times the CPU)."""
    batches: list[list[Any]] = []
    count = 200

    async def publish(batch: list[Any]) -> None:
        batches.append(batch)
        await asyncio.sleep(0.0003)

    async def main() -> None:
        batcher = Batcher("main", publish, lambda error: None, 0.005)
        for i in range(count):
            await batcher.add(i)  # type: ignore[arg-type]
            batcher.idle()  # the stream would wait for its next change
            await asyncio.sleep(0.001)
        await batcher.drain()
        assert batcher.published == count

    CountingLoop.armed = 0
    loop = CountingLoop()
    try:
        loop.run_until_complete(asyncio.wait_for(main(), 30))
    finally:
        loop.close()
    assert [c for batch in batches for c in batch] == list(range(count))
    assert len(batches) <= count / 3, f"{len(batches)} publish calls for {count} changes"
    # The test's own sleeps (one per change, one per publish), and about one timer per batch.
    own = count + len(batches)
    assert CountingLoop.armed - own <= len(batches) + 2, (
        f"{CountingLoop.armed - own} timers armed for {len(batches)} batches"
    )
