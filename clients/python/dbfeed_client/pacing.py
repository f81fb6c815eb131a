"""Pacing of one client's requests, so that the server's rate limit slows them down.

The server refuses requests beyond its `[limits] subscribe_burst` with `rate_limited`, and cuts
off a client that goes on through 100 refusals in a row. A client with more rooms than the burst
(after every reconnect it subscribes them all again) must therefore not send them all at once,
nor retry each refused one on its own timer: at most `MAX_IN_FLIGHT` requests wait for answers at
once, and after a refusal every request waits out one pause, doubling while the refusals go on,
after which only one goes at a time until the server takes one again. A token refresh goes
ahead of the requests waiting (behind a client's hundreds of subscribes it would arrive after
the token expired), and a new connection starts at the full pace (the server's limit is per
connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import deque

MAX_IN_FLIGHT = 16
"""Requests that may wait for their answers at once."""


class Pacer:
    """Turns for requests: `await take()` before sending, `give()` once the answer is in."""

    def __init__(self, delay: float, delay_max: float, limit: int = MAX_IN_FLIGHT) -> None:
        self.delay = delay
        self.delay_max = delay_max
        self.limit = limit
        self._busy = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._limited = 0  # pauses in a row: refusals since the server last took a request
        self._resume_at = 0.0
        self._timer: asyncio.TimerHandle | None = None

    async def take(self, first: bool = False) -> None:
        """Wait for a turn: first come, first served, unless `first` (ahead of those waiting)."""
        if not self._waiting and self._free(asyncio.get_running_loop().time()):
            self._busy += 1
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if first:
            self._waiting.appendleft(turn)
        else:
            self._waiting.append(turn)
        self._wake()
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.give()  # given a turn it will not use: pass it on
            else:
                with contextlib.suppress(ValueError):  # unless `_wake` dropped it already
                    self._waiting.remove(turn)
            raise

    def give(self) -> None:
        self._busy -= 1
        self._wake()

    def refused(self) -> None:
        """The server refused a request as too fast: pause (once per round of refusals)."""
        loop = asyncio.get_running_loop()
        if loop.time() < self._resume_at:
            return  # a request of the same round has paused already
        pause = min(self.delay * 2**self._limited, self.delay_max)
        self._limited += 1
        self._resume_at = loop.time() + pause * random.uniform(0.5, 1.5)

    def accepted(self) -> None:
        """The server took a request: back to the full pace."""
        self._limited = 0
        self._wake()

    def reset(self) -> None:
        """A new connection: the server's limit starts afresh (a full burst), so does the pace."""
        self._limited = 0
        self._resume_at = 0.0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake()

    def close(self) -> None:
        """Let every waiting request go (each then finds its client closed)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._resume_at = 0.0
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                self._busy += 1
                turn.set_result(None)

    def _free(self, now: float) -> bool:
        limit = 1 if self._limited else self.limit
        return now >= self._resume_at and self._busy < limit

    def _wake(self) -> None:
        # `now` is read once: read twice, a pause could end between the two reads, and a
        # request left waiting for the pause's end would find no timer set to wake it.
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._waiting and self._free(now):
            turn = self._waiting.popleft()
            if not turn.done():
                self._busy += 1
                turn.set_result(None)
        if self._waiting and now < self._resume_at and self._timer is None:
            self._timer = loop.call_at(self._resume_at, self._rearm)

    def _rearm(self) -> None:
        self._timer = None
        self._wake()
