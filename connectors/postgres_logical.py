"""Logical decoding mode: read committed changes from a replication slot instead of a journal.

For servers with `wal_level = logical`. Nothing runs inside the user's transactions (no trigger,
no journal insert, no NOTIFY lock at commit), so writers pay far less; the price is a slot that
holds WAL until the feed confirms it, and the privileges to create one. The reader polls
`pg_logical_slot_peek_binary_changes` over asyncpg with the built-in `pgoutput` plugin (no
extension to install), parses its messages, and confirms with `pg_replication_slot_advance` once
the hub has routed a batch. Transactions arrive whole and in exact commit order, with their
commit timestamps.

Row values come out of pgoutput as the types' text output. Rather than re-implement every type's
parser, the reader asks the server to rebuild each image with `jsonb_populate_record` and
`to_jsonb`, which yields exactly the jsonb the notify mode's trigger stores, so both modes decode
through the same `TableShape` and produce equal images.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import re
import struct
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import asyncpg

from connectors.base import State
from connectors.postgres_capture import Partition, partitions
from connectors.postgres_errors import is_transient, one_line
from connectors.postgres_migrate import quote_ident, quote_literal
from connectors.postgres_types import computing, loads, plain, recompute_sql
from connectors.postgres_waits import LOCK_WAIT, lock_holder, oldest_transaction
from feed.core.change import Change, Gap
from feed.errors import SourceMisconfigured, SourceUnavailable

if TYPE_CHECKING:
    from connectors.postgres import PostgresConnector, Snap


async def wait_event(event: asyncio.Event, seconds: float) -> None:
    """Wait for `event` at most `seconds` (see connectors.postgres.wait_event for why)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
MARKER = "dbfeed: replication slot"
STOPPED_AT = re.compile(r"\(stopped at ([0-9A-Fa-f]+/[0-9A-Fa-f]+),")
ROUTED = re.compile(r"; routed (\d+) of the transaction committed at ([0-9A-Fa-f]+/[0-9A-Fa-f]+)\)")
"""The marker's record of a transaction routed in part (see `LogicalReader._save_partial`)."""
"""Start of the comment left on the publication once the slot exists: a slot missing later was
dropped or lost (not never made), which a restarted feed could not otherwise know."""
PEEK = (
    "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, $2,"
    " 'proto_version', '1', 'publication_names', $3)"
)
CHUNK = 1000
"""Messages fetched, and changes of one transaction decoded, before they are handed on."""
JSON_TYPES = {114, 3802}  # json, jsonb: their text is JSON, spliced into a rebuilt image as it is


INVALIDATED = "to_jsonb(s) ->> 'invalidation_reason'"
"""Why a slot was invalidated (Postgres 17+; NULL before, and for a valid slot)."""


def invalidation(wal_status: str | None, reason: str | None) -> str:
    """Why a slot can no longer be read, and what to change, for a status line."""
    if reason == "wal_removed" or (reason is None and wal_status == "lost"):
        return (
            "wal_status lost: the server removed WAL the feed had not read; raise "
            "max_slot_wal_keep_size"
        )
    if reason == "idle_timeout":
        return (
            "idle_timeout: unread for longer than idle_replication_slot_timeout; raise it, or "
            "keep a feed running"
        )
    return f"{reason}"


def parse_lsn(text: str) -> int:
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def full_xid(xid: int, near: int) -> int:
    """The 64-bit transaction id (as `pg_snapshot` has them) of pgoutput's 32-bit `xid`,
    taken as the one nearest `near` (a snapshot's xmax): within 2**31 either side, as
    Postgres itself widens an xid relative to a recent one.

    Not "the one at or below xmax": a transaction that began after the snapshot has an xid
    above its xmax, and moving that back an epoch made it older than xmin, so visible: every
    change committed after the snapshot but routed before the subscriber's catch-up ended was
    taken for one the snapshot reflected and left out, silently when none came before it
    (the jump after a snapshot is allowed), else as a client reload "changes a..b never
    arrived" (docs/connectors/postgres.md, "Snapshots").
    """
    distance = (xid - near) & 0xFFFFFFFF
    if distance >= 1 << 31:
        distance -= 1 << 32
    return near + distance


FLUSH_POLL = 0.005
"""Seconds between looks at the WAL's flush point while a snapshot waits for it (`flushed_past`)."""


LogicalPosition = tuple[int, int, int]
"""A change's transaction (32-bit xid, as pgoutput gives it), commit LSN and index.

A plain tuple, as the trigger mode's `PgPosition` (connectors/postgres.py says why)."""


@dataclass
class Relation:
    target: str
    columns: list[tuple[str, int]]
    key: frozenset[str] = frozenset()
    """The replica identity's columns: all of them under FULL, else the key's."""


@dataclass
class RawChange:
    target: str
    op: str
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    unsent: tuple[str, ...] = ()
    """Unchanged TOASTed columns of an update whose values no old row gave (`_row`)."""
    key_only: bool = False
    """`before` holds the key's columns only: the replica identity is not FULL (`_row`)."""


@dataclass
class Transaction:
    xid: int
    commit_ts: dt.datetime
    commit_lsn: int  # known from its Begin message: changes are named before the commit is read
    end_lsn: int = 0  # from its Commit message
    changes: list[RawChange] = field(default_factory=list)  # decoded, not yet handed on
    taken: int = 0  # changes handed on before `changes` (the index of its first)
    unsent: set[str] = field(default_factory=set)  # targets given a gap for unsent TOAST


class PgOutputParser:
    """pgoutput protocol version 1, one message per row of the peek function."""

    def __init__(
        self,
        seen: dict[str, list[tuple[str, int]]] | None = None,
        altered: set[str] | None = None,
    ) -> None:
        self.relations: dict[int, Relation] = {}
        self.current: Transaction | None = None
        self.seen = {} if seen is None else seen
        """Each table's columns (name, type) as its last Relation message gave them, kept from
        one peek to the next by the reader."""
        self.altered = set() if altered is None else altered
        """Tables whose columns changed since a previous Relation message: pgoutput sends one
        ahead of a table's first change after an `ALTER TABLE`, the only word of it there is."""

    def feed(self, data: bytes) -> Transaction | None:
        """Consume one message; return a transaction when its commit arrives."""
        kind = data[:1]
        body = memoryview(data)[1:]
        if kind == b"B":
            final_lsn, ts, xid = struct.unpack_from("!qqI", body)
            self.current = Transaction(xid, PG_EPOCH + dt.timedelta(microseconds=ts), final_lsn)
        elif kind == b"C":
            _flags, commit_lsn, end_lsn, ts = struct.unpack_from("!bqqq", body)
            done, self.current = self.current, None
            if done is not None:
                done.commit_lsn, done.end_lsn = commit_lsn, end_lsn
                done.commit_ts = PG_EPOCH + dt.timedelta(microseconds=ts)
            return done
        elif kind == b"R":
            self._relation(body)
        elif kind in (b"I", b"U", b"D"):
            self._row(kind, body)
        elif kind == b"T":
            self._truncate(body)
        return None  # Origin, Type and Message need nothing

    def _relation(self, body: memoryview) -> None:
        (relid,) = struct.unpack_from("!I", body)
        pos = 4
        namespace, pos = _cstring(body, pos)
        name, pos = _cstring(body, pos)
        pos += 1  # replica identity setting
        (count,) = struct.unpack_from("!h", body, pos)
        pos += 2
        columns = []
        key = set()
        for _ in range(count):
            flags = body[pos]  # 1: part of the replica identity
            pos += 1
            column, pos = _cstring(body, pos)
            type_oid, _typmod = struct.unpack_from("!Ii", body, pos)
            pos += 8
            columns.append((column, type_oid))
            if flags & 1:
                key.add(column)
        target = f"{namespace}.{name}"
        if self.seen.get(target, columns) != columns:
            self.altered.add(target)
        self.seen[target] = columns
        self.relations[relid] = Relation(target, columns, frozenset(key))

    def _row(self, kind: bytes, body: memoryview) -> None:
        (relid,) = struct.unpack_from("!I", body)
        relation = self.relations[relid]
        pos = 4
        before = after = None
        marker = bytes(body[pos : pos + 1])
        old = marker == b"O"  # the whole old row (FULL); `K` holds the key columns only
        key_only = marker == b"K"
        if marker in (b"K", b"O"):
            before, pos = _tuple(body, pos + 1, relation)
            marker = bytes(body[pos : pos + 1])
        if key_only and before is not None:
            # The replica identity is not FULL (changed by hand, until the capture check sets
            # it back with a gap; or a table the feed may not alter): the old row's other
            # columns come as NULL, values it never had. Left out: `before` has the key only.
            before = {name: value for name, value in before.items() if name in relation.key}
        if marker == b"N":
            after, pos = _tuple(body, pos + 1, relation)
        unsent: list[str] = []
        for name, value in (after or {}).items():  # TOASTed columns the update did not touch
            if value is not _UNCHANGED or after is None:
                continue
            if old and before is not None and before.get(name, _UNCHANGED) is not _UNCHANGED:
                after[name] = before[name]
            else:
                # No old row holds it (the replica identity is not FULL): no value to send,
                # and null would be a value the row never had.
                unsent.append(name)
        op = {b"I": "insert", b"U": "update", b"D": "delete"}[kind]
        if self.current is not None:
            self.current.changes.append(
                RawChange(relation.target, op, before, after, tuple(unsent), key_only)
            )

    def _truncate(self, body: memoryview) -> None:
        count, _options = struct.unpack_from("!Ib", body)
        relids = struct.unpack_from(f"!{count}I", body, 5)
        for relid in relids:
            relation = self.relations.get(relid)
            if relation is not None and self.current is not None:
                self.current.changes.append(RawChange(relation.target, "truncate"))


_UNCHANGED = object()


UNREBUILDABLE = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)
"""What the server's rebuild of one image raises because of a value in it (`_rebuild`)."""


@dataclass(frozen=True)
class Unreadable:
    """A rebuilt image in place of one the server could not make (`_rebuild`): its change is a
    gap, naming the server's reason."""

    reason: str


def image_text(image: dict[str, Any], json_columns: Collection[str] = ()) -> str:
    """An image as one JSON object for jsonb_populate_record: a json or jsonb column's own
    text as it is, the other columns' texts as JSON strings (unchanged TOAST columns left out).
    `json_columns` names the columns of a domain over json or jsonb too (pgoutput gives the
    domain's type): as a JSON string, their value became a JSON string, `"{\"a\": 1}"` for
    `{"a": 1}`, and a domain's CHECK on it failed, the reader's every attempt for good.

    The server reads a JSON column's numbers and keys as `to_jsonb` does in notify mode and in
    snapshots (`1.0E+2` is the numeric `100`, keys in jsonb's order). Before, the text went
    through Python's json: `1.0E+2` became the float `100.0`, sent as `100.0`.
    """
    parts = []
    for name, cell in image.items():
        if cell is _UNCHANGED:
            continue
        if isinstance(cell, Cell):
            spliced = cell.type_oid in JSON_TYPES or name in json_columns
            value = cell.text if spliced else json.dumps(cell.text)
        else:
            value = json.dumps(cell)
        parts.append(f"{json.dumps(name)}:{value}")
    return "{" + ",".join(parts) + "}"


def _cstring(body: memoryview, pos: int) -> tuple[str, int]:
    end = bytes(body[pos:]).index(b"\0") + pos
    return bytes(body[pos:end]).decode(), end + 1


@dataclass(frozen=True)
class Cell:
    """One column value as pgoutput sends it: the type's text output and the type."""

    text: str
    type_oid: int


def _bool(text: str) -> bool:
    return text == "t"


def _float(text: str) -> float:
    """A double as `to_jsonb` gives it, which reads it through numeric: -0 is 0."""
    return float(text) + 0.0


def _json(text: str) -> Any:
    return plain(loads(text))


# Types whose text output Python reads directly (the values equal what `to_jsonb` and
# TableShape.decode give); every other type goes through the server (see _rebuild).
DIRECT: dict[int, Callable[[str], Any]] = {
    16: _bool,
    20: int,
    21: int,
    23: int,
    26: int,
    700: _float,
    701: _float,
    1700: Decimal,
    25: str,
    1043: str,
    1042: str,
    19: str,
    2950: uuid.UUID,
    1082: dt.date.fromisoformat,
    1114: dt.datetime.fromisoformat,
    1184: dt.datetime.fromisoformat,
    3802: _json,  # jsonb's text is already jsonb's (not `json`, kept as written: rebuilt)
}


def direct(image: dict[str, Any] | None) -> dict[str, Any] | None:
    """The image as Python values when every column has a direct reader, else None."""
    if image is None:
        return None
    out: dict[str, Any] = {}
    for name, cell in image.items():
        if cell is None:
            out[name] = None
            continue
        if not isinstance(cell, Cell) or cell.type_oid not in DIRECT:
            return None
        try:
            out[name] = DIRECT[cell.type_oid](cell.text)
        except (ValueError, ArithmeticError):  # 'infinity', BC dates and the like
            return None
    return out


def _tuple(body: memoryview, pos: int, relation: Relation) -> tuple[dict[str, Any], int]:
    (count,) = struct.unpack_from("!h", body, pos)
    pos += 2
    values: dict[str, Any] = {}
    for i in range(count):
        kind = bytes(body[pos : pos + 1])
        pos += 1
        name, type_oid = relation.columns[i]
        if kind == b"n":
            values[name] = None
        elif kind == b"u":
            values[name] = _UNCHANGED
        else:
            (length,) = struct.unpack_from("!i", body, pos)
            pos += 4
            values[name] = Cell(bytes(body[pos : pos + length]).decode(), type_oid)
            pos += length
    return values, pos


async def drop_slot(conn: Any, slot: str) -> bool:
    """Drop the connector's replication slot if it exists (`feed unwatch`)."""
    found = await conn.fetchval(
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1", slot
    )
    if not found:
        return False
    await conn.execute("SELECT pg_drop_replication_slot($1)", slot)
    with contextlib.suppress(asyncpg.PostgresError):
        await conn.execute(f"DROP PUBLICATION IF EXISTS {quote_ident(slot)}")
    return True


class LogicalReader:
    """The logical-mode half of PostgresConnector: slot setup, polling, confirming."""

    def __init__(self, connector: PostgresConnector) -> None:
        self.c = connector
        self.slot = connector.slot
        self.publication = connector.slot
        self.delivered_end = 0  # every transaction ending at or before this LSN is routed
        self.partial: tuple[int, int] | None = None  # (commit_lsn, changes routed), half done
        self.columns: dict[str, tuple[frozenset[str], str | None]] = {}  # _read_columns
        self.relation_columns: dict[str, list[tuple[str, int]]] = {}  # PgOutputParser.seen
        self.altered: set[str] = set()  # PgOutputParser.altered: shapes to read again
        self.confirmed = 0
        self.last_nudge = 0.0
        self.partial_saved = 0.0  # when `partial` was last written into the marker
        self.partial_mark: tuple[int, int] | None = None  # the `partial` the marker holds
        self.side: Any = None  # `_save_partial`'s connection, while a poll runs
        self.crashed = False  # tests: a stop that saves nothing, as after a kill -9
        self.pending_gap = False
        self.gap_reason = ""
        self.gap_kind = "slot_lost"  # feed_capture_faults_total's kind for the pending gap
        self.readded: list[str] = []
        """Watched tables the start found out of the publication and put back: a gap each."""
        self.can_nudge: bool | None = None
        self.retained_wal: int | None = None
        self.wal_status = ""
        self.last_check = 0.0
        self.recreate = False  # the slot must be made anew at the next start (`changes`)
        self.broken: SourceMisconfigured | None = None
        """A fault `_watch` announced with gaps; `_read` raises it once they are yielded."""

    # -- setup -----------------------------------------------------------------------------------

    async def prepare(self, conn: Any, *, starting: bool = False) -> list[str]:
        """Check wal_level, then make the publication, replica identities and slot exist."""
        c = self.c
        level = await conn.fetchval("SHOW wal_level")
        if level != "logical":
            raise SourceMisconfigured(
                f"{c.where}: mode = 'logical' needs wal_level = logical (it is {level}); "
                "set it and restart Postgres, or use mode = 'notify'"
            )
        lines: list[str] = []
        tables = ", ".join(c.regclass(t) for t in c.tables)
        pub = quote_ident(self.publication)
        parts = await partitions(conn, c.tables, c._trigger_names(), c.query_timeout)
        self._refuse_virtual(parts)
        busy = ""
        try:
            exists = await conn.fetchval(
                "SELECT count(*) FROM pg_publication WHERE pubname = $1", self.publication
            )
            current = {
                f"{r['schemaname']}.{r['tablename']}"
                for r in await conn.fetch(
                    "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = $1",
                    self.publication,
                )
            }
            # The options (`_unset_options` says why each): set when made, and again when found
            # otherwise. One transaction: no write sees the publication without them.
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_WAIT}'")
                if not exists:
                    await conn.execute(f"CREATE PUBLICATION {pub} FOR TABLE {tables}")
                    lines.append(f"created publication {self.publication!r}")
                elif current != set(c.tables):
                    await conn.execute(f"ALTER PUBLICATION {pub} SET TABLE {tables}")
                    lines.append(
                        f"publication {self.publication!r} now covers {len(c.tables)} tables"
                    )
                    # Out of it since the publication was made: dropped and made again (a
                    # publication forgets a dropped table), or taken out by hand. What was
                    # written to it meanwhile was never decoded (a table new to `tables` has
                    # no follower to mislead: a gap too many there, never a change missed).
                    self.readded = sorted(set(c.tables) - current)
                unset = await self._unset_options(conn)
                if unset:
                    await conn.execute(f"ALTER PUBLICATION {pub} SET ({', '.join(unset)})")
                    if exists:
                        lines.append(f"publication {self.publication!r} now has {', '.join(unset)}")
            # Full before images for updates and deletes, any table; for a partitioned table
            # its partitions' setting is the one that counts.
            for part in parts:
                if not part.full:
                    busy = part.regclass
                    # One string, one implicit transaction: the SET goes with a failing ALTER.
                    await conn.execute(
                        f"SET lock_timeout = '{LOCK_WAIT}';"
                        f" ALTER TABLE {part.regclass} REPLICA IDENTITY FULL; RESET lock_timeout"
                    )
                    lines.append(f"{part.name}: replica identity full")
        except asyncpg.LockNotAvailableError:
            # Waiting on, the ALTER's lock would hold up every writer of the table behind it.
            holder = await lock_holder(conn, busy) if busy else ""
            raise SourceUnavailable(
                f"{c.where}: {busy or tables} is busy: setting up logical mode waited "
                f"{LOCK_WAIT} for a transaction holding a lock on it"
                f"{' (' + holder + ')' if holder else ''} and gave way to its writers; end or "
                "commit that transaction, then try again (a running feed does by itself)"
            ) from None
        except asyncpg.InsufficientPrivilegeError as exc:
            raise SourceMisconfigured(
                f"{c.where}: logical mode needs to own the watched tables "
                f"(publication, replica identity): {exc}"
            ) from None
        slot = await conn.fetchrow(
            "SELECT plugin, database, wal_status, confirmed_flush_lsn::text AS confirmed,"
            f" {INVALIDATED} AS invalidated FROM pg_replication_slots s WHERE slot_name = $1",
            self.slot,
        )
        marker = await self._marker(conn)
        marked = marker is not None
        if slot is not None and slot["database"] != await conn.fetchval(
            "SELECT current_database()"
        ):
            raise SourceMisconfigured(
                f"{c.where}: replication slot {self.slot!r} belongs to database "
                f"{slot['database']!r}, not this one: choose another `slot` name"
            )
        recreate, self.recreate = self.recreate, False
        if slot is not None and recreate:  # see `changes`: a publication dropped (gap said)
            await self._drop_when_free(conn)
            lines.append(f"dropped replication slot {self.slot!r} (its publication was dropped)")
            slot = None
        if slot is not None and (slot["wal_status"] == "lost" or slot["invalidated"]):
            # Invalidated: the server removed WAL it still needed (max_slot_wal_keep_size), or
            # (Postgres 17+) for another reason, such as Postgres 18's
            # idle_replication_slot_timeout. The slot can never be read again; a new one is the
            # only way on, with a gap.
            why = invalidation(slot["wal_status"], slot["invalidated"])
            c.set_status(
                State.DOWN,
                f"replication slot {self.slot!r} was invalidated ({why}): recreating it, "
                "changes in between are lost and announced",
            )
            await self._drop_when_free(conn)
            lines.append(f"dropped invalidated replication slot {self.slot!r} ({why})")
            self.pending_gap = True
            self.gap_kind = "slot_lost"
            self.gap_reason = (
                f"replication slot {self.slot!r} was invalidated ({why}) and was recreated: "
                "changes in between were lost"
            )
            slot = None
        elif slot is None and not recreate and (self.delivered_end or marked):
            # It was there before (this process read from it, or the marker a previous run left
            # on the publication says so): what happened meanwhile is gone.
            self.pending_gap = True
            self.gap_kind = "slot_lost"
            self.gap_reason = (
                f"replication slot {self.slot!r} was dropped (by an operator, `feed unwatch`, "
                "or invalidation) and was recreated: changes in between were lost"
            )
        if slot is None:
            try:
                await conn.execute(
                    "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                    self.slot,
                    timeout=c.query_timeout,
                )
            except asyncpg.InsufficientPrivilegeError:
                user = await conn.fetchval("SELECT current_user")
                raise SourceMisconfigured(
                    f"{c.where}: permission denied to create replication slot {self.slot!r}: "
                    f"ALTER ROLE {user} REPLICATION"
                ) from None
            except TimeoutError:
                # A new slot waits for every transaction open when it began (asyncpg cancels
                # the statement at the timeout, so nothing is left behind).
                oldest = await oldest_transaction(conn)
                raise SourceUnavailable(
                    f"{c.where}: creating replication slot {self.slot!r} waited "
                    f"{c.query_timeout:g}s (query_timeout) for the transactions open when it "
                    f"began{' (the oldest: ' + oldest + ')' if oldest else ''}; end or commit "
                    "them, then try again (a running feed does by itself)"
                ) from None
            lines.append(f"created replication slot {self.slot!r}")
            await self._set_marker(conn, "running" if starting else "created")
            return lines
        if slot["plugin"] != "pgoutput":
            raise SourceMisconfigured(
                f"{c.where}: replication slot {self.slot!r} uses {slot['plugin']}, not pgoutput: "
                "choose another `slot` name"
            )
        routed = ROUTED.search(marker or "")
        if (
            routed
            and self.partial is None
            and slot["confirmed"]
            and parse_lsn(routed.group(2)) > parse_lsn(slot["confirmed"])
        ):
            # A previous run was cut off (or stopped) half way through this transaction: the
            # slot gives it again whole, and the reader skips what that run routed.
            self.partial = (parse_lsn(routed.group(2)), int(routed.group(1)))
            self.partial_mark = self.partial
        stopped = STOPPED_AT.search(marker or "")
        if (
            stopped
            and slot["confirmed"]
            and parse_lsn(slot["confirmed"]) > parse_lsn(stopped.group(1))
        ):
            # Ours stopped there; the slot now confirms more: someone read it (consuming what the
            # feed had not delivered) or dropped and made it again while the feed was stopped.
            self.pending_gap = True
            self.gap_kind = "slot_lost"
            self.gap_reason = (
                f"replication slot {self.slot!r} moved on while the feed was stopped (it stopped "
                f"at {stopped.group(1)}, the slot now starts after {slot['confirmed']}: read by "
                "something else, or dropped and recreated): changes in between were not delivered"
            )
        if starting or not marked:
            await self._set_marker(conn, "running" if starting else "created")
        return lines

    async def _set_marker(self, conn: Any, state: str) -> None:
        """Leave on the publication that the slot exists, and whether the feed stopped cleanly
        (with where) or is running; see MARKER."""
        now = dt.datetime.now(dt.UTC)
        routed = ""
        if self.partial is not None and self.partial[0] >= self.delivered_end:
            routed = (
                f"; routed {self.partial[1]} of the transaction committed at "
                f"{format_lsn(self.partial[0])}"
            )
        await conn.execute(
            f"COMMENT ON PUBLICATION {quote_ident(self.publication)} IS "
            + quote_literal(f"{MARKER} {self.slot} ({state}, {now:%Y-%m-%d %H:%M:%SZ}{routed})"),
            timeout=self.c.query_timeout,
        )

    async def _save_partial(self) -> None:
        """Write how much of the transaction being handed on was routed into the marker.

        The slot cannot be confirmed inside a transaction, so a crash (`kill -9`, an OOM kill)
        half way through a large one sent all of it again at the next start: 143,001 changes
        of a 200,000-row `UPDATE`, far more than a cluster's and the client libraries'
        duplicate windows hold, so clients got them twice. The next start reads this and
        skips what was routed: at most `save_interval` worth, and at most `save_every`
        changes, comes again. The reader's own connection may be inside a peek's cursor
        transaction: this uses one of its own, kept until the poll ends (`_read`), as saves
        by count come several times a second in a large transaction."""
        await self.c.settle()  # nothing saved past what a cluster could not publish
        if self.side is None or self.side.is_closed():
            self.side = await asyncio.wait_for(self.c._connect(), self.c.connect_timeout)
        await self._set_marker(self.side, "running")
        self.partial_saved = time.monotonic()
        self.partial_mark = self.partial

    def _routed_unsaved(self, commit_lsn: int) -> int:
        """Changes of the transaction committed at `commit_lsn` routed since the marker last
        said how many were (`save_every`)."""
        if self.partial is None or self.partial[0] != commit_lsn:
            return 0
        mark = self.partial_mark
        return self.partial[1] - (mark[1] if mark is not None and mark[0] == commit_lsn else 0)

    async def _drop_when_free(self, conn: Any) -> None:
        """Drop the slot; a session of ours that was just cut off may still hold it briefly."""
        for _ in range(50):
            try:
                await conn.execute("SELECT pg_drop_replication_slot($1)", self.slot)
                return
            except asyncpg.ObjectInUseError:
                await asyncio.sleep(0.1)
        await conn.execute("SELECT pg_drop_replication_slot($1)", self.slot)

    async def _marker(self, conn: Any) -> str | None:
        """The marker a previous run left (the slot existed, whatever happened since), or None."""
        comment = await conn.fetchval(
            "SELECT obj_description(oid, 'pg_publication') FROM pg_publication WHERE pubname = $1",
            self.publication,
        )
        text = str(comment) if comment else ""
        return text if text.startswith(f"{MARKER} {self.slot} ") else None

    def _refuse_virtual(self, parts: list[Partition]) -> None:
        """Refuse a table with a virtual generated column (Postgres 18+): pgoutput cannot send
        one, and Postgres refuses every UPDATE and DELETE of a published table whose replica
        identity (FULL, which the feed needs for whole before images) holds a column it does
        not send: watching it would break its users' writes."""
        for part in parts:
            if part.virtual:
                raise SourceMisconfigured(
                    f"{self.c.where}: logical mode cannot watch {part.target}: {part.name} has "
                    f"virtual generated columns ({part.virtual}), which a publication cannot "
                    "send, and with the replica identity FULL the feed needs Postgres would "
                    "refuse its updates and deletes; watch it with mode = 'notify' (another "
                    "connector), or make the columns STORED"
                )

    async def _unset_options(self, conn: Any) -> list[str]:
        """The publication's options that are not as the reader needs them, as `name = value`.

        `publish`: every kind of change (insert, update, delete, truncate), as when made.
        `publish_via_partition_root`: a partitioned table's changes come under its own name (by
        default pgoutput names the partition, which is no watched table, and they were lost).
        `publish_generated_columns` (Postgres 18+): generated columns come with the row; left
        out, Postgres refuses every UPDATE and DELETE of a table whose replica identity (FULL)
        holds one ("Replica identity must not contain unpublished generated columns"), so the
        feed would break its users' writes. Before 18 they are never sent; the reader computes
        them (`_rebuild`).
        """
        found = await conn.fetchval(
            "SELECT to_jsonb(p)::text FROM pg_publication p WHERE pubname = $1", self.publication
        )
        if found is None:
            return []
        options = json.loads(found)
        unset = []
        kinds = ("insert", "update", "delete", "truncate")
        if not all(options.get(f"pub{kind}", True) for kind in kinds):
            # Narrowed by hand (`SET (publish = 'insert')`): the other kinds of change were
            # not decoded at all, and clients' rows drifted from the table without a word.
            unset.append(f"publish = '{', '.join(kinds)}'")
        if not options.get("pubviaroot"):
            unset.append("publish_via_partition_root = true")
        if options.get("pubgencols", "s") != "s":
            unset.append("publish_generated_columns = stored")
        return unset

    async def _marked(self, conn: Any) -> bool:
        return await self._marker(conn) is not None

    async def migrate(self, conn: Any) -> list[str]:
        lines = await self.prepare(conn)
        if self.pending_gap:
            lines.append(f"warning: {self.gap_reason}")
        if self.readded:  # a running feed's start would have announced them with a gap
            lines.append(
                f"warning: {', '.join(self.readded)} were not in publication "
                f"{self.publication!r} (new in `tables`, or dropped and re-created): changes "
                "made to them before now were not decoded; clients following them should reload"
            )
        return lines

    async def inspect(self, conn: Any) -> dict[str, Any] | None:
        """The slot as the server sees it, with the WAL it holds back (None when missing)."""
        row = await conn.fetchrow(
            f"""SELECT active, wal_status, {INVALIDATED} AS invalidated,
                      database = current_database() AS here,
                      pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint AS retained,
                      (SELECT count(*) FROM pg_publication_tables p
                       WHERE p.pubname = $2) AS tables,
                      (SELECT coalesce(array_agg(t), ARRAY[]::text[]) FROM unnest($3::text[]) t
                       WHERE NOT EXISTS (SELECT 1 FROM pg_publication_tables p
                                         WHERE p.pubname = $2
                                           AND p.schemaname || '.' || p.tablename = t)
                      ) AS unpublished,
                      (SELECT coalesce(array_agg(t), ARRAY[]::text[]) FROM unnest($3::text[], $4::text[])
                              u(t, reg) WHERE to_regclass(u.reg) IS NULL) AS missing
               FROM pg_replication_slots s WHERE slot_name = $1""",
            self.slot,
            self.publication,
            self.c.tables,
            [self.c.regclass(target) for target in self.c.tables],
            timeout=self.c.query_timeout,
        )
        return dict(row) if row is not None else None

    async def _watch(self, conn: Any) -> list[Gap]:
        """Every `capture_check_interval`: the slot still there and readable, the publication
        still covering every table, and the WAL it holds back (for the metric).

        A fault ends the stream with SourceMisconfigured, so the hub restarts the connector:
        its `prepare` recreates what is missing and the restart announces the gap.
        """
        c = self.c
        self.last_check = time.monotonic()
        self.columns.clear()  # a generated column added since (not sent) is computed from now on
        parts = await partitions(conn, c.tables, c._trigger_names(), c.heartbeat_timeout)
        virtual = sorted({part.target for part in parts if part.virtual})
        if virtual:  # added since the start: out of the publication at once, so writes work
            await conn.execute(
                f"ALTER PUBLICATION {quote_ident(self.publication)} DROP TABLE "
                + ", ".join(c.regclass(target) for target in virtual)
            )
            self.pending_gap = True
            self.gap_kind = "publication"
            self.gap_reason = f"{', '.join(virtual)} left the publication (virtual columns)"
            self._refuse_virtual(parts)
        info = await self.inspect(conn)
        if info is None:
            raise SourceMisconfigured(
                f"{c.where}: replication slot {self.slot!r} was dropped while the feed read it; "
                "recreating it (changes in between are lost and announced)"
            )
        self.retained_wal = int(info["retained"] or 0)
        self.wal_status = str(info["wal_status"] or "")
        if self.wal_status == "lost" or info["invalidated"]:
            why = invalidation(self.wal_status, info["invalidated"])
            raise SourceMisconfigured(
                f"{c.where}: replication slot {self.slot!r} was invalidated ({why}); "
                "recreating it (changes in between are lost and announced)"
            )
        if info["missing"]:
            # Renamed or dropped: the publication follows a renamed table by its oid, so its
            # changes went on coming under the new name, which no room has, and were skipped
            # while the connector showed `up`.
            # Announced at once (clients reload: their snapshot waits for the table), then
            # down until it is back, as notify mode does.
            gone = ", ".join(info["missing"])
            self.broken = SourceMisconfigured(
                f"{c.where}: table {gone} does not exist (renamed or dropped); re-create it "
                "or rename it back (the feed goes on by itself), or remove it from `tables`"
            )
            c.count_fault("table_missing")
            return [
                Gap(c.name, f"table {target} no longer exists (renamed or dropped)", target)
                for target in info["missing"]
            ]
        if info["unpublished"] or info["tables"] < len(c.tables):
            self.pending_gap = True
            self.gap_kind = "publication"
            self.gap_reason = (
                f"publication {self.publication!r} stopped covering some watched tables "
                "(ALTER PUBLICATION?): their changes in between were not decoded"
            )
            raise SourceMisconfigured(
                f"{c.where}: publication {self.publication!r} no longer covers every watched "
                "table; re-adding them (changes in between are lost and announced)"
            )
        unset = await self._unset_options(conn)
        if unset:
            self.pending_gap = True
            self.gap_kind = "publication"
            self.gap_reason = (
                f"publication {self.publication!r} lost {', '.join(unset)}: changes in between "
                "may not have been decoded"
            )
            raise SourceMisconfigured(
                f"{c.where}: publication {self.publication!r} lost {', '.join(unset)}; setting "
                "it again (changes in between are lost and announced)"
            )
        gaps = [gap async for gap in c.partition_watch.look(conn, parts)]
        return gaps + await c.notice_columns(conn)

    async def stop(self) -> None:
        """Confirm what was routed, so a restart does not deliver it again, and mark where the
        feed stopped: a slot found further on at the next start was moved by someone else."""
        if self.crashed:
            return
        with contextlib.suppress(Exception):
            conn = await asyncio.wait_for(self.c._connect(), self.c.connect_timeout)
            try:
                await self._advance(conn)
                confirmed = await conn.fetchval(
                    "SELECT confirmed_flush_lsn::text FROM pg_replication_slots"
                    " WHERE slot_name = $1",
                    self.slot,
                )
                if confirmed and await self._marked(conn):
                    await self._set_marker(conn, f"stopped at {confirmed}")
            finally:
                await conn.close()

    async def _advance(self, conn: Any) -> None:
        if self.delivered_end > self.confirmed:
            await self.c.settle()  # in a cluster: published first (connectors.base)
            await conn.execute(
                "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
                self.slot,
                format_lsn(self.delivered_end),
                timeout=self.c.query_timeout,
            )
            self.confirmed = self.delivered_end
            now = time.monotonic()
            if now - self.last_nudge >= self.c.save_interval:
                self.last_nudge = now
                await self._nudge_restart_point(conn)

    async def _nudge_restart_point(self, conn: Any) -> None:
        """Let the slot's restart point follow what was confirmed.

        Every peek decodes WAL from the slot's restart point, which only moves where the server
        logged a running-transactions record (every 15 s, or at a checkpoint); under steady
        writes each peek would decode up to 15 s of WAL again. Postgres 16+ can log one on
        demand (superuser, or EXECUTE granted on pg_log_standby_snapshot); without it the
        reader still works, just with more decoding per poll.
        """
        if self.can_nudge is False:
            return
        try:
            await conn.execute("SELECT pg_log_standby_snapshot()", timeout=self.c.query_timeout)
            self.can_nudge = True
        except (asyncpg.UndefinedFunctionError, asyncpg.InsufficientPrivilegeError):
            self.can_nudge = False

    # -- reading ---------------------------------------------------------------------------------

    async def changes(self) -> AsyncIterator[Change | Gap]:
        c = self.c
        delay = 0.1
        while not c._stopping:
            try:
                await c._open_reader(listen=False)
                await self._reread_confirmed()
                delay = 0.1
                if self.pending_gap:
                    self.pending_gap = False
                    self.delivered_end = self.confirmed = 0
                    self.partial = None
                    c.count_fault(self.gap_kind)
                    reason = self.gap_reason or f"replication slot {self.slot!r} was recreated"
                    self.readded = []  # this gap, for every table, says it already
                    yield Gap(c.name, reason)
                readded, self.readded = self.readded, []
                for target in readded:
                    c.count_fault("publication")
                    yield Gap(
                        c.name,
                        f"table {target} was not in publication {self.publication!r} (dropped "
                        "and re-created, or taken out of it, while the feed did not read it): "
                        "changes to it before now were not decoded; reload",
                        target,
                    )
                async for change in self._read():
                    yield change
            except asyncio.CancelledError:
                raise
            except SourceMisconfigured:
                raise
            except Exception as exc:
                if c._stopping:
                    return
                if type(exc).__name__ == "_Stopped":
                    return
                in_use = isinstance(exc, asyncpg.ObjectInUseError)  # our last session, ending
                if isinstance(exc, asyncpg.PostgresError) and not is_transient(exc) and not in_use:
                    line = one_line(exc)
                    if f'publication "{self.publication}" does not exist' in line:
                        # Dropped by hand: the slot decodes each change with the catalog of
                        # its time, so it fails on every change made without the publication,
                        # even once the start has made it again; it was a restart loop for
                        # good. Only a new slot goes on, with a gap.
                        self.recreate = True
                        self.pending_gap = True
                        self.gap_kind = "publication"
                        self.gap_reason = (
                            f"publication {self.publication!r} was dropped while the feed read "
                            "(by hand?): the replication slot could not decode past it and was "
                            "recreated with the publication; changes in between were lost"
                        )
                        line += "; recreating it and the replication slot, with a gap"
                    if "can no longer" in line and "replication slot" in line:
                        line += (
                            " (invalidated: the server removed WAL the feed had not read, see "
                            "max_slot_wal_keep_size; the feed recreates the slot, with a gap)"
                        )
                    c.set_status(State.DOWN, line)
                    raise SourceMisconfigured(f"{c.where}: {line}") from None
                if not (is_transient(exc) or in_use or isinstance(exc, SourceUnavailable)):
                    raise  # a bug, not the source: the hub logs it and restarts the connector
                c._active = False
                c.count_restart()
                await c._lost_reader()
                what = one_line(exc) if in_use else f"connection lost ({one_line(exc)})"
                c.set_status(State.DOWN, f"{what}; reconnecting in {delay:.1f}s")
                await asyncio.sleep(delay)
                delay = min(delay * 2, c.reconnect_max)

    async def _reread_confirmed(self) -> None:
        """Take the slot's own confirmed point when it is behind what this reader confirmed.

        A server crash (an immediate restart) sets a slot back to its state at the last
        checkpoint: everything confirmed since comes again at each peek. The reader skips what
        it routed, but believing it had confirmed it, it never advanced the slot again, so
        every peek returned the same already-routed page: the connector stayed `up`, delivered
        nothing more, and snapshots timed out.
        """
        conn = self.c._reader
        text = await conn.fetchval(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            self.slot,
            timeout=self.c.heartbeat_timeout,
        )
        if text is not None:
            self.confirmed = min(self.confirmed, parse_lsn(text))

    async def _read(self) -> AsyncIterator[Change | Gap]:
        c = self.c
        while not c._stopping:
            c._wake.clear()
            c._polls_started += 1
            poll = c._polls_started
            conn = c._reader
            if conn is None or conn.is_closed():
                raise asyncpg.ConnectionDoesNotExistError("reader connection closed")
            if time.monotonic() - self.last_check >= c.capture_check_interval:
                for gap in await self._watch(conn):
                    yield gap
                if self.broken is not None:
                    broken, self.broken = self.broken, None
                    raise broken
            parser = PgOutputParser(self.relation_columns, self.altered)
            read = 0
            try:
                async with contextlib.aclosing(self._pages(conn)) as pages:
                    async for rows in pages:
                        read += len(rows)
                        for row in rows:
                            done = parser.feed(bytes(row["data"]))
                            txn = done or parser.current
                            if txn is None or (done is None and len(txn.changes) < CHUNK):
                                continue
                            async for change in self._hand_on(conn, txn, final=done is not None):
                                yield change
            finally:
                side, self.side = self.side, None
                if side is not None:
                    side.terminate()
            # Confirm what was routed at once: a peek returns everything after the confirmed
            # point, so confirming late means reading the same transactions again.
            if self.delivered_end > self.confirmed:
                await self._advance(conn)
            if read < c.batch_size:
                await c._delivered(poll)
                await wait_event(c._wake, c.poll_interval)

    async def _pages(self, conn: Any) -> AsyncGenerator[list[Any], None]:
        """One peek's messages, at most CHUNK at a time, so that the feed's memory does not
        grow with a transaction's size (a 300,000-row INSERT took 390 MB when a peek was read
        whole; Postgres keeps a peek's output in a tuplestore, on disk past work_mem).

        The first page is one statement, no transaction: a poll is one round trip, as before.
        Only a full page reads the rest, by a cursor over the same peek past it (the slot has
        not moved, so the peek gives the same messages; the server decodes them again, which a
        poll of more than CHUNK messages, a backlog or a large transaction, can afford).
        """
        c = self.c
        args = (self.slot, c.batch_size, self.publication, CHUNK)
        rows = await conn.fetch(PEEK + " LIMIT $4", *args, timeout=c.query_timeout)
        yield rows
        if len(rows) < CHUNK:
            return
        async with conn.transaction():
            cursor = await conn.cursor(PEEK + " OFFSET $4", *args, timeout=c.query_timeout)
            while True:
                rows = await cursor.fetch(CHUNK, timeout=c.query_timeout)
                yield rows
                if len(rows) < CHUNK:
                    return

    async def _hand_on(
        self, conn: Any, txn: Transaction, *, final: bool
    ) -> AsyncIterator[Change | Gap]:
        """The changes of `txn` decoded since the last call; with `final`, its commit was read.

        Transactions routed already but not yet confirmed to the slot come again (a peek
        starts at the confirmed point), and so do the changes routed of one cut short: both
        are skipped. A transaction is routed iff its commit LSN is below the end of the last
        one routed whole, as commits come in order.
        """
        c = self.c
        pending, base = txn.changes, txn.taken
        txn.changes, txn.taken = [], base + len(pending)
        if txn.commit_lsn < self.delivered_end:
            return
        for target in {raw.target for raw in pending} & self.altered:
            # Columns added, dropped, renamed or of another type: decode by what they are now
            # (notify mode notices a new column name in an image; a type change shows nowhere
            # but here).
            self.altered.discard(target)
            if target in c.targets_by_table:
                await c._refresh_shape(conn, target)
        images = await self._rebuild(conn, pending)
        skip = self.partial[1] if self.partial and self.partial[0] == txn.commit_lsn else 0
        for index, raw in enumerate(pending, base):
            if raw.target not in c.targets_by_table or index < skip:
                continue
            if self._routed_unsaved(txn.commit_lsn) >= c.save_every:
                # By count as well as by time: half a second's worth (10,001 changes) was
                # more than the client libraries' duplicate window. Before the next change,
                # so a transaction's last one is confirmed with the slot instead.
                await self._save_partial()
            if raw.op == "truncate":  # its partitions' new storage is no gap
                c.partition_watch.truncated_whole.add(raw.target)
            if raw.unsent:
                if raw.target not in txn.unsent:  # one gap a table and transaction: one reload
                    txn.unsent.add(raw.target)
                    yield Gap(
                        c.name,
                        f"an update of {raw.target} was not delivered: its unchanged TOASTed "
                        f"column(s) {', '.join(raw.unsent)} came without their values (the "
                        "table's replica identity is not FULL; the feed sets it back); reload",
                        raw.target,
                    )
            elif unreadable := [
                image
                for side in (0, 1)
                if isinstance(image := images.get((id(raw), side)), Unreadable)
            ]:
                yield Gap(
                    c.name,
                    f"a change of {raw.target} was not delivered: the server could not rebuild "
                    f"its row from the logged values ({unreadable[0].reason}); reload",
                    raw.target,
                )
            else:
                yield await self._change(conn, txn, index, raw, images)
            self.partial = (txn.commit_lsn, index + 1)
        if final:
            self.delivered_end = txn.end_lsn
            self.partial = None
        elif time.monotonic() - self.partial_saved >= c.save_interval:
            await self._save_partial()

    async def _rebuild(
        self, conn: Any, changes: list[RawChange]
    ) -> dict[tuple[int, int], str | Unreadable | None]:
        """Ask the server for `to_jsonb` images of the text values, one query per table.

        Also every image of a table with generated columns: pgoutput leaves them out (before
        Postgres 18), where a snapshot and notify mode's `to_jsonb(NEW)` have them, so they are
        computed here from the row, by the column's own expression (immutable, and of the
        row's other columns only, so the value is the one stored).
        """
        wanted: dict[str, list[tuple[tuple[int, int], str]]] = {}
        jsons: dict[str, set[str]] = {}  # by table: its json and jsonb columns, domains too
        for raw in changes:
            if raw.target not in self.c.targets_by_table:
                continue
            sample = raw.after if raw.after is not None else raw.before
            if sample is None:
                continue  # a truncate
            known = self.columns.get(raw.target)
            partial = raw.after is None and raw.key_only  # a delete's key: not the columns sent
            if known is None or (known[0] != sample.keys() and not partial):
                known = await self._read_columns(conn, raw.target, sample.keys())
            for side, image in ((0, raw.before), (1, raw.after)):
                if image is not None and (known[1] is not None or direct(image) is None):
                    json_columns = jsons.get(raw.target)
                    if json_columns is None:  # once a table and call: this runs per change
                        types = (await self.c._shape(conn, raw.target)).column_types
                        json_columns = jsons[raw.target] = {
                            name for name, kind in types.items() if kind in ("json", "jsonb")
                        }
                    text = image_text(image, json_columns)
                    wanted.setdefault(raw.target, []).append(((id(raw), side), text))
        images: dict[tuple[int, int], str | Unreadable | None] = {}
        for target, items in wanted.items():
            sql = recompute_sql(self.c.regclass(target), self.columns[target][1])
            rebuilt: list[str | Unreadable | None]
            try:
                rows = await conn.fetch(
                    sql, [text for _, text in items], timeout=self.c.query_timeout
                )
                rebuilt = [row["image"] for row in rows]
            except UNREBUILDABLE:
                # A value the server's own text output gives but cannot take back: a `json`
                # value with \u0000 (untranslatable) or a lone surrogate escape such as \ud83d
                # (invalid input syntax), which jsonb cannot hold (notify mode's trigger fails
                # the write itself); an old value a domain's constraint, added NOT VALID since,
                # refuses (jsonb_populate_record checks it; to_jsonb(OLD) does not). The change
                # with it is set aside (a gap, `_hand_on`), image by image, so that it does not
                # stop the reader at this transaction for good, and the others go on.
                rebuilt = []
                for _, text in items:
                    try:
                        row = await conn.fetchrow(sql, [text], timeout=self.c.query_timeout)
                        rebuilt.append(None if row is None else row["image"])
                    except UNREBUILDABLE as exc:
                        detail = f": {exc.detail}" if getattr(exc, "detail", None) else ""
                        rebuilt.append(Unreadable(f"{one_line(exc)}{detail}"))
            for (ref, _), made in zip(items, rebuilt, strict=True):
                images[ref] = made
        return images

    async def _read_columns(
        self, conn: Any, target: str, published: Any
    ) -> tuple[frozenset[str], str | None]:
        """Remember, for the columns pgoutput sends of `target`, the select list that adds its
        stored generated columns (None when it sends them all, or has none: before Postgres 18
        it sends none); read again when the columns sent change."""
        select = await computing(
            conn,
            self.c.regclass(target),
            lambda name, kind: kind == "s" and name not in published,
            self.c.query_timeout,
        )
        known = (frozenset(published), select)
        self.columns[target] = known
        return known

    async def _change(
        self,
        conn: Any,
        txn: Transaction,
        index: int,
        raw: RawChange,
        images: dict[tuple[int, int], str | Unreadable | None],
    ) -> Change:
        c = self.c
        shape = await c._shape(conn, raw.target)

        def image(side: int, cells: dict[str, Any] | None) -> dict[str, Any] | None:
            ref = (id(raw), side)
            if ref not in images:  # not rebuilt: read directly
                return direct(cells)
            text = images[ref]
            assert not isinstance(text, Unreadable), "a gap, not a change (_hand_on)"
            decoded = shape.decode(text)
            if raw.key_only and side == 0 and decoded is not None and cells is not None:
                # The server's rebuild gives every column, the others (generated ones too) null.
                return {name: value for name, value in decoded.items() if name in cells}
            return decoded

        before, after = image(0, raw.before), image(1, raw.after)
        return c.make_change(
            shape,
            op=raw.op,
            before=before,
            after=after,
            ts=txn.commit_ts,
            change_id=f"{c.name}:{format_lsn(txn.commit_lsn)}:{index}",
            position=(txn.xid, txn.commit_lsn, index),
        )

    # -- snapshots -------------------------------------------------------------------------------

    async def snapshot_mark(self, conn: Any) -> int:
        """Where the WAL ends just after the snapshot was taken (on its connection, in its
        transaction): every transaction the snapshot sees has its commit record below this."""
        text = await conn.fetchval(
            "SELECT pg_current_wal_insert_lsn()::text", timeout=self.c.query_timeout
        )
        return parse_lsn(text)

    async def flushed_past(self, conn: Any, mark: int) -> None:
        """Wait until the server has flushed its WAL up to `mark` (`snapshot_mark`).

        The slot decodes flushed WAL only, and a transaction committed with
        `synchronous_commit = off` is visible before its commit record is flushed (the WAL
        writer does it up to `wal_writer_delay`, 200 ms by default, later). So the poll
        `wait_past` waits for could end before a transaction the rows reflect was read: the
        snapshot returned, the catch-up ended, and that change came afterwards, live, to a
        subscriber whose rows had it already (every one of 40 snapshots taken right after an
        asynchronous commit did so). Usually the flush is past the mark by the time the rows
        are read, and this is one query.
        """
        c = self.c
        try:
            async with asyncio.timeout(c.snapshot_wait):
                while True:
                    text = await conn.fetchval(
                        "SELECT pg_current_wal_flush_lsn()::text", timeout=c.query_timeout
                    )
                    if parse_lsn(text) >= mark:
                        return
                    await asyncio.sleep(FLUSH_POLL)
        except TimeoutError:
            raise SourceUnavailable(
                f"{c.where}: the server did not flush its WAL past the snapshot within "
                f"{c.snapshot_wait:g}s"
            ) from None

    async def wait_past(self, snap: Snap, extra: Any) -> Callable[[Change], bool]:
        """Wait for a complete poll begun after the snapshot: every transaction visible in it
        has committed before, so its changes have been routed by then."""
        await self.c.wait_for_next_poll()

        def covers(change: Change) -> bool:
            position: LogicalPosition = change.position
            if type(position) is not tuple:
                return False
            return snap.visible(full_xid(position[0], snap.xmax))

        return covers
