"""Postgres: triggers write every change into a journal table, NOTIFY wakes the reader.

Why this shape (details and the pitfalls it answers are in docs/connectors/postgres.md):

- The trigger stores the change in `<schema>.journal` inside the user's transaction and NOTIFY
  carries an empty payload, so a row of any size never makes the user's write fail, and nothing
  committed while no reader listens is lost.
- The reader diffs server snapshots: each poll runs in a REPEATABLE READ transaction, takes
  `pg_current_snapshot()`, and reads exactly the journal rows of the transactions that became
  visible since the previous poll's snapshot. Identity values are taken before commit, so "id >
  last" would skip a transaction that commits after a later one; the snapshot diff cannot.
  Inside one poll, transactions are ordered by their last journal id and rows by id, which keeps
  every row's changes in the order they happened (a second writer of a row waits for the first
  one's commit, so its ids are larger) and each transaction's changes together.
- The position (the last snapshot fully delivered, or a snapshot and a cursor half way through a
  batch) lives in `<schema>.consumers`, written in the same transaction that read the batch, so a
  restart resumes exactly; a dropped connection resumes from memory without re-reading.
- One reader per connector name holds a session advisory lock; other feed servers wait and take
  over when its session ends. Its own dead session is terminated by the reader that replaces it.
- A heartbeat (a poll with a short timeout, every `heartbeat_interval`) notices a half-open
  connection; the reconnect LISTENs first and then catches up from the journal.

The logical-decoding mode lives in connectors/postgres_logical.py and shares the configuration
and the snapshot code here; what the connector installs per table, and the `feed migrate`,
`feed unwatch` and `feed check` commands, in connectors/postgres_tables.py (a mixin of the
connector: run once per start or command, not per change).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any

import asyncpg

from connectors.base import Connector, Gauge, RoomAddress, Snapshot, State, Where
from connectors.postgres_capture import (
    CaptureFault,
    JournalStats,
    inspect_notify,
    journal_stats,
)
from connectors.postgres_columns import Columns, column_lists, gap_reason
from connectors.postgres_dsn import dsn_problem, refused_setting
from connectors.postgres_errors import is_transient, one_line
from connectors.postgres_filters import KEYS_ENTRY, check_filter, check_key, pushdown
from connectors.postgres_migrate import (
    channel_for,
    quote_ident,
)
from connectors.postgres_partitions import PartitionWatch
from connectors.postgres_tables import READER_LOCK_CLASS, TableSetup
from connectors.postgres_types import TableShape, computing, read_shape, recompute_sql
from feed.core.change import Change, Gap, room_key
from feed.core.filters import RowFilter
from feed.errors import ConnectorError, SnapshotNotSupported, SourceMisconfigured, SourceUnavailable
from feed.options import DAY, HOUR, MONTH, WEEK, Options
from feed.tls import POSTGRES, tls_hint

log = logging.getLogger("feed.connectors.postgres")

PRUNE_CHUNK = 20_000
VACUUM_EVERY = 6
"""Prunes between two VACUUMs of the journal by the feed itself, where autovacuum does not run
(`_maybe_vacuum`): once a minute at the default `prune_interval`."""
MAX_SAVE_EVERY = 4096
"""`save_every`'s ceiling: the client libraries keep the last 4,096 change ids per subscription
(clients/python, clients/js), so what a crash sends again must not be more."""

RENDERING = {
    "extra_float_digits": "3",
    "TimeZone": "UTC",
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "postgres",
    "bytea_output": "hex",
}
"""How the feed's sessions render values as text (to_jsonb, the logical reader's rebuild): the
settings migrations/0003 pins on the capture trigger, so that a snapshot row, a logical image
and a trigger's image of the same row read alike, whatever the database's or a writer's
defaults."""

POOL_SIZE = 2
"""Connections for snapshots (the change stream has its own)."""
IDENTIFIER = re.compile(r"^[^\s.]+$")
SLOT_NAME = re.compile(r"[a-z0-9_]{1,63}")
"""What Postgres takes as a replication slot name (the publication shares it)."""


# -- positions and snapshots ---------------------------------------------------------------------


@dataclass(frozen=True)
class Snap:
    """A parsed `pg_snapshot`: which transactions had committed when it was taken."""

    xmin: int
    xmax: int
    xip: frozenset[int]
    text: str

    @classmethod
    def parse(cls, text: str) -> Snap:
        xmin, xmax, xip = text.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x), text)

    def visible(self, xid: int) -> bool:
        """Same answer as the server's pg_visible_in_snapshot for a committed transaction."""
        return xid < self.xmin or (xid < self.xmax and xid not in self.xip)

    @property
    def xip_array(self) -> str:
        return "{" + ",".join(str(x) for x in sorted(self.xip)) + "}"


PgPosition = tuple[int, int]
"""Where a change sits in the journal: its transaction's id and its row's.

A plain tuple, not a class: a change carries its position for as long as a room's replay buffer
keeps it, and every instance of a Python class (an int subclass too) is tracked by the garbage
collector, whose full passes walk every tracked object; a tuple of ints is not tracked once the
collector has seen it (docs/benchmarks.md, "Replay buffers and the garbage collector")."""


@dataclass
class ReaderState:
    """What has been delivered: everything visible in `prev`, plus, when a batch was interrupted,
    the rows of `batch` (visible in it, not in `prev`) up to `cursor` in delivery order."""

    prev: Snap
    batch: Snap | None = None
    cursor: tuple[int, int] | None = None


class _Stopped(Exception):
    """stop() was called while the reader waited for its turn."""


def describe_dsn(dsn: str) -> str:
    """host:port/db of a DSN without its password, for messages."""
    match = re.match(r"^\w+://(?:[^@/]*@)?([^/?]*)(/[^?]*)?", dsn)
    if match:
        host = match.group(1) or "localhost"
        return host + (match.group(2) or "")
    return re.sub(r"password=\S+", "password=***", dsn)


async def wait_event(event: asyncio.Event, seconds: float) -> None:
    """Wait for `event` at most `seconds`.

    Not `asyncio.wait_for`: on Python 3.11 it swallows a cancellation that arrives just as the
    event is set, and the reader would then run on after the hub cancelled it. Already set (a
    NOTIFY came during the poll, as under a steady write load): no timer to arm and cancel.
    """
    if event.is_set():
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


# -- the connector -------------------------------------------------------------------------------


class PostgresConnector(TableSetup, Connector):
    kind = "postgres"

    def configure(self, options: Options) -> None:
        self.dsn: str = options.str("dsn", required=True, spaces="none")
        problem = dsn_problem(self.dsn)
        if problem is not None:
            options.fail("dsn", problem)
        self.tables: list[str] = options.str_list("tables", required=True)
        self._known = frozenset(self.tables)
        self.targets_by_table: dict[str, tuple[str, str]] = {}
        for table in self.tables:
            schema, dot, name = table.partition(".")
            if not dot or not schema or not name:
                options.fail(
                    "tables", f"{table!r} must be schema.table, e.g. 'public.{table or 'orders'}'"
                )
            self.targets_by_table[table] = (schema, name)
        self.keys: dict[str, tuple[str, ...]] = {}
        """Key columns given in the config, for a table without a primary key (or to use
        other columns than it): a table's row rooms, `key`, `meta.old_key` and clients' rows."""
        keys = options.table("keys")
        for table in keys.raw:
            if table not in self.targets_by_table:
                keys.fail(table, f"{table!r} is not in tables; list it there, or remove it here")
            if isinstance(keys.raw[table], str):
                self.keys[table] = (keys.str(table, required=True),)
            else:
                self.keys[table] = tuple(keys.str_list(table, required=True))
            if len(set(self.keys[table])) != len(self.keys[table]):
                keys.fail(table, "names a column twice")
        self.mode = options.choice("mode", ["notify", "logical"], "notify")
        self.schema: str = options.str("schema", "feed", spaces="inside")
        if not IDENTIFIER.fullmatch(self.schema) or len(self.schema) > 50:
            options.fail("schema", f"{self.schema!r} must be a plain schema name, e.g. 'feed'")
        self.heartbeat_interval = options.float(
            "heartbeat_interval", 5.0, minimum=0.05, maximum=60.0
        )
        self.heartbeat_timeout = options.float("heartbeat_timeout", 5.0, minimum=0.05, maximum=60.0)
        if self.heartbeat_interval + self.heartbeat_timeout > 60:
            options.fail(
                "heartbeat_interval", "heartbeat_interval + heartbeat_timeout must be <= 60"
            )
        self.query_timeout = options.float("query_timeout", 30.0, minimum=0.1, maximum=DAY)
        self.connect_timeout = options.float("connect_timeout", 10.0, minimum=0.1, maximum=HOUR)
        self.reconnect_max = options.float("reconnect_max", 10.0, minimum=0.01, maximum=HOUR)
        self.standby_interval = options.float("standby_interval", 2.0, minimum=0.01, maximum=HOUR)
        self.retention = options.float("journal_retention", 300.0, minimum=0.0, maximum=WEEK)
        self.prune_interval = options.float("prune_interval", 10.0, minimum=0.01, maximum=HOUR)
        self.batch_size = options.int("batch_size", 500, minimum=1, maximum=100_000)
        self.auto_migrate = options.bool("auto_migrate", False)
        self.slot: str = options.str(
            "slot", f"feed_{self.name}".replace("-", "_").lower(), spaces="inside"
        )
        if self.mode == "logical" and not SLOT_NAME.fullmatch(self.slot):
            # Postgres takes only these for a slot, and cuts a longer publication name short:
            # before, the first start failed with a bare `identifier too long`.
            given = "slot" in options.raw
            options.fail(
                "slot",
                f"{self.slot!r}{'' if given else ' (made from the name)'} is not a replication "
                "slot name Postgres takes: at most 63 of a-z, 0-9 and _; set `slot` to one",
            )
        self.snapshot_wait = options.float("snapshot_wait", 20.0, minimum=0.1, maximum=HOUR)
        self.snapshot_scan_limit = options.int(
            "snapshot_scan_limit", 100_000, minimum=0, maximum=100_000_000
        )
        """Rows a snapshot reads at most (0: no limit); past it, it is truncated. What the
        room's filter cannot say in SQL is checked row by row here, and `snapshot_limit`
        counts rows kept: a filter keeping none read the whole table (1.4 s of the feed's CPU
        at 200,000 rows, docs/security.md)."""
        self.poll_interval = options.float("poll_interval", 0.01, minimum=0.001, maximum=HOUR)
        self.save_interval = options.float("save_interval", 0.5, minimum=0.0, maximum=HOUR)
        self.save_every = options.int("save_every", 2000, minimum=1, maximum=MAX_SAVE_EVERY)
        """Changes routed between position saves, whatever the time: after a crash at most
        this many come again, which the client libraries' duplicate window (4,096 ids per
        subscription) must hold; `save_interval` alone let 17,001 come again at 34,000/s."""
        self.capture_check_interval = options.float(
            "capture_check_interval", 5.0, minimum=0.05, maximum=HOUR
        )
        self.journal_warn_rows = options.int(
            "journal_warn_rows", 1_000_000, minimum=1, maximum=10**12
        )
        self.journal_warn_age = options.float("journal_warn_age", 600.0, minimum=1.0, maximum=MONTH)
        self._init_runtime()

    def _init_runtime(self) -> None:
        self.channel = channel_for(self.schema)
        self.q = quote_ident(self.schema)
        self._pool: Any = None
        self._reader: Any = None
        self._reader_pid: int | None = None
        self._dead_pid: int | None = None
        self._shapes: dict[str, TableShape] = {}
        self._adopted: dict[str, TableShape] = {}
        self._adopted_keys: dict[str, tuple[str, ...]] = {}
        """Column types the reading node shares, while this (standby) connector has no shapes."""
        self._state: ReaderState | None = None
        self._saved_text: str | None = None
        self._wake = asyncio.Event()
        self._progress = asyncio.Condition()
        self._polls_started = 0
        self._polls_delivered = 0
        self._asleep = False  # between polls: what a test waits for to fault an idle reader
        self._active = False
        self._stopping = False
        self._commit_ts = False
        self._last_prune = 0.0
        self._prunes_unvacuumed = 0  # prunes that deleted rows since the last VACUUM
        self._vacuum_given_up = False  # `_maybe_vacuum` could not, and said so
        self._last_save = 0.0
        self._unsaved = False
        self._routed_unsaved = 0  # changes routed since the last save (`save_every`)
        self._logical: Any = None
        # The capture watch (connectors/postgres_capture.py): what each table's oid was when
        # its triggers were attached, the faults standing now, when to look next.
        self._oids: dict[str, int] = {}
        self._columns_seen: dict[str, Columns] = {}  # notice_columns
        self.partition_watch = PartitionWatch(self)
        self._virtual: dict[str, str | None] = {}  # target -> `computing`'s select list
        self._faults: dict[tuple[str | None, str], CaptureFault] = {}
        self._start_faults: list[CaptureFault] = []
        self._last_capture_check = 0.0
        self._check_now = False
        self._stats: JournalStats | None = None
        self._last_measure = -1e9
        self._over_ceiling = False
        self._warned_stale: set[str] = set()

    # -- plumbing ------------------------------------------------------------------------------

    @property
    def where(self) -> str:
        return f"postgres {describe_dsn(self.dsn)}"

    def regclass(self, target: str) -> str:
        schema, name = self.targets_by_table[target]
        return f"{quote_ident(schema)}.{quote_ident(name)}"

    async def _connect(self, *, reader: bool = False) -> Any:
        settings = {"application_name": f"feed:{self.name}" + (":reader" if reader else "")}
        settings.update(RENDERING)
        if reader:
            idle = str(max(1, int(self.heartbeat_interval)))
            # Position saves need no fsync of their own: losing the last one after a server
            # crash only means delivering a few changes again, with the same ids.
            settings["synchronous_commit"] = "off"
            settings.update(
                tcp_keepalives_idle=idle, tcp_keepalives_interval=idle, tcp_keepalives_count="3"
            )
        try:
            return await asyncpg.connect(
                self.dsn, timeout=self.connect_timeout, server_settings=settings
            )
        except BaseException as exc:
            raise self._connect_error(exc) from None

    def _connect_error(self, exc: BaseException) -> BaseException:
        if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
            return exc
        if isinstance(exc, asyncpg.PostgresError):
            refused = refused_setting(self.dsn, one_line(exc))
            if refused is not None:
                return SourceMisconfigured(f"{self.where}: {refused}")
        if isinstance(exc, asyncpg.ClientConfigurationError):  # not transient, though an
            return SourceMisconfigured(f"{self.where}: bad dsn: {one_line(exc)}")  # InterfaceError
        hint = tls_hint(str(exc), POSTGRES, tls=True)
        if isinstance(
            exc,
            asyncpg.InvalidPasswordError
            | asyncpg.InvalidAuthorizationSpecificationError
            | asyncpg.InvalidCatalogNameError,
        ):
            return SourceMisconfigured(f"{self.where}: {one_line(exc)}{hint}")
        if is_transient(exc) or isinstance(exc, asyncpg.PostgresError):
            return SourceUnavailable(f"{self.where}: cannot connect: {one_line(exc)}{hint}")
        if isinstance(exc, ValueError):  # asyncpg's DSN parser
            return SourceMisconfigured(f"{self.where}: bad dsn: {one_line(exc)}")
        return SourceUnavailable(f"{self.where}: cannot connect: {type(exc).__name__}: {exc}")

    async def _admin(self) -> Any:
        """A short-lived connection for setup, checks and migrations."""
        return await self._connect()

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._stopping = False
        self.set_status(State.STARTING, f"connecting to {describe_dsn(self.dsn)}")
        conn = await self._admin()
        try:
            if self.mode == "notify":
                await self._ensure_schema(conn)
            for line in await self._check_tables(conn, attach=True):
                if line.startswith("warning"):
                    self.partition_watch.say(line)  # once: the capture check may find it again
            self._commit_ts = (
                await conn.fetchval("SELECT current_setting('track_commit_timestamp')") == "on"
            )
            if self.mode == "logical":
                from connectors.postgres_logical import LogicalReader

                if self._logical is None:  # kept across restarts: it knows what was routed
                    self._logical = LogicalReader(self)
                await self._logical.prepare(conn, starting=True)
        except asyncpg.PostgresError as exc:
            raise self._setup_error(exc) from None
        finally:
            await conn.close()
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=0,
                max_size=POOL_SIZE,
                timeout=self.connect_timeout,
                server_settings={"application_name": f"feed:{self.name}:snapshot", **RENDERING},
            )
        except BaseException as exc:
            raise self._connect_error(exc) from None

    def _setup_error(self, exc: BaseException) -> ConnectorError:
        if is_transient(exc):
            return SourceUnavailable(f"{self.where}: {one_line(exc)}")
        return SourceMisconfigured(f"{self.where}: {one_line(exc)}")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._logical is not None:
            await self._logical.stop()
        await self._save_on_stop()
        await self._drop_reader()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 5)
            except Exception:
                pool.terminate()
        self._active = False
        self.set_status(State.STOPPED)

    def forget_unsaved(self) -> None:
        self._state = None  # `_load_position` reads the saved row again
        if self._logical is not None:
            self._logical.delivered_end = self._logical.confirmed
            self._logical.crashed = True  # nor does the stop save where it was

    async def _save_on_stop(self) -> None:
        """Record exactly what was delivered, down to a batch interrupted half way, so a
        restart continues after the last delivered row. (While running, the position is saved
        at most every `save_interval`: after a crash the changes since are delivered again,
        with the same ids.)"""
        state = self._state
        if not self._active or state is None:
            return
        half_way = state.batch is not None and state.cursor is not None
        with contextlib.suppress(Exception):
            await self.settle()  # nothing saved past what a cluster could not publish
            conn = await asyncio.wait_for(self._connect(), self.connect_timeout)
            try:
                await conn.execute(
                    f"UPDATE {self.q}.consumers SET snapshot = $2, batch_snapshot = $3,"
                    " cursor_maxid = $4, cursor_id = $5, updated_at = now() WHERE name = $1",
                    self.name,
                    state.prev.text,
                    state.batch.text if half_way and state.batch else None,
                    state.cursor[0] if half_way and state.cursor else None,
                    state.cursor[1] if half_way and state.cursor else None,
                    timeout=self.heartbeat_timeout,
                )
            finally:
                await conn.close()

    async def _drop_reader(self) -> None:
        conn, self._reader = self._reader, None
        if conn is not None:
            conn.terminate()  # the server ends the session: advisory lock and open batch go too

    def targets(self) -> list[str]:
        return list(self.tables)

    def known_targets(self) -> Collection[str]:
        return self._known

    # -- the change stream -----------------------------------------------------------------------

    async def changes(self) -> AsyncIterator[Change | Gap]:
        if self._logical is not None:
            async for item in self._logical.changes():
                yield item
            return
        delay = 0.1
        while not self._stopping:
            try:
                await self._open_reader()
                delay = 0.1
                for fault in self._start_faults:
                    yield self._announce(fault)
                self._start_faults.clear()
                async for change in self._read():
                    yield change
            except asyncio.CancelledError:
                raise
            except _Stopped:
                return
            except SourceMisconfigured:
                raise
            except Exception as exc:
                if self._stopping:
                    return
                if isinstance(exc, asyncpg.PostgresError) and not is_transient(exc):
                    self.set_status(State.DOWN, one_line(exc))
                    raise SourceMisconfigured(f"{self.where}: {one_line(exc)}") from None
                if not is_transient(exc) and not isinstance(exc, SourceUnavailable):
                    raise  # a bug, not the source: the hub logs it and restarts the connector
                log.warning("%s: reader connection lost: %s", self.name, one_line(exc))
                self.count_restart()
                self._active = False
                await self._lost_reader()
                self.set_status(
                    State.DOWN, f"connection lost ({one_line(exc)}); reconnecting in {delay:.1f}s"
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.reconnect_max)

    async def _lost_reader(self) -> None:
        conn, self._reader = self._reader, None
        if conn is not None:
            self._dead_pid = self._reader_pid
            conn.terminate()

    async def _open_reader(self, *, listen: bool = True) -> None:
        """Connect, become the only reader, LISTEN, then load where to resume."""
        conn = await self._connect(reader=True)
        try:
            if self._dead_pid is not None:
                # Our previous session may be half-open and still hold the lock: end it.
                with contextlib.suppress(asyncpg.PostgresError):
                    await conn.execute(
                        "SELECT pg_terminate_backend(pid, 2000) FROM pg_stat_activity"
                        " WHERE pid = $1 AND application_name = $2",
                        self._dead_pid,
                        f"feed:{self.name}:reader",
                        timeout=self.heartbeat_timeout + 2,
                    )
                self._dead_pid = None
            await self._acquire_lock(conn)
            conn.add_termination_listener(self._on_terminated)
            self._reader = conn
            self._reader_pid = conn.get_server_pid()
            if listen:
                await conn.add_listener(self.channel, self._on_notify)
                await self._load_position(conn)
        except BaseException:
            if self._reader is not conn:
                conn.terminate()
            raise
        self._active = True
        self._wake.set()
        self._show_running()

    async def _acquire_lock(self, conn: Any) -> None:
        announced = False
        while True:
            got = await conn.fetchval(
                "SELECT pg_try_advisory_lock($1, hashtext($2))",
                READER_LOCK_CLASS,
                f"{self.schema}/{self.name}",
                timeout=self.heartbeat_timeout,
            )
            if got:
                return
            if not announced:
                self.set_status(
                    State.DOWN, "standby: another feed server is reading this connector"
                )
                announced = True
            if self._stopping:
                raise _Stopped
            await asyncio.sleep(self.standby_interval)

    async def _load_position(self, conn: Any) -> None:
        row = await conn.fetchrow(
            f"SELECT snapshot, batch_snapshot, cursor_maxid, cursor_id"
            f" FROM {self.q}.consumers WHERE name = $1",
            self.name,
            timeout=self.heartbeat_timeout,
        )
        if row is None:  # forgotten by `feed unwatch` while running: start from now
            text = await conn.fetchval(
                f"INSERT INTO {self.q}.consumers (name, snapshot)"
                " VALUES ($1, pg_current_snapshot()::text) RETURNING snapshot",
                self.name,
            )
            self._state = ReaderState(Snap.parse(text))
            self._saved_text = text
            return
        if self._state is not None and self._saved_text is not None:
            saved = Snap.parse(self._saved_text)
            if row["snapshot"] == self._saved_text or Snap.parse(row["snapshot"]).xmax < saved.xmax:
                # A reconnect: memory knows exactly what was delivered, keep it. A row behind
                # what this reader saved is that save lost: written without waiting for fsync,
                # it goes with a server crash (an immediate restart), and reading from the row
                # would deliver everything since again. Only a row further on is news: another
                # feed server read meanwhile, or `feed unwatch` started it afresh.
                self._unsaved = True  # saved again at the next poll
                return
        batch = Snap.parse(row["batch_snapshot"]) if row["batch_snapshot"] else None
        cursor = (row["cursor_maxid"], row["cursor_id"]) if batch is not None else None
        self._state = ReaderState(Snap.parse(row["snapshot"]), batch, cursor)
        self._saved_text = row["snapshot"]

    def _on_notify(self, *args: Any) -> None:
        self._wake.set()

    def _on_terminated(self, conn: Any) -> None:
        self._wake.set()

    def _batch_query(self, resume: bool) -> str:
        visible = "AND pg_visible_in_snapshot(j.xid, $4::text::pg_snapshot)" if resume else ""
        cursor = "WHERE (b.maxid, b.id) > ($5::bigint, $6::bigint)" if resume else ""
        commit_ts = (
            "pg_xact_commit_timestamp((j.xid::text::bigint % 4294967296)::text::xid)"
            if self._commit_ts
            else "NULL::timestamptz"
        )
        return f"""
            SELECT b.* FROM (
                SELECT j.id, j.xid::text::bigint AS xid, j.ts, {commit_ts} AS commit_ts,
                       j.target, j.op, j.before::text AS before, j.after::text AS after,
                       max(j.id) OVER (PARTITION BY j.xid) AS maxid
                FROM {self.q}.journal j
                WHERE (j.xid >= $1::text::xid8 OR j.xid = ANY($2::text::xid8[]))
                  AND j.target = ANY($3::text[]) {visible}
            ) b {cursor}
            ORDER BY b.maxid, b.id"""

    def _first_query(self, resume: bool) -> str:
        """A poll's first rows and the transaction's snapshot, in one round trip.

        Every row carries the snapshot (`now`); when there is nothing to read it is one row of
        NULLs. The same rows as the batch query's first `LIMIT`, without a portal to bind and
        then fetch, and outside a transaction (one statement, one snapshot): a lone change
        costs this one round trip, where BEGIN, a snapshot query, a bind, a fetch and COMMIT
        took five, and on a virtual machine each round trip's wake-ups cost more than the
        Python around it (docs/benchmarks.md).
        """
        limit = 7 if resume else 4
        return f"""
            SELECT s.now, f.* FROM (SELECT pg_current_snapshot()::text AS now) s
            LEFT JOIN LATERAL ({self._batch_query(resume)} LIMIT ${limit}) f ON true
            ORDER BY f.maxid, f.id"""

    async def _read(self) -> AsyncIterator[Change | Gap]:
        """Poll forever: each poll delivers the transactions committed since the last one."""
        while not self._stopping:
            if self._check_now or (
                time.monotonic() - self._last_capture_check >= self.capture_check_interval
            ):
                if self._reader is None or self._reader.is_closed():
                    raise asyncpg.ConnectionDoesNotExistError("reader connection closed")
                async for gap in self._watch_capture(self._reader):
                    yield gap
            state = self._state
            assert state is not None
            if state.cursor is None:
                state.batch = None  # nothing of the interrupted poll was delivered: start afresh
            resume = state.batch is not None
            heard = self._wake.is_set()  # a NOTIFY (the connection spoke just now), not the clock
            self._wake.clear()
            self._polls_started += 1
            poll = self._polls_started
            conn = self._reader
            if conn is None or conn.is_closed():
                raise asyncpg.ConnectionDoesNotExistError("reader connection closed")
            if not heard:
                # The heartbeat: a connection that died while the reader was idle is noticed
                # within heartbeat_timeout, not the query_timeout a page of a backlog may need.
                await conn.execute("SELECT 1", timeout=self.heartbeat_timeout)
            # No transaction around the first query: one statement reads under one snapshot
            # (the `now` it returns), so a poll that fits in one page is one round trip, not
            # three (BEGIN, it, COMMIT). A transaction opens only for the cursor after a full
            # page, whose rows are bounded by that snapshot's text anyway (`_batch_query`).
            tx: Any = None
            side: Any = None  # a connection for positions saved half way through this poll
            try:
                prev = [str(state.prev.xmax), state.prev.xip_array, self.tables]
                args: list[Any] = list(prev)
                if resume:
                    assert state.batch is not None and state.cursor is not None
                    args += [state.batch.text, state.cursor[0], state.cursor[1]]
                rows = await conn.fetch(
                    self._first_query(resume), *args, self.batch_size, timeout=self.query_timeout
                )
                now_text = rows[0]["now"]
                if rows[0]["id"] is None:  # nothing to read: the one row of NULLs
                    rows = []
                batch_snap = state.batch if resume and state.batch else Snap.parse(now_text)
                state.batch = batch_snap
                delivered = 0
                refreshed: set[str] = set()
                truncates: set[tuple[Any, str]] = set()
                cursor = None
                while True:
                    if len(rows) == self.batch_size and delivered == 0 and not self._faults:
                        self.set_status(State.LAGGING, "catching up with the journal")
                    computed = await self._computed(conn, rows)
                    for row in rows:
                        if self._routed_unsaved >= self.save_every and state.cursor is not None:
                            # By count as well as by time: at 34,000 changes a second, half
                            # a second's worth (17,001) was more than the client libraries'
                            # duplicate window. Before the next row, so the last row of a
                            # poll is saved by the poll's own save below.
                            side = await self._save_half_way(side, state)
                        if row["op"] == "truncate" and row["before"] is not None:
                            cut = self._partition_truncated(row, truncates)
                            if cut is not None:
                                yield cut
                            state.cursor = (row["maxid"], row["id"])
                            delivered += 1
                            self._routed_unsaved += 1
                            continue
                        if row["op"] == "truncate":
                            truncates.add((row["xid"], row["target"]))
                        change = await self._decode(conn, row, refreshed, computed)
                        yield change
                        # Asked for the next item: the hub has routed this one.
                        state.cursor = (row["maxid"], row["id"])
                        delivered += 1
                        self._routed_unsaved += 1
                    if len(rows) < self.batch_size:
                        break
                    if delivered and time.monotonic() - self._last_save > self.save_interval:
                        side = await self._save_half_way(side, state)
                    if cursor is None:  # a full first chunk: the rest after it, by a cursor
                        assert state.cursor is not None
                        tx = conn.transaction(isolation="repeatable_read")
                        async with asyncio.timeout(self.heartbeat_timeout):
                            await tx.start()
                        cursor = await conn.cursor(
                            self._batch_query(True),
                            *prev,
                            batch_snap.text,
                            state.cursor[0],
                            state.cursor[1],
                            timeout=self.query_timeout,  # its bind: bounded, as every read
                        )
                    rows = await cursor.fetch(self.batch_size, timeout=self.query_timeout)
                if self.own_status.state == State.LAGGING:
                    self._show_running()
                if tx is not None:
                    # Before the save: a position saved half way (`_save_half_way`) changed
                    # the row after this REPEATABLE READ transaction's snapshot, so updating
                    # it here would fail with a serialization error.
                    async with asyncio.timeout(self.heartbeat_timeout):
                        await tx.commit()
                    tx = None
                now = time.monotonic()
                self._unsaved = self._unsaved or delivered > 0
                since = now - self._last_save
                counted = self._routed_unsaved >= self.save_every
                if resume or counted or since > (self.save_interval if self._unsaved else 10.0):
                    await self.settle()  # in a cluster: published first (connectors.base)
                    updated = await conn.execute(
                        f"UPDATE {self.q}.consumers SET snapshot = $2, batch_snapshot = NULL,"
                        " cursor_maxid = NULL, cursor_id = NULL, updated_at = now()"
                        " WHERE name = $1",
                        self.name,
                        batch_snap.text,
                        timeout=self.heartbeat_timeout,
                    )
                    if updated == "UPDATE 0":  # the position row is gone: look at once
                        self._check_now = True
                    self._last_save = now
                    self._unsaved = False
                    self._routed_unsaved = 0
                    saved = batch_snap.text
                else:
                    saved = None
            except BaseException:
                with contextlib.suppress(Exception):
                    if tx is not None and not conn.is_closed():
                        async with asyncio.timeout(1):
                            await tx.rollback()
                raise
            finally:
                if side is not None:
                    side.terminate()
            self._state = ReaderState(batch_snap)
            if saved is not None:
                self._saved_text = saved
            if resume:
                continue  # the interrupted batch is done: now read what came after it
            await self._delivered(poll)
            await self._maybe_prune(conn)
            # Asleep until woken, the heartbeat, or the next capture check, whichever is first:
            # a disabled trigger sends no NOTIFY, so only the check's own clock finds it.
            due = self._last_capture_check + self.capture_check_interval - time.monotonic()
            self._asleep = True
            try:
                await wait_event(self._wake, max(0.0, min(self.heartbeat_interval, due)))
            finally:
                self._asleep = False

    async def _save_half_way(self, side: Any, state: ReaderState) -> Any:
        """Save where a long poll stands (its batch and the last routed row), as a stop does.

        A poll delivers a whole transaction, or everything committed while the reader was away,
        before it saves at its end: a crash (`kill -9`, an OOM kill) while it ran sent every
        change of it again on the next start, 200,000 for a 200,000-row `UPDATE`, more than a
        cluster's and the client libraries' duplicate windows hold. Saved every `save_interval`,
        at most that much comes again. The reader's own connection is inside the poll's
        REPEATABLE READ transaction, whose writes would land only at its end: this goes
        through a connection of its own, opened once per long poll. Returns it."""
        await self.settle()  # nothing saved past what a cluster could not publish
        if side is None or side.is_closed():
            side = await asyncio.wait_for(self._connect(), self.connect_timeout)
        assert state.batch is not None and state.cursor is not None
        await side.execute(
            f"UPDATE {self.q}.consumers SET snapshot = $2, batch_snapshot = $3,"
            " cursor_maxid = $4, cursor_id = $5, updated_at = now() WHERE name = $1",
            self.name,
            state.prev.text,
            state.batch.text,
            state.cursor[0],
            state.cursor[1],
            timeout=self.heartbeat_timeout,
        )
        self._last_save = time.monotonic()
        self._routed_unsaved = 0
        # A reconnect finds its own save in the row and goes on from memory (further on).
        self._saved_text = state.prev.text
        return side

    async def _computed(self, conn: Any, rows: list[Any]) -> dict[tuple[int, str], str]:
        """Images of `rows` (journal rows) with their virtual generated columns computed, by
        (journal id, side); none for tables without such columns (nearly every poll: one
        lookup per row). A trigger's NEW and OLD hold them as NULL (Postgres 18), where a
        snapshot has their values (postgres_types.computing says why computing them is right).
        """
        wanted: dict[str, list[tuple[tuple[int, str], str]]] = {}
        for row in rows:
            target = row["target"]
            select = self._virtual.get(target, "")
            if select == "":
                select = self._virtual[target] = await computing(
                    conn, self.regclass(target), lambda _, kind: kind == "v", self.query_timeout
                )
            if select is None:
                continue
            for side in ("before", "after"):
                if row[side] is not None and row["op"] != "truncate":
                    wanted.setdefault(target, []).append(((row["id"], side), row[side]))
        computed: dict[tuple[int, str], str] = {}
        for target, items in wanted.items():
            select = self._virtual[target]
            assert select is not None
            rebuilt = await conn.fetch(
                recompute_sql(self.regclass(target), select),
                [text for _, text in items],
                timeout=self.query_timeout,
            )
            for (ref, _), found in zip(items, rebuilt, strict=True):
                computed[ref] = found["image"]
        return computed

    def _partition_truncated(
        self, row: Mapping[str, Any], truncates: set[tuple[Any, str]]
    ) -> Gap | None:
        """A gap for the truncate of one partition of a watched table, once per transaction
        and table (migrations/0002_partition_truncate.sql).

        It emptied part of the table: clients must reload, not clear. When the whole table was
        truncated in the same transaction, each partition's trigger fired too, after the
        table's own, whose truncate already says it all: those pass unannounced.
        """
        target = row["target"]
        if (row["xid"], target) in truncates:
            return None
        truncates.add((row["xid"], target))
        partition = json.loads(row["before"]).get("partition", "?")
        self.count_fault("partition_truncated")
        return Gap(
            self.name,
            f"partition {partition} of {target} was truncated: its rows left {target} "
            "without delete events",
            target,
        )

    # -- the capture watch -----------------------------------------------------------------------

    def _show_running(self) -> None:
        """UP, unless a capture fault stands: then DOWN with what happened and what to run."""
        if self._faults:
            self.set_status(
                State.DOWN,
                "capture interrupted: " + " | ".join(f.line for f in self._faults.values()),
            )
        else:
            self.set_status(State.UP, f"reading {len(self.tables)} table(s)")

    def _announce(self, fault: CaptureFault, reason: str | None = None) -> Gap:
        self.count_fault(fault.kind)
        log.warning("%s: capture interrupted: %s", self.name, fault.line)
        return Gap(self.name, reason or fault.detail, fault.target)

    async def _watch_capture(self, conn: Any) -> AsyncIterator[Gap]:
        """Look at what capture rests on; announce each new fault with a gap, mend what can be
        mended (re-attach), show the rest as DOWN, and close each window with a second gap.

        A mended fault stays shown until the next check finds capture whole, so the window is
        visible in the status and /readyz, not only in the gap.
        """
        self._last_capture_check = time.monotonic()
        self._virtual.clear()  # a virtual column added since: computed from the next page on
        self._check_now = False
        found = await inspect_notify(
            conn, self.schema, self.name, self.tables, self._oids, self.heartbeat_timeout
        )
        current = {(f.target, f.kind): f for f in found}
        for key, old in list(self._faults.items()):
            if key in current:
                continue
            del self._faults[key]
            if not old.mend or old.hint:  # fixed by someone else: the window closes now
                what = old.target or self.name
                yield Gap(
                    self.name,
                    f"capture of {what} resumed; changes made while it was stopped were not "
                    f"captured ({old.detail})",
                    old.target,
                )
        user = None
        for key, fault in current.items():
            standing = self._faults.get(key)
            # A new fault; or one the feed failed to mend (its hint says so): try again.
            if standing is not None and not (standing.mend and standing.hint):
                continue
            shown = fault
            if fault.mend:
                user = user or await conn.fetchval("SELECT current_user")
                ok, done = await self._mend(conn, fault, user)
                shown = CaptureFault(
                    fault.target,
                    fault.kind,
                    f"{fault.detail}; {done}",
                    "" if ok else "run `feed migrate --config <file>`",
                    True,
                )
            self._faults[key] = shown
            if standing is None:
                yield self._announce(shown)
        self._show_running()
        async for gap in self.partition_watch.look(conn):
            yield gap
        for gap in await self.notice_columns(conn):
            yield gap
        # Counting the journal scans it: every sixth check (30 s by default) is enough for
        # metrics and warnings about growth measured in minutes.
        if time.monotonic() - self._last_measure >= min(30.0, 6 * self.capture_check_interval):
            await self._measure(conn)

    async def notice_columns(self, conn: Any) -> list[Gap]:
        """Read a table's shape again when its columns changed, and announce a gap for it
        (connectors/postgres_columns.py says why). Both modes, at every capture check.

        A new or dropped column also shows in the next image (`_decode`), a new type does not:
        the images kept the old type's decoding (bytea as `\\x..` text, a new timestamptz not
        in UTC), and filters were checked against it, until a restart. One catalog query per
        capture check, for every watched table.
        """
        regclasses = {target: self.regclass(target) for target in self.tables}
        found = await column_lists(conn, regclasses, self.heartbeat_timeout, self.keys)
        gaps: list[Gap] = []
        for target, columns in found.items():
            seen = self._columns_seen.get(target)
            self._columns_seen[target] = columns
            if seen is None or seen == columns:
                continue
            if target in self._shapes:
                await self._refresh_shape(conn, target)
            reason = gap_reason(target, seen, columns)
            log.warning("%s: %s", self.name, reason)
            self.count_fault("columns_changed")
            gaps.append(Gap(self.name, reason, target))
        return gaps

    async def _mend(self, conn: Any, fault: CaptureFault, user: str) -> tuple[bool, str]:
        """Repair what the feed itself set up; say whether it worked and what was done."""
        state = self._state
        try:
            if fault.kind == "position_lost" and state is not None:
                await conn.execute(
                    f"INSERT INTO {self.q}.consumers (name, snapshot) VALUES ($1, $2)"
                    " ON CONFLICT (name) DO NOTHING",
                    self.name,
                    state.prev.text,
                )
                return True, "position restored from memory"
            if fault.target is not None:
                regclass = self.regclass(fault.target)
                await self._attach(conn, fault.target, regclass, user)
                for line in await self._cover(conn, fault.target, user):
                    log.warning("%s: %s", self.name, line)
                oid = await conn.fetchval("SELECT to_regclass($1)::oid", regclass)
                if oid is not None:
                    self._oids[fault.target] = int(oid)
                    self._shapes.pop(fault.target, None)  # a re-created table: read it again
                return True, "capture re-attached"
        except (SourceMisconfigured, asyncpg.PostgresError) as exc:
            if isinstance(exc, asyncpg.PostgresError) and is_transient(exc):
                raise
            return False, f"could not re-attach ({one_line(exc)})"
        return True, "nothing to mend"

    async def _measure(self, conn: Any) -> None:
        """Journal size and age for the metrics; warn once per crossing of the ceiling, and
        once per position that has not moved for journal_warn_age (it holds back pruning)."""
        self._last_measure = time.monotonic()
        stats = self._stats = await journal_stats(
            conn, self.schema, self.name, self.query_timeout, self.journal_warn_age
        )
        over = stats.rows > self.journal_warn_rows or stats.undelivered_age > self.journal_warn_age
        if over and not self._over_ceiling:
            log.warning(
                "%s: the journal holds %d rows (%d bytes), the oldest undelivered change is %.0fs"
                " old (ceiling: journal_warn_rows = %d, journal_warn_age = %g)",
                self.name,
                stats.rows,
                stats.bytes,
                stats.undelivered_age,
                self.journal_warn_rows,
                self.journal_warn_age,
            )
        self._over_ceiling = over
        for name in stats.stale_consumers:
            if name not in self._warned_stale:
                log.warning(
                    "%s: the journal position of %r has not moved for over %gs and holds back "
                    "pruning for every connector: start it, or run `feed unwatch --connector %s`",
                    self.name,
                    name,
                    self.journal_warn_age,
                    name,
                )
        self._warned_stale = set(stats.stale_consumers)

    def gauges(self) -> list[Gauge]:
        samples = super().gauges()
        logical = self._logical
        if logical is not None and logical.retained_wal is not None:
            samples += [
                ("feed_capture_ok", (), 1.0),
                ("feed_postgres_slot_retained_wal_bytes", (), float(logical.retained_wal)),
            ]
        if self.mode != "notify" or self._stats is None:
            return samples
        stats = self._stats
        samples += [
            ("feed_capture_ok", (), 0.0 if self._faults else 1.0),
            ("feed_postgres_journal_rows", (), float(stats.rows)),
            ("feed_postgres_journal_bytes", (), float(stats.bytes)),
            ("feed_postgres_journal_undelivered_age_seconds", (), stats.undelivered_age),
            ("feed_postgres_journal_over_ceiling", (), 1.0 if self._over_ceiling else 0.0),
            ("feed_postgres_stale_consumers", (), float(len(stats.stale_consumers))),
        ]
        return samples

    async def _delivered(self, poll: int) -> None:
        async with self._progress:
            self._polls_delivered = poll
            self._progress.notify_all()

    async def _maybe_prune(self, conn: Any) -> None:
        now = time.monotonic()
        if now - self._last_prune < self.prune_interval:
            return
        self._last_prune = now
        # Only rows every consumer has delivered (below the oldest saved snapshot's xmin) go.
        # In chunks (short locks, short transactions), as many as a quarter of the interval
        # allows: a fixed 10,000 per 10 s fell behind any sustained 1,000 rows/s.
        budget = now + max(0.05, self.prune_interval / 4)
        pruned = False
        while True:
            done = await conn.execute(
                f"""DELETE FROM {self.q}.journal WHERE id IN (
                        SELECT id FROM {self.q}.journal
                        WHERE xid < (SELECT min(pg_snapshot_xmin(snapshot::pg_snapshot))
                                     FROM {self.q}.consumers)
                          AND ts < now() - make_interval(secs => $1)
                        LIMIT $2)""",
                self.retention,
                PRUNE_CHUNK,
                # The heartbeat's bound, not query_timeout: the prune runs on the reader's own
                # connection, and a half-open connection must be noticed within
                # heartbeat_interval + heartbeat_timeout even when it dies mid-prune (a chunk
                # takes milliseconds; one that times out costs a reconnect, not a change).
                timeout=self.heartbeat_timeout,
            )
            deleted = int(done.split()[-1]) if done.startswith("DELETE") else 0
            pruned = pruned or deleted > 0
            if deleted < PRUNE_CHUNK or time.monotonic() > budget or self._stopping:
                break
        if pruned:
            self._prunes_unvacuumed += 1
            await self._maybe_vacuum(conn)

    async def _maybe_vacuum(self, conn: Any) -> None:
        """VACUUM the journal every `VACUUM_EVERY` prunes that deleted rows, where autovacuum
        does not look after it (`JournalStats.autovacuum`, measured with the journal's size).

        A deleted row's space is reused only once a vacuum has passed: without one the journal,
        which every change passes through, grew on disk without end however well it was pruned
        (2.3 MB a minute at 20 changes/s in a soak on a server with autovacuum off: bench/soak.py).
        Where the feed cannot (a role that may not, a vacuum that fails or takes longer than
        `query_timeout`), it says once in the log what to do instead and leaves it at that.
        """
        stats = self._stats
        if (
            stats is None
            or stats.autovacuum
            or self._vacuum_given_up
            or self._prunes_unvacuumed < VACUUM_EVERY
        ):
            return
        self._prunes_unvacuumed = 0
        reason = "this role may not VACUUM it"
        if stats.may_vacuum:
            try:
                # A pruned journal's takes milliseconds; the first of one that grew for long
                # may take longer than any timeout: then it is not tried again (a timeout each
                # time would cost the reader a query cancelled every minute).
                await conn.execute(f"VACUUM {self.q}.journal", timeout=self.query_timeout)
                return
            except TimeoutError:
                reason = f"VACUUM of it took longer than {self.query_timeout:g}s"
            except asyncpg.PostgresError as exc:
                reason = f"VACUUM of it failed: {one_line(exc)}"
        self._vacuum_given_up = True
        log.warning(
            "%s: autovacuum is off for %s.journal and %s: the journal grows on disk although it "
            "is pruned; turn autovacuum on, or VACUUM it regularly as its owner",
            self.name,
            self.schema,
            reason,
        )

    async def _shape(self, conn: Any, target: str) -> TableShape:
        shape = self._shapes.get(target)
        if shape is None:
            shape = await self._refresh_shape(conn, target)
        return shape

    async def _refresh_shape(self, conn: Any, target: str) -> TableShape:
        self._virtual.pop(target, None)  # columns may have changed: look again
        regclass = self.regclass(target)
        if await conn.fetchval("SELECT to_regclass($1)", regclass) is None:
            raise SourceMisconfigured(f"{self.where}: table {target} does not exist")
        shape = await self._read_shape(conn, target, regclass)
        self._shapes[target] = shape
        return shape

    async def _read_shape(self, conn: Any, target: str, regclass: str) -> TableShape:
        """The table's columns and key: its primary key, or the columns `keys` names for it."""
        shape = await read_shape(conn, target, regclass, self.query_timeout)
        key = self.keys.get(target)
        if key is None:
            return shape
        missing = [name for name in key if name not in shape.columns]
        if missing:
            raise SourceMisconfigured(
                f"{self.where}: keys: {target} has no column {missing[0]!r} (its columns: "
                f"{', '.join(shape.columns)}); fix keys"
            )
        return replace(shape, primary_key=key)

    async def _decode(
        self,
        conn: Any,
        row: Mapping[str, Any],
        refreshed: set[str],
        computed: Mapping[tuple[int, str], str],
    ) -> Change:
        target = row["target"]
        shape = await self._shape(conn, target)
        before_text = computed.get((row["id"], "before"), row["before"])
        after_text = computed.get((row["id"], "after"), row["after"])
        before = shape.decode(before_text)
        after = shape.decode(after_text)
        if target not in refreshed and not all(
            shape.knows(image) for image in (before, after) if image is not None
        ):
            refreshed.add(target)  # a column was added (or dropped): read the catalog again
            shape = await self._refresh_shape(conn, target)
            before = shape.decode(before_text)
            after = shape.decode(after_text)
        return self.make_change(
            shape,
            op=row["op"],
            before=before,
            after=after,
            ts=row["commit_ts"] or row["ts"],
            change_id=f"{self.name}:{row['id']}",
            position=(row["xid"], row["id"]),
        )

    def make_change(
        self,
        shape: TableShape,
        *,
        op: str,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
        ts: Any,
        change_id: str,
        position: Any,
    ) -> Change:
        key = shape.key(after if after is not None else before)
        meta = None
        if op == "update" and before is not None and shape.primary_key:
            old_key = shape.key(before)
            if old_key != key:
                meta = {"old_key": old_key}
        return Change(
            id=change_id,
            connector=self.name,
            source="postgres",
            target=shape.target,
            op=op,
            key=key,
            before=before,
            after=after,
            ts=ts,
            meta=meta,
            position=position,
        )

    def check_filter(self, target: str, row_filter: RowFilter) -> None:
        """Unknown columns and literals not of the column's type: see connectors/postgres_filters."""
        shape = self._shapes.get(target) or self._adopted.get(target)
        if shape is not None:  # not read yet, nor shared by a reader: nothing to check against
            check_filter(shape, row_filter)

    def check_forced_filter(self, target: str, row_filter: RowFilter) -> None:
        """A rule's forced filter, as a client's: an unknown column, a claim not of its type."""
        self.check_filter(target, row_filter)

    def check_key(self, target: str, key: str) -> None:
        """A row room's key against the table's key columns: see connectors/postgres_filters."""
        shape = self._shapes.get(target)
        if shape is None:  # a node that does not read: the reader's key columns, if it said
            adopted = self._adopted.get(target)
            if adopted is None or target not in self._adopted_keys:
                return
            shape = replace(adopted, primary_key=self._adopted_keys[target])
        check_key(shape, key, self.name)

    def filter_schema(self) -> dict[str, dict[str, str]] | None:
        schema = {target: dict(shape.column_types) for target, shape in self._shapes.items()}
        # Key columns under a name no table has (a target holds a dot); nodes that do not know
        # it skip it, as they skip any name that is not one of their tables.
        schema[KEYS_ENTRY] = {
            target: ",".join(shape.primary_key) for target, shape in self._shapes.items()
        }
        return schema

    def adopt_filter_schema(self, schema: Mapping[str, Mapping[str, str]]) -> None:
        self._adopted = {
            target: TableShape(target, {}, (), dict(types))
            for target, types in schema.items()
            if target in self.targets_by_table and isinstance(types, Mapping)
        }
        keys = schema.get(KEYS_ENTRY)
        self._adopted_keys = {
            target: tuple(columns.split(",")) if columns else ()
            for target, columns in (keys.items() if isinstance(keys, Mapping) else ())
            if isinstance(columns, str)
        }

    # -- snapshots -------------------------------------------------------------------------------

    async def snapshot(
        self, address: RoomAddress, where: Callable[[Mapping[str, Any]], bool], limit: int
    ) -> Snapshot:
        if address.target not in self.targets_by_table:
            raise SnapshotNotSupported(f"{self.name}: no table {address.target!r}")
        pool = self._pool
        if pool is None:
            raise SourceUnavailable(f"{self.where}: not connected")
        shape = self._shapes.get(address.target)
        if shape is None:
            raise SourceUnavailable(f"{self.where}: table {address.target} not checked yet")
        if address.key is not None and not shape.primary_key:
            raise SnapshotNotSupported(
                f"{address.target} has no primary key, so it has no row rooms to snapshot"
            )
        # Twice at most: a pooled connection may have died while idle (pg_terminate_backend,
        # a restarted server, an idle timeout) or while it read, which a fresh one mends; the
        # subscriber gets rows, or one clear `snapshot_failed` it may retry, never a traceback.
        for attempt in (1, 2):
            try:
                read = await self._snapshot_pooled(shape, address, where, limit)
                break
            except SourceUnavailable:
                raise
            except asyncpg.PostgresError as exc:
                if not is_transient(exc):
                    raise SourceUnavailable(
                        f"{self.where}: snapshot of {address.target}: {one_line(exc)}"
                    ) from None
                lost: BaseException = exc
            except Exception as exc:
                if not is_transient(exc):
                    raise
                lost = exc
            if attempt == 2 or self._stopping:
                raise SourceUnavailable(
                    f"{self.where}: snapshot of {address.target}: connection lost "
                    f"({one_line(lost)}): retry"
                ) from None
            log.info("%s: snapshot connection lost (%s): reading again", self.name, one_line(lost))
        rows, keys, truncated, snap_text, extra = read
        covers = await self._wait_past(Snap.parse(snap_text), extra)
        return Snapshot(rows=rows, covers=covers, truncated=truncated, keys=keys)

    async def _snapshot_pooled(
        self,
        shape: TableShape,
        address: RoomAddress,
        where: Callable[[Mapping[str, Any]], bool],
        limit: int,
    ) -> tuple[list[dict[str, Any]], list[str | None], bool, str, Any]:
        """`_snapshot_on` a connection of the pool (the current one: a restart replaces it)."""
        pool = self._pool
        if pool is None:
            raise SourceUnavailable(f"{self.where}: not connected (the connector is restarting)")
        try:
            conn = await pool.acquire(timeout=self.connect_timeout)
        except TimeoutError:
            raise SourceUnavailable(
                f"{self.where}: no database connection for the snapshot within "
                f"{self.connect_timeout:g}s (the {POOL_SIZE} it has are busy with other snapshots, "
                "or the database is slow to answer): retry"
            ) from None
        try:
            try:
                return await self._snapshot_on(conn, shape, address, where, limit)
            except asyncpg.PostgresError as exc:
                if not exc.sqlstate or exc.sqlstate[:2] not in ("42", "22"):
                    raise
                # The table changed since its shape was read (a column the filter names dropped,
                # or of another type now): read it again, so the filter goes by the columns
                # there are, and take the snapshot anew.
                shape = await self._refresh_shape(conn, address.target)
                return await self._snapshot_on(conn, shape, address, where, limit)
        finally:
            # A broken connection is terminated by the pool, which then raises: nothing to add.
            with contextlib.suppress(Exception):
                await pool.release(conn)

    async def _snapshot_on(
        self,
        conn: Any,
        shape: TableShape,
        address: RoomAddress,
        where: Callable[[Mapping[str, Any]], bool],
        limit: int,
    ) -> tuple[list[dict[str, Any]], list[str | None], bool, str, Any]:
        """The rows, their keys, whether cut at `limit`, and what `_wait_past` needs: read on
        `conn` in one REPEATABLE READ transaction."""
        # `t.*`, not `t`: a bare `t` is the column of that name when the table has one.
        sql = f"SELECT to_jsonb(t.*)::text AS row FROM {self.regclass(address.target)} t"
        clauses: list[str] = []
        args: list[Any] = []
        values = address.key.split(",") if address.key is not None else []
        if values and len(values) == len(shape.primary_key) and self._key_in_sql(shape):
            clauses = [
                f"t.{quote_ident(col)}::text = ${i}" for i, col in enumerate(shape.primary_key, 1)
            ]
            args = list(values)
        if isinstance(where, Where):  # the room's filter, as far as SQL keeps every row it may
            more, more_args = pushdown(shape, where.filter, len(args) + 1)
            clauses += more
            args += more_args
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        rows: list[dict[str, Any]] = []
        keys: list[str | None] = []
        truncated = False
        left = self.snapshot_scan_limit or -1
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            snap_text = await conn.fetchval(
                "SELECT pg_current_snapshot()::text", timeout=self.query_timeout
            )
            extra = await self._snapshot_extra(conn)
            async for record in conn.cursor(sql, *args, prefetch=200):
                if not left:
                    truncated = True
                    break
                left -= 1
                row = shape.decode(record["row"])
                assert row is not None
                key = room_key(shape.key(row))
                if address.key is not None and key != address.key:
                    continue
                if not where(row):
                    continue
                if len(rows) >= limit:
                    truncated = True
                    break
                rows.append(row)
                keys.append(key)
        if self._logical is not None:
            await self._logical.flushed_past(conn, extra)
        return rows, keys, truncated, snap_text, extra

    def _key_in_sql(self, shape: TableShape) -> bool:
        """Whether a row room's key can be matched in SQL (its text form equals room_key's)."""
        simple = {"int2", "int4", "int8", "text", "varchar", "uuid", "name", "citext"}
        return all(shape.column_types.get(col) in simple for col in shape.primary_key)

    async def _snapshot_extra(self, conn: Any) -> Any:
        if self._logical is not None:
            return await self._logical.snapshot_mark(conn)
        return None

    async def wait_for_next_poll(self) -> None:
        """Wait for a complete poll begun after now: by then every transaction committed before
        this call has been read and routed, which is what a snapshot's exactness rests on."""
        need = self._polls_started + 1
        self._wake.set()
        try:
            async with asyncio.timeout(self.snapshot_wait):
                async with self._progress:
                    await self._progress.wait_for(lambda: self._polls_delivered >= need)
        except TimeoutError:
            raise SourceUnavailable(
                f"{self.where}: the change stream did not catch up with the snapshot within "
                f"{self.snapshot_wait:g}s ({self.status.detail or self.status.state.value})"
            ) from None

    async def _wait_past(self, snap: Snap, extra: Any) -> Callable[[Change], bool]:
        """Honour the Snapshot contract: return once every change the rows reflect is yielded."""
        if self._logical is not None:
            covers_logical: Callable[[Change], bool] = await self._logical.wait_past(snap, extra)
            return covers_logical
        await self.wait_for_next_poll()

        def covers(change: Change) -> bool:
            position: PgPosition = change.position
            return type(position) is tuple and snap.visible(position[0])

        return covers
