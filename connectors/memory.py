"""An in-memory source for tests and the hub's own benchmark.

It behaves like a database table per target: `write` applies an insert, update or delete to the
stored rows and queues the change (or hands it to the hub's `sink` at once, connectors.base), so
snapshots and live changes agree exactly as they would for a real source. Every instance
registers itself by name in `MemoryConnector.instances` so that a test can reach the connector the
server built from its config.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import secrets
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from typing import Any, ClassVar

from connectors.base import Connector, RoomAddress, Snapshot, State
from feed.core.change import Change, Gap, room_key
from feed.errors import SourceUnavailable
from feed.options import Options


class MemoryConnector(Connector):
    kind = "memory"
    instances: ClassVar[dict[str, MemoryConnector]] = {}

    def configure(self, options: Options) -> None:
        self._targets = options.str_list("targets", required=True)
        self._known = frozenset(self._targets)
        # `key` names the key column, or lists several: a composite key, which changes carry as
        # a mapping of column to value, as Postgres does.
        if isinstance(options.raw.get("key"), list):
            self.key_fields = options.str_list("key", required=True)
        else:
            self.key_fields = [options.str("key", "id")]
        # Tests of a source that cannot resume (like Redis keyspace events) set this to false.
        self.durable = options.bool("durable", True)
        # Tests of a source whose changes carry no before image (Redis) set this to false.
        self.before_images = options.bool("before_images", True)
        self._queue: asyncio.Queue[Change | Gap | BaseException] = asyncio.Queue()
        self._tables: dict[str, dict[str, dict[str, Any]]] = {t: {} for t in self._targets}
        self._positions = itertools.count(1)
        self._run = f"{self.name}:{secrets.token_hex(4)}:"
        """The start of this instance's change ids. Its positions start at 1 on every start of
        the process, and ids must not repeat: clients drop a change whose id they have seen
        (a source that resumes from an older position sends some again), so a restarted demo's
        first changes vanished from a dashboard left open."""
        self._written = 0
        self._delivered = 0
        self._backlog = 0
        """Items in `_queue` (kept here: `Queue.qsize()` is a call, and this is read per write)."""
        self._progress: asyncio.Event | None = None
        """Set when the hub has routed more; made only while a snapshot waits for that."""
        self.started = 0
        MemoryConnector.instances[self.name] = self

    async def start(self) -> None:
        self.started += 1
        self.set_status(State.UP)

    async def stop(self) -> None:
        """Nothing to let go of; the hub reports the state that follows (down or stopped)."""

    async def changes(self) -> AsyncIterator[Change | Gap]:
        while True:
            item = await self._queue.get()
            self._backlog -= 1
            if isinstance(item, BaseException):
                raise item
            yield item
            # Asked for the next item: the hub has routed this one.
            if isinstance(item, Change):
                self._routed(item.position)

    def targets(self) -> list[str]:
        return list(self._targets)

    def known_targets(self) -> Collection[str]:
        return self._known

    # -- the "database" ------------------------------------------------------------------------

    def write(
        self,
        target: str,
        op: str,
        row: Mapping[str, Any],
        moved_from: Mapping[str, Any] | None = None,
    ) -> Change:
        """Apply one write to the stored rows and queue the change it produces.

        `moved_from` (an update only): the key fields the row had before, when `row` gives it
        a new key, as an update of a Postgres primary key does; the change then carries
        `meta.old_key`, as the Postgres connector's does."""
        table = self._tables[target]
        key = self.key_of(row)
        stored_key = room_key(key) or ""
        meta = None
        if moved_from is not None and op == "update":
            old_key = self.key_of(moved_from)
            before = table.pop(room_key(old_key) or "", None)
            if old_key != key:
                meta = {"old_key": old_key}
        else:
            before = table.get(stored_key)
        after: dict[str, Any] | None
        if op == "delete":
            table.pop(stored_key, None)
            after = None
        else:
            after = {**(before or {}), **row} if op == "update" else dict(row)
            table[stored_key] = after
        return self._queue_change(
            target, op, key, before if self.before_images else None, after, meta
        )

    def truncate(self, target: str) -> Change:
        """Empty a table, as Postgres's TRUNCATE does: one change with no key and no images."""
        self._tables[target].clear()
        return self._queue_change(target, "truncate", None, None, None)

    def _queue_change(
        self,
        target: str,
        op: str,
        key: Any,
        before: Mapping[str, Any] | None,
        after: Mapping[str, Any] | None,
        meta: Mapping[str, Any] | None = None,
    ) -> Change:
        """Give a write the next position and queue its change for the hub.

        The change shares the stored row dicts as its images: a stored row is only ever
        replaced (`write`), dropped or cleared from its table, never changed in place, and
        snapshots hand out copies, so nothing can alter an image under the change.
        """
        position = next(self._positions)
        self._written = position
        change = Change(
            id=f"{self._run}{position}",
            connector=self.name,
            source=self.kind,
            target=target,
            op=op,
            key=key,
            before=before,
            after=after,
            ts=dt.datetime.now(dt.UTC),
            meta=meta,
            position=position,
        )
        sink = self.sink
        if sink is None or self._backlog:  # the hub is busy, or earlier items still wait
            self._put(change)
            return change
        try:
            sink(change)  # routed and on its way before this returns (connectors.base)
        except Exception as exc:
            self.sink = None
            self._put(exc)  # the hub's stream raises it: a failed dispatch
        else:
            self._routed(position)
        return change

    async def routed(self, position: int | None = None) -> None:
        """Until the hub has routed every change up to `position` (all written so far if None)."""
        high = self._written if position is None else position
        while self._delivered < high:
            if self._progress is None:
                self._progress = asyncio.Event()
            await self._progress.wait()

    def _put(self, item: Change | Gap | BaseException) -> None:
        self._backlog += 1
        self._queue.put_nowait(item)

    def _routed(self, position: int) -> None:
        self._delivered = max(self._delivered, position)  # a change sent again is an older one
        if self._progress is not None:
            self._progress.set()
            self._progress = None

    def key_of(self, row: Mapping[str, Any]) -> Any:
        """A row's key as its changes carry it: the value, or column -> value when composite."""
        if len(self.key_fields) == 1:
            return row[self.key_fields[0]]
        return {name: row[name] for name in self.key_fields}

    def redeliver(self, change: Change) -> None:
        """Send a change written before once more, with its id: what a source that resumes from
        an older position sends again after the feed was killed (clients drop it by its id)."""
        self._put(change)

    def announce_gap(self, reason: str = "test gap") -> None:
        self._put(Gap(self.name, reason))

    def crash(self, message: str = "simulated source failure") -> None:
        """Make the change stream raise, as a dropped connection would."""
        self._put(SourceUnavailable(message))

    async def snapshot(
        self, address: RoomAddress, where: Callable[[Mapping[str, Any]], bool], limit: int
    ) -> Snapshot:
        table = self._tables[address.target]
        chosen = [
            (key, dict(row))
            for key, row in table.items()
            if (address.key is None or key == address.key) and where(row)
        ]
        rows = [row for _, row in chosen]
        # The rows reflect every change written so far; honour the Snapshot contract by waiting
        # until the hub has routed all of them.
        high = self._written
        async with asyncio.timeout(10):
            await self.routed(high)
        return Snapshot(
            rows=rows[:limit],
            covers=lambda change: change.position is not None and change.position <= high,
            truncated=len(rows) > limit,
            keys=[key for key, _ in chosen[:limit]],  # stored by their room key already
        )
