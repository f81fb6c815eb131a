"""The small interface every connector implements, and what the hub expects of it.

A connector is an async context manager: entering it connects to the source, leaving it lets go.
While entered, `changes()` yields `Change` and `Gap` items in the source's commit order. The hub
pulls the next item only after it has routed and buffered the previous one, so a connector may
treat "asked for the next item" as "everything yielded before is delivered" and save its position
(journal offset, resume token, stream id) then, after `await self.settle()`: in a cluster the
hub publishes what a stream had ready as one batch, after the connector moved on, and `settle`
waits until that is published (raising when it cannot be: then nothing may be saved). The hub
restarts a connector that raises, with
backoff, so a connector may simply raise `SourceUnavailable` when it loses its source and let the
hub call it again; connectors that can resume in place do so themselves.

A connector may also hand a change straight to the hub, in its own call: while the hub waits for
the next item of `changes()` it sets `sink`, and a connector with nothing still waiting to be
yielded may call `sink(change)` instead of queueing the change for its stream. That saves the
queue, the task wake-up and the async generator step per batch (the per-change path that
dominates when each change goes to few clients, docs/benchmarks.md). `changes()` stays the
interface every connector implements; the sink is an optional shortcut (the memory connector
takes it), never offered in a cluster, where the engine publishes what the stream yields.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar, Self

from feed.core.change import Change, Gap
from feed.core.filters import RowFilter
from feed.errors import SnapshotNotSupported
from feed.options import Options

log = logging.getLogger("feed.connectors")

Gauge = tuple[str, tuple[tuple[str, str], ...], float]
"""A metric sample a connector reports: name, labels other than `connector`, value."""


class State(enum.StrEnum):
    STARTING = "starting"
    UP = "up"
    DOWN = "down"
    LAGGING = "lagging"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Status:
    """What a connector reports about itself; sent to clients as a `status` event."""

    connector: str
    state: State
    detail: str = ""
    since: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))

    def to_json(self) -> dict[str, Any]:
        return {
            "connector": self.connector,
            "state": self.state.value,
            "detail": self.detail,
            "since": self.since.isoformat(),
        }


@dataclass(frozen=True)
class RoomAddress:
    """A room name resolved against a connector: a target, and a row key for a row room."""

    target: str
    key: str | None = None


@dataclass(frozen=True)
class Where:
    """Which rows a snapshot keeps: called on each row read, it is the final word.

    `filter` is the room's filter (forced access conditions included), or None for every row.
    A connector may translate part of it into its source's own query, so that a per-user room's
    snapshot reads that user's rows instead of the whole table (a full read per subscribe cost
    2.5 s on a 300,000-row table); what it asks the source for must then be a superset of the
    rows the call keeps, and it still calls `where(row)` on each. Connectors that do not look at
    `filter` just call it, as they did when this was a plain callable.
    """

    filter: RowFilter | None = None

    def __call__(self, row: Mapping[str, Any]) -> bool:
        return self.filter is None or self.filter.matches_image(row)


@dataclass(frozen=True)
class Snapshot:
    """Current rows for a subscribe with `snapshot: true`.

    The contract that makes snapshot plus live exact: when `Connector.snapshot` returns, every
    change that `rows` already reflect has been yielded by `changes()`, and `covers(change)` says
    which ones those are. The hub then replays to the new subscriber only the buffered changes the
    snapshot does not cover, so nothing is lost or doubled.
    """

    rows: Sequence[Mapping[str, Any]]
    covers: Callable[[Change], bool] = lambda change: False
    truncated: bool = False
    keys: Sequence[str | None] | None = None
    """Each row's key as in row room names (`feed.core.change.room_key` of the key its changes
    carry), in the order of `rows`; None for a row without one (a table with no primary key). Sent
    to clients beside the rows (`snapshot_keys`), because only the connector knows which columns
    make the key (a Postgres primary key of any name, composite ones, MongoDB `_id`, the Redis
    key). None for the whole list: this connector does not say (clients then guess)."""


class Connector(ABC):
    """Base class for sources. Subclasses set `kind`, read their options, and implement the rest."""

    kind: ClassVar[str] = ""
    durable: bool = True
    """Whether a new instance resumes from a saved position. A cluster hands a connector from a
    dead node to another one; for a connector that cannot resume (Redis keyspace events) the new
    reader announces a `gap` for the time nobody read it."""

    before_images: bool = True
    """Whether every update and delete carries its before image. Without (Redis, MongoDB without
    pre-images) a filter room cannot see a row leave it in the change itself, so the router
    follows which rows each filter room holds (feed.core.filter_index)."""

    _settle_hook: Callable[[], Awaitable[None]] | None = None

    sink: Callable[[Change], None] | None = None
    """Set by the hub only while it waits for the next item of `changes()` (so it has finished
    every item before): calling it routes, numbers and sends the change at once, as if it had
    been yielded. Only for a change with nothing of this connector's still waiting to be
    yielded, or it would overtake those. If it raises, the change is lost as a failed dispatch
    is: make the stream raise that error (the hub then restarts the connector)."""

    def __init__(self, name: str, options: Options) -> None:
        self.name = name
        self._status = Status(name, State.STARTING)
        self._listeners: list[Callable[[Status], None]] = []
        self._own: Status | None = None
        """While a status is held (`hold_status`): the connector's own, shown on release."""
        self.capture_faults: dict[str, int] = {}
        self.restarts = 0
        """Times the connector was started again after a failure: by the hub, or by the connector
        itself reconnecting to its source in place (`feed_connector_restarts_total`)."""
        self.configure(options)
        options.finish()

    # -- configuration -------------------------------------------------------------------------

    @abstractmethod
    def configure(self, options: Options) -> None:
        """Read this connector's settings from its config table (raise ConfigError on mistakes)."""

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @abstractmethod
    async def start(self) -> None:
        """Connect to the source and get ready to stream. May be called again after `stop`."""

    @abstractmethod
    async def stop(self) -> None:
        """Let go of the source, saving the position of everything delivered so far."""

    def settle_with(self, hook: Callable[[], Awaitable[None]] | None) -> None:
        """The hub's "everything yielded so far is delivered for good" (None: it always is)."""
        self._settle_hook = hook

    async def settle(self) -> None:
        """Call before saving a position: returns once every item yielded so far is delivered
        for good, or raises (a `FeedError`) when it cannot be, and then the position must not
        be saved. A no-op on a single node, where the hub finishes an item before it asks for
        the next; a cluster publishes items in batches (feed.engine.batch) and finishes here."""
        hook = self._settle_hook
        if hook is not None:
            await hook()

    def forget_unsaved(self) -> None:
        """Start the next `start` from the saved position, not from what this instance yielded
        since: a cluster could not publish all of it (feed.engine.batch). Connectors that keep
        their position in memory across a restart override this."""
        return

    @abstractmethod
    def changes(self) -> AsyncIterator[Change | Gap]:
        """Changes in commit order, forever (until stopped or the source is lost)."""

    # -- catalog, rooms and snapshots ----------------------------------------------------------

    @abstractmethod
    def targets(self) -> list[str]:
        """The tables, collections or key patterns this connector offers (target room names)."""

    def configured_targets(self) -> list[str]:
        """The targets the config gives (what every node of a cluster compares with the
        reader's: `feed.engine.lease`). The same as `targets` unless the connector finds more
        while it runs (MongoDB: the collections of a database watched whole)."""
        return sorted(self.targets())

    def known_targets(self) -> Collection[str]:
        """The targets, for a membership test: a subscribe then costs a lookup, not a scan of
        every target (a connector whose targets are fixed keeps them in a set)."""
        return set(self.targets())

    def parent_target(self, target: str) -> str | None:
        """A wider target whose room also receives every change of `target` (MongoDB: the
        watched database of a collection), or None. Its target room and filter rooms are
        routed each change of `target` as their own; it has no row rooms."""
        return None

    def inner_prefix(self, target: str) -> str | None:
        """The prefix of the targets whose changes `target`'s room also receives (the targets
        for which `parent_target` gives it; MongoDB: `crm.` for a database watched whole), or
        None. Authorization reads it: such a room carries what those targets' rules and masks
        decide (feed.security.access)."""
        return None

    def resolve(self, rest: str) -> RoomAddress | None:
        """Resolve what follows `<connector>:` in a room name; None when it names nothing here.

        The default knows `<target>` and `<target>:<key>`; connectors whose targets are patterns
        (Redis) override it.
        """
        known = self.known_targets()
        if rest in known:
            return RoomAddress(rest)
        # The longest target followed by ":" and a key: each ":" from the right is a candidate
        # split, so the cost is the name's colons, not a scan (and sort) of every target.
        end = len(rest)
        while (end := rest.rfind(":", 0, end)) > 0:
            if end < len(rest) - 1 and rest[:end] in known:
                return RoomAddress(rest[:end], rest[end + 1 :])
        return None

    def check_filter(self, target: str, row_filter: RowFilter) -> None:
        """Refuse (ProtocolError "bad_filter") a filter no row of `target` can ever match.

        Only a source with a known schema can tell (Postgres: unknown columns, literals not of the
        column's type). The default accepts every filter: MongoDB documents and Redis values have
        no schema, so there a field that is absent simply does not match.
        """
        return None

    def check_forced_filter(self, target: str, row_filter: RowFilter) -> None:
        """Refuse (ProtocolError) an access rule's forced filter no row of `target` can match.

        Narrower than `check_filter`, which may also refuse what is fine for a forced filter
        (MongoDB: a client's filter on a whole database's room, whose rows a shaped room does
        not need). Only a source with a known schema can tell: the default accepts it.
        """
        return None

    def check_key(self, target: str, key: str) -> None:
        """Refuse (ProtocolError "bad_key") a row room no row of `target` can ever fill.

        Such a room was acknowledged and went live, then heard nothing: a mistyped key looked
        like a quiet row. Only a source that knows its keys can tell (Postgres: a table without
        a primary key, a composite key given fewer values than it has columns, an integer key
        given something else). The default accepts every key.
        """
        return None

    def filter_schema(self) -> dict[str, dict[str, str]] | None:
        """What `check_filter` goes by, per target (Postgres: each column's type), as JSON, for
        the other nodes of a cluster: their connector is not running, so it has not read the
        source's schema, and without it they accepted filters the reader would refuse."""
        return None

    def adopt_filter_schema(self, schema: Mapping[str, Mapping[str, str]]) -> None:
        """A standby's copy of the reading node's `filter_schema()`, checked against while this
        connector has not read the source's schema itself (without a schema: nothing to keep)."""
        return None

    async def snapshot(
        self, address: RoomAddress, where: Callable[[Mapping[str, Any]], bool], limit: int
    ) -> Snapshot:
        """Current rows of a target (or one row), those for which `where` holds, at most `limit`.

        The hub passes a `Where`, whose `filter` a connector may push down to its source."""
        raise SnapshotNotSupported(f"connector {self.name!r} ({self.kind}) has no snapshots")

    async def check(self) -> str:
        """Reach the source once (for `feed check`); return a short description or raise."""
        async with self:
            return "reachable"

    async def migrate(self, *, prune: bool = False, force: bool = False) -> list[str]:
        """Apply what the source needs (`feed migrate`); return what was done, one line each.

        `prune` also removes what the config no longer names (capture of a table taken out of
        `tables`); `force` does so even while another process reads this connector.
        """
        return []

    # -- status and metrics --------------------------------------------------------------------

    def count_fault(self, kind: str) -> None:
        """Count one capture interruption found by the connector's own check, by kind."""
        self.capture_faults[kind] = self.capture_faults.get(kind, 0) + 1

    def count_restart(self) -> None:
        """Count one reconnect to the source after a failure, made without the hub's restart.

        Postgres, MongoDB and the Redis readers retry a lost connection inside their change
        stream; uncounted, a flapping database never moved `feed_connector_restarts_total`.
        """
        self.restarts += 1

    def gauges(self) -> list[Gauge]:
        """Metric samples read at scrape time (values the connector measured on its own schedule:
        a scrape never waits on the source). The hub adds the `connector` label."""
        return [
            ("feed_capture_faults_total", (("kind", kind),), float(count))
            for kind, count in sorted(self.capture_faults.items())
        ]

    @property
    def status(self) -> Status:
        return self._status

    def on_status(self, listener: Callable[[Status], None]) -> None:
        self._listeners.append(listener)

    def set_status(self, state: State, detail: str = "") -> None:
        """Record and announce a state change (repeats of the same state and detail are dropped);
        while a status is held, only record it, to be shown when the hold ends."""
        if self._own is not None:
            self._own = Status(self.name, state, detail)
            return
        self._show(Status(self.name, state, detail))

    def hold_status(self, state: State, detail: str) -> None:
        """Show this status whatever the connector says meanwhile, until `release_status`.

        The cluster engine holds a reading connector down while the cluster's Redis is out of
        reach: the connector itself still reads its source fine and would say "up" at its next
        check, but nothing it reads can reach a client.
        """
        if self._own is None:
            self._own = self._status
        self._show(Status(self.name, state, detail))

    def release_status(self) -> None:
        """End a hold: show the connector's own latest status again (since now)."""
        own, self._own = self._own, None
        if own is not None:
            self._show(Status(self.name, own.state, own.detail))

    @property
    def status_held(self) -> bool:
        return self._own is not None

    @property
    def own_status(self) -> Status:
        """What the connector last said of itself, held or not: what its own checks go by."""
        return self._status if self._own is None else self._own

    def _show(self, status: Status) -> None:
        if status.state == self._status.state and status.detail == self._status.detail:
            return
        self._status = status
        for listener in self._listeners:
            try:
                listener(self._status)
            except Exception:  # a listener's bug must not stop the capture
                log.exception("status listener failed")
