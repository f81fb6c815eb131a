"""The reader's publishing in batches: what a connector's stream had ready goes out in one call.

Publishing one change per Lua script call made the reader wait one Redis round trip per change,
so a poll of twenty rows reached clients one round trip after another (docs/benchmarks.md). Here
the hub hands each change over without waiting (`add`), and the batch is published when the
stream would wait (`idle`, called by the hub's `FlushBeforeWaiting`) or when it grows long, one
script call per batch, one batch at a time: room order is the order changes were added.

The hub asks a connector for its next item before that batch is published, so "asked for the
next item" no longer means "delivered". A connector therefore awaits `Connector.settle` before
it saves its position, and the engine hangs `drain` there: it returns once everything added so
far is published, or raises, and then the position is not saved. A reader killed with -9 loses
nothing: its successor resumes from the saved position, which is never past what was published
(and drops by id what the old reader published after it, in the publish script).

Under a steady stream a batch was still one change: at 1,000 changes/s, one row per transaction,
every poll read one row and every node woke for it alone, and it is the wake-ups, not the bytes,
that cost (docs/benchmarks.md). `[cluster] publish_interval` spaces the script calls: a change
after a quiet spell goes out at once, and one that comes sooner than `publish_interval` after the
last call waits for the rest of it, with whatever else arrives meanwhile. So a feed writing fifty
changes a second never waits, and one writing a thousand publishes a few at a time, each at most
`publish_interval` late (Kafka's producer `linger.ms` does the same trade, on every batch).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from feed.core.change import Change
from feed.errors import ClusterError

MAX_BATCH = 256
"""Changes per script call (a longer run goes out as several calls, in order)."""

MAX_BATCH_BYTES = 256 * 1024
"""JSON bytes of changes per script call: a batch stops before the change that would pass this
(a first change larger on its own goes out alone). A room's run of a batch is one pub/sub
message, and every message one script call publishes sits in each subscriber's output buffer
until the call ends (Redis writes to sockets between commands, never during a script): 256 changes of 128 KB
made one 32 MB message, past Redis's default `client-output-buffer-limit pubsub 32mb`, and Redis
cut every node that followed the room, as fast as it read, on every such batch. Bounded here, a
node that keeps up never holds more than about this much per room it follows from one call; a
single larger change goes by reference (feed.engine.publisher.PUBLISHED_BYTES)."""

MAX_PENDING = 1024
"""Changes added but not yet published before `add` waits for the publishing to catch up."""


class Batcher:
    """One connector's unpublished changes at the reader, for the time it holds the lease."""

    def __init__(
        self,
        name: str,
        publish: Callable[[list[Change]], Awaitable[None]],
        failed: Callable[[str], None],
        interval: float = 0.0,
    ) -> None:
        self.name = name
        self.interval = interval
        """Seconds at least between two script calls, unless a `drain` is waiting."""
        self._publish = publish
        self._failed = failed
        """Ends the reading at once (the hub restarts the connector from its saved position),
        even while the stream waits and no `add` or `drain` would see the error."""
        self.pending: list[Change] = []
        self.added = 0
        self.published = 0
        """Changes handed to Redis and answered (published, or dropped there as repeats)."""
        self.error: str | None = None
        """Why a batch could not be published: every later `add` or `drain` raises it, and the
        hub restarts the connector from its saved position."""
        self._task: asyncio.Task[None] | None = None
        self._due: asyncio.TimerHandle | None = None
        """The call that starts the next publishing when the interval is up."""
        self._started = -interval
        """When the last script call began (loop time)."""
        self._loop = asyncio.get_running_loop()
        """Kept: it is asked for its time on every wait of the stream (made in the loop)."""

    async def add(self, change: Change) -> None:
        if self.error is not None:
            raise ClusterError(self.error)
        self.pending.append(change)
        self.added += 1
        if len(self.pending) >= MAX_PENDING:
            await self.drain()

    def idle(self) -> None:
        """The stream is about to wait: publish what it had ready (in a task: this is sync),
        now, or when `interval` has passed since the last call."""
        if self.pending and self.error is None and self._due is None and not self._running():
            self._when_due()

    def _running(self) -> bool:
        return self._task is not None and not self._task.done()

    def _when_due(self) -> None:
        wait = self._started + self.interval - self._loop.time()
        if wait > 0:
            self._due = self._loop.call_later(wait, self._on_due)
        else:
            self._go(urgent=False)

    def _on_due(self) -> None:
        # Not checked against the interval again: uvloop's timers count whole milliseconds and
        # fire up to one early, and a check would re-arm them for a fraction, round after round.
        self._due = None
        if self.pending and self.error is None and not self._running():
            self._go(urgent=False)

    def _go(self, urgent: bool) -> None:
        if self._due is not None:
            self._due.cancel()
            self._due = None
        self._task = self._loop.create_task(self._run(urgent), name=f"cluster:publish:{self.name}")

    async def drain(self) -> None:
        """Return once everything added so far is published; raise ClusterError if it cannot be."""
        target = self.added
        while True:
            if self.error is not None:
                raise ClusterError(self.error)
            if self.published >= target:
                return
            if not self._running():
                self._go(urgent=True)  # a save point waits on it: not the interval
            assert self._task is not None
            # Shielded: a drain cancelled (a connector stopping) must not cut a call in half
            # and leave the batch unpublished for the next one to wait on.
            await asyncio.shield(self._task)

    async def _run(self, urgent: bool) -> None:
        loop = self._loop
        first = True
        try:
            while self.pending and self.error is None:
                if not (urgent or first) and loop.time() < self._started + self.interval:
                    self._when_due()  # what came during this call: when it is due
                    return
                first = False
                self._started = loop.time()
                batch = self._take()
                await self._publish(batch)
                self.published += len(batch)
        except asyncio.CancelledError:
            self.error = "publishing was cancelled"
            self.pending.clear()
            raise
        except Exception as exc:
            self.error = str(exc) if isinstance(exc, ClusterError) else f"cannot publish: {exc}"
            self.pending.clear()
            self._failed(self.error)

    def _take(self) -> list[Change]:
        """The next script call's changes: up to MAX_BATCH, and no more than MAX_BATCH_BYTES of
        JSON but for a first change larger on its own (each change's text is made once, here or
        in the publisher, which sends it)."""
        pending = self.pending
        size = 0
        end = 0
        for change in pending[:MAX_BATCH]:
            tail = change.wire_tail
            size += len(tail) if tail is not None else 0
            if end and size > MAX_BATCH_BYTES:
                break
            end += 1
        batch = pending[:end]
        del pending[:end]
        return batch

    def close(self) -> bool:
        """The reading ended: what was not published is dropped (the next reading reads it
        again from the saved position; a publication under way ends on its own or fails
        fenced). True when everything added was published."""
        complete = self.error is None and self.published >= self.added
        if self.error is None:
            self.error = "the reading of this connector ended"
        if self._due is not None:
            self._due.cancel()
            self._due = None
        self.pending.clear()
        return complete
