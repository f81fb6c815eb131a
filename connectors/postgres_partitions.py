"""The Postgres connector's watch over what its capture check cannot see as a fault: the
partitions of watched tables and, in logical mode, their replica identities.

Why: dropping or detaching a partition (the usual way to expire old rows of a partitioned
table) removes its rows from the table without a row event, attaching a table that has rows
adds them the same way, and a partition's TRUNCATE is no truncate of the table. These are
events, not standing faults: each is a `gap` for the table's rooms when seen, and the capture
goes on. In logical mode a replica identity changed by hand from FULL makes updates and
deletes come without their old rows, which filter rooms need to see a row leave; it is set
back, with a gap. New partitions are made ready for capture (the truncate trigger in notify
mode, `REPLICA IDENTITY FULL` in logical mode).

The partitions are compared with this process's last look: what changed while no feed ran is
not seen.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import asyncpg

from connectors.postgres_capture import Partition, partitions
from feed.core.change import Gap

if TYPE_CHECKING:
    from connectors.postgres import PostgresConnector

log = logging.getLogger("feed.connectors.postgres")


class PartitionWatch:
    """One connector's last look at its tables' partitions, and what it has said."""

    def __init__(self, connector: PostgresConnector) -> None:
        self.c = connector
        self.last: dict[str, dict[int, Partition]] = {}  # target -> its partitions, by oid
        self.truncated_whole: set[str] = set()  # logical mode: truncates read since the look
        self.rewritten: dict[str, list[str]] = {}  # logical mode: partitions with new storage
        self.said: set[str] = set()  # lines logged: a warning that stands is said once

    def say(self, line: str) -> bool:
        """Log `line` the first time; say whether it was the first."""
        if line in self.said:
            return False
        self.said.add(line)
        log.log(logging.WARNING if "warning" in line else logging.INFO, "%s: %s", self.c.name, line)
        return True

    async def look(self, conn: Any, found: list[Partition] | None = None) -> AsyncIterator[Gap]:
        """Look once (at each capture check); `found` when the caller read them already."""
        c = self.c
        if found is None:
            found = await partitions(conn, c.tables, c._trigger_names(), c.heartbeat_timeout)
        tables: dict[str, list[Partition]] = {target: [] for target in c.tables}
        for part in found:
            tables[part.target].append(part)
        whole, self.truncated_whole = self.truncated_whole, set()
        for target, names in self.rewritten.items():  # seen last look; no truncate since
            if target not in whole:
                for name in names:
                    yield self._gap(
                        "partition_truncated",
                        target,
                        f"partition {name} of {target} was truncated or rewritten: its rows "
                        f"may have left {target} without delete events",
                    )
        self.rewritten = {}
        for target, found_here in tables.items():
            parts = {part.oid: part for part in found_here if part.level}
            last = self.last.get(target)
            self.last[target] = parts
            if any(key[0] == target for key in c._faults):
                continue  # missing or re-created: its own fault speaks for it
            # Compared before new partitions are made ready: a row written to one once it is
            # (what a client, or a test, can see) comes after its size was read.
            if last is not None:
                async for gap in self._compare(conn, target, last, parts, whole):
                    yield gap
            if c.mode == "logical":
                async for gap in self._identities(conn, target, found_here, last):
                    yield gap
            elif not all(part.covered for part in found_here):
                user = await conn.fetchval("SELECT current_user")
                for line in await c._cover(conn, target, user):
                    self.say(line)

    async def _identities(
        self, conn: Any, target: str, found: list[Partition], last: dict[int, Partition] | None
    ) -> AsyncIterator[Gap]:
        """Logical mode: REPLICA IDENTITY FULL on the table and each partition, with a gap
        where someone had changed it on one seen before."""
        for part in found:
            if part.full:
                continue
            alter = f"ALTER TABLE {part.regclass} REPLICA IDENTITY FULL"
            try:
                # A short wait for the lock: queries queue behind it; the next check tries again.
                await conn.execute(
                    f"SET lock_timeout = '1s'; {alter}; RESET lock_timeout",
                    timeout=self.c.query_timeout,
                )
                log.info("%s: %s: replica identity full", self.c.name, part.name)
            except asyncpg.LockNotAvailableError:
                self.say(f"{part.name} is busy: its replica identity is set at the next check")
                continue
            except asyncpg.InsufficientPrivilegeError:
                if not self.say(
                    f"warning: updates and deletes in {part.name} carry no whole before image "
                    f"(its replica identity is not full, and only its owner can set it): as its "
                    f"owner run {alter}"
                ):
                    continue  # said, and announced, once
            if last is not None and (not part.level or part.oid in last):
                yield self._gap(
                    "replica_identity",
                    target,
                    f"the replica identity of {part.name} was not full: updates and deletes "
                    "in between came without their old rows",
                )

    async def _compare(
        self,
        conn: Any,
        target: str,
        last: dict[int, Partition],
        parts: dict[int, Partition],
        whole: set[str],
    ) -> AsyncIterator[Gap]:
        """Gaps for partitions gone, and for new ones with rows in them.

        A partition created empty (ahead of time, as pg_partman does) is no gap: every row
        written to it since was captured. One attached with rows, or found with rows by the
        first look after it was created, is: the feed cannot tell rows it captured from rows
        that came with the attach. So is one found empty but truncated since it was made (its
        storage no longer named by its oid). In logical mode a partition with new storage is judged at
        the next look (`look`): pgoutput does not send a partition's truncate when it publishes
        through the table, but the truncate gives the partition new storage (as do VACUUM FULL
        and CLUSTER: a reload too many, never a change missed); a truncate of the whole table
        committed before this look may not have been read yet, and excuses it.
        """
        for oid, old in last.items():
            if oid not in parts:
                yield self._gap(
                    "partition_removed",
                    target,
                    f"partition {old.name} left {target} (detached or dropped): its rows left "
                    f"{target} without delete events",
                )
            elif (
                self.c.mode == "logical"
                and old.filenode != parts[oid].filenode
                and target not in whole
            ):
                self.rewritten.setdefault(target, []).append(old.name)
        for oid, part in parts.items():
            if oid in last:
                continue
            # Its size, not a read: the feed's role may have no SELECT on a new partition.
            if await conn.fetchval(
                "SELECT pg_relation_size($1::bigint::oid) > 0", oid, timeout=self.c.query_timeout
            ):
                yield self._gap(
                    "partition_added",
                    target,
                    f"partition {part.name} joined {target} with rows in it: rows that came "
                    "with it were not announced as inserts",
                )
            elif part.filenode not in (0, oid):
                # A table's storage is named by its oid when made, and anew by each TRUNCATE:
                # one truncated before this look (and before its truncate trigger, in notify
                # mode) may have taken rows that were announced.
                yield self._gap(
                    "partition_truncated",
                    target,
                    f"partition {part.name} of {target} was truncated or rewritten since it was "
                    f"created: rows written to it may have left {target} without delete events",
                )

    def _gap(self, kind: str, target: str, reason: str) -> Gap:
        self.c.count_fault(kind)
        return Gap(self.c.name, reason, target)
