"""The tables a Postgres connector watches, as the database sees them: the feed's schema, the
capture triggers or the publication per table, the reader's privileges, and the commands that
set them up, take them down and check them (`feed migrate`, `feed unwatch`, `feed check`).

Apart from `connectors.postgres`, which reads the changes, because this half runs once per start
or per command and the other per change: a mixin of `PostgresConnector`, whose configuration
and connection plumbing it uses (declared below for the type checker).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

import asyncpg

from connectors.postgres_capture import (
    CaptureFault,
    capture_triggers,
    inspect_notify,
    journal_stats,
    partitions,
    regclass_of,
    trigger_names,
)
from connectors.postgres_errors import is_transient, one_line
from connectors.postgres_migrate import (
    LOCK_CLASS,
    apply_migrations,
    load_migrations,
    newer,
    pending,
    quote_ident,
    quote_literal,
    setup_lock,
)
from feed.errors import SourceMisconfigured

log = logging.getLogger("feed.connectors.postgres")

READER_LOCK_CLASS = LOCK_CLASS + 1
"""Second key class of advisory locks: one reader per connector name (`pg_try_advisory_lock`
on it and the name's hash)."""
LOCK_PATIENCE = 20
"""Tries, 0.1 s apart, for the reader lock before `feed migrate --prune` or `unwatch` refuses."""

if TYPE_CHECKING:
    from connectors.postgres import PostgresConnector
    from connectors.postgres_types import TableShape
    from feed.errors import ConnectorError


class TableSetup:
    """Setting up, taking down and checking what the connector installs per table."""

    name: str
    tables: list[str]
    targets_by_table: dict[str, tuple[str, str]]
    mode: str
    schema: str
    q: str
    slot: str
    auto_migrate: bool
    query_timeout: float
    journal_warn_age: float
    journal_warn_rows: int
    _shapes: dict[str, TableShape]
    _oids: dict[str, int]
    _start_faults: list[CaptureFault]

    if TYPE_CHECKING:  # PostgresConnector's plumbing

        @property
        def where(self) -> str: ...
        def regclass(self, target: str) -> str: ...
        async def _admin(self) -> Any: ...
        def _setup_error(self, exc: BaseException) -> ConnectorError: ...
        async def _read_shape(self, conn: Any, target: str, regclass: str) -> TableShape: ...

    def _connector(self) -> PostgresConnector:
        """This mixin is only ever part of a PostgresConnector (for the parts that take one)."""
        return cast("PostgresConnector", self)

    async def _check_feed_privileges(self, conn: Any, *, installed: bool) -> None:
        """The reader's role needs these on the feed's own objects; name the first one missing."""
        user = await conn.fetchval("SELECT current_user")
        if not await conn.fetchval("SELECT has_schema_privilege($1, 'USAGE')", self.schema):
            raise SourceMisconfigured(
                f"{self.where}: permission denied: GRANT USAGE ON SCHEMA {self.schema} TO {user} "
                "(or run the feed as the role that ran `feed migrate`)"
            )
        needs = []
        if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{self.q}.migrations"):
            needs.append(("table", f"{self.q}.migrations", "SELECT"))
        if installed:
            needs += [
                ("table", f"{self.q}.journal", "SELECT"),
                ("table", f"{self.q}.journal", "DELETE"),
                ("table", f"{self.q}.consumers", "SELECT"),
                ("table", f"{self.q}.consumers", "INSERT"),
                ("table", f"{self.q}.consumers", "UPDATE"),
                ("table", f"{self.q}.watches", "SELECT"),
                ("table", f"{self.q}.watches", "INSERT"),
            ]
        for kind, name, privilege in needs:
            if not await conn.fetchval(f"SELECT has_{kind}_privilege($1, $2)", name, privilege):
                shown = f"SCHEMA {self.schema}" if kind == "schema" else name.replace('"', "")
                raise SourceMisconfigured(
                    f"{self.where}: permission denied: GRANT {privilege} ON {shown} TO {user} "
                    "(or run the feed as the role that ran `feed migrate`)"
                )

    async def _ensure_schema(self, conn: Any) -> None:
        exists = await conn.fetchval(
            "SELECT count(*) FROM pg_namespace WHERE nspname = $1", self.schema
        )
        if exists:
            await self._check_feed_privileges(conn, installed=False)
        missing = await pending(conn, self.schema)
        if not missing:
            await self._check_feed_privileges(conn, installed=True)
            return
        if self.auto_migrate:
            await apply_migrations(conn, self.schema)
            return
        if not missing:
            return
        raise SourceMisconfigured(
            f"{self.where}: the feed's schema {self.schema!r} needs migrations "
            f"({', '.join(missing)}): run `feed migrate --config <file>` or set auto_migrate = true"
        )

    async def _check_tables(self, conn: Any, *, attach: bool) -> list[str]:
        """Check every configured table exists and can be read (and captured, when attaching).

        Attaching holds the schema's setup lock: every node of a deployment may do it at once."""
        if attach and self.mode == "notify":
            async with setup_lock(conn, self.schema):
                return await self._check_each_table(conn, attach=True)
        return await self._check_each_table(conn, attach=attach)

    async def _refuse_non_table(self, conn: Any, target: str, oid: int) -> None:
        """A view, materialized view or foreign table in `tables`: one line saying what to watch.

        Neither mode can capture them (no row triggers, no publication), and what Postgres said
        (`"orders" is a view`, `relation "orders" cannot have triggers`) came from `feed
        migrate` only, while `feed check` and the start sent the user back to `feed migrate`.
        """
        kind = await conn.fetchval("SELECT relkind::text FROM pg_class WHERE oid = $1", oid)
        what = {"v": "a view", "m": "a materialized view", "f": "a foreign table"}.get(kind)
        if what is None:
            return
        reads = await conn.fetch(
            "SELECT DISTINCT n.nspname || '.' || c.relname AS name FROM pg_rewrite r"
            " JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid"
            " AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> r.ev_class"
            " JOIN pg_class c ON c.oid = d.refobjid AND c.relkind IN ('r', 'p')"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE r.ev_class = $1 ORDER BY 1",
            oid,
        )
        tables = ", ".join(r["name"] for r in reads)
        hint = (
            "its rows live on another server: watch the table there"
            if kind == "f"
            else f"watch the tables it reads{' (' + tables + ')' if tables else ''} instead"
        )
        raise SourceMisconfigured(
            f"{self.where}: {target} is {what}, not a table: changes to it cannot be captured; "
            f"{hint} (`tables`)"
        )

    async def _check_each_table(self, conn: Any, *, attach: bool) -> list[str]:
        lines: list[str] = []
        user = await conn.fetchval("SELECT current_user")
        for target in self.tables:
            regclass = self.regclass(target)
            oid = await conn.fetchval("SELECT to_regclass($1)::oid", regclass)
            if oid is None:
                raise SourceMisconfigured(f"{self.where}: table {target} does not exist")
            await self._refuse_non_table(conn, target, oid)
            if not await conn.fetchval("SELECT has_table_privilege($1, 'SELECT')", regclass):
                raise SourceMisconfigured(
                    f"{self.where}: permission denied: GRANT SELECT ON {target} TO {user}"
                )
            if await conn.fetchval("SELECT row_security_active($1::regclass)", regclass):
                lines.append(
                    f"warning: row level security applies to {user} on {target}: a snapshot "
                    "holds only the rows its policies let it read, while changes carry every "
                    f"row; ALTER ROLE {user} BYPASSRLS, or run the feed as the table's owner "
                    "(without FORCE ROW LEVEL SECURITY)"
                )
            children = await conn.fetchval(
                "SELECT string_agg(i.inhrelid::regclass::text, ', ' ORDER BY i.inhrelid)"
                " FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent"
                " WHERE i.inhparent = $1::regclass AND p.relkind = 'r'",
                regclass,
            )
            if children:  # legacy inheritance, not partitions: a child's rows read as the parent's
                lines.append(
                    f"warning: {target} has inheritance children ({children}): a snapshot "
                    "holds their rows, but writes to them are not captured as changes of "
                    f"{target}; watch them as tables of their own"
                )
            self._shapes[target] = await self._read_shape(conn, target, regclass)
            if attach and self.mode == "notify":
                done = await self._attach(conn, target, regclass, user)
                lines += await self._cover(conn, target, user)
                self._oids[target] = int(oid)
                if done == "attached":
                    lines.append(f"watching {target}")
                elif done == "reattached":
                    fault = CaptureFault(
                        target,
                        "trigger_missing",
                        f"the capture triggers on {target} were missing (dropped, or the table "
                        "re-created, while no feed read it): changes made meanwhile were not "
                        "captured",
                    )
                    self._start_faults.append(fault)
                    lines.append(f"re-attached {target}: {fault.detail}")
        return lines

    def _trigger_names(self) -> tuple[str, str]:
        return trigger_names(self.schema)

    async def _attach(self, conn: Any, target: str, regclass: str, user: str) -> str:
        """Make sure both capture triggers are on `target`; say whether they were already
        ("present"), new ("attached") or had been there before and vanished ("reattached")."""
        row_trigger, truncate_trigger = self._trigger_names()
        have = await conn.fetchval(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::regclass AND tgname = ANY($2)",
            regclass,
            [row_trigger, truncate_trigger],
        )
        if have == 2:
            await self._mark_watched(conn, target)
            return "present"
        # Refused before anything is written: a watch row left by a refused attach made the
        # table look attached once and dropped since (a false gap, a false "re-attached").
        if not await conn.fetchval("SELECT has_table_privilege($1, 'TRIGGER')", regclass):
            raise SourceMisconfigured(
                f"{self.where}: permission denied to attach capture to {target}: "
                f"GRANT TRIGGER ON {target} TO {user}, or run `feed migrate` as its owner"
            )
        arg = "'" + target.replace("'", "''") + "'"
        async with conn.transaction():
            new_watch = await self._mark_watched(conn, target)
            await conn.execute("SET LOCAL lock_timeout = '5s'")
            await conn.execute(
                f"DROP TRIGGER IF EXISTS {quote_ident(row_trigger)} ON {regclass};"
                f"DROP TRIGGER IF EXISTS {quote_ident(truncate_trigger)} ON {regclass};"
                f"CREATE TRIGGER {quote_ident(row_trigger)} AFTER INSERT OR UPDATE OR DELETE"
                f" ON {regclass} FOR EACH ROW EXECUTE FUNCTION {self.q}.capture({arg});"
                f"CREATE TRIGGER {quote_ident(truncate_trigger)} AFTER TRUNCATE"
                f" ON {regclass} FOR EACH STATEMENT EXECUTE FUNCTION {self.q}.capture({arg})"
            )
            await self._drop_strays(conn, target, regclass)
        return "attached" if new_watch else "reattached"

    async def _drop_strays(self, conn: Any, target: str, regclass: str) -> None:
        """Drop the capture triggers for `target` left on a table that no longer has its name.

        A table swap (`orders` renamed to `orders_old`, `orders_new` to `orders`) left the old
        table's triggers on it, still journaling its writes as `target`'s: once the new one was
        attached, both tables' rows arrived as the one table's changes, for good. The target's
        own partitions keep theirs (each carries the truncate trigger, with the target's name).
        """
        tree = {
            r["reg"]
            for r in await conn.fetch(
                "SELECT format('%I.%I', n.nspname, c.relname) AS reg FROM pg_class c"
                " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1::regclass"
                " OR c.oid IN (SELECT relid FROM pg_partition_tree($1::regclass))",
                regclass,
            )
        }
        for relation, name, trigger in await capture_triggers(conn, self.schema, target):
            if relation not in tree:
                await conn.execute(f"DROP TRIGGER IF EXISTS {quote_ident(trigger)} ON {relation}")
                log.warning(
                    "%s: dropped capture trigger %s from %s: it captured %s, which is another "
                    "table now (renamed away and replaced)",
                    self.name,
                    trigger,
                    name,
                    target,
                )

    async def _mark_watched(self, conn: Any, target: str) -> bool:
        """Record that this connector watches `target`; say whether that is new. The consumer's
        starting point is taken before the triggers commit, so no change they capture for it
        falls before it."""
        await conn.execute(
            f"INSERT INTO {self.q}.consumers (name, snapshot)"
            " VALUES ($1, pg_current_snapshot()::text) ON CONFLICT (name) DO NOTHING",
            self.name,
        )
        new: bool = await conn.fetchval(
            f"INSERT INTO {self.q}.watches (consumer, target) VALUES ($1, $2)"
            " ON CONFLICT DO NOTHING RETURNING true",
            self.name,
            target,
        )
        return bool(new)

    async def _cover(self, conn: Any, target: str, user: str) -> list[str]:
        """Make the capture triggers fire in every replication role and on every partition;
        return a line for each thing done or that could not be done.

        Why ALWAYS: a trigger enabled the plain way fires only in the "origin" replication role,
        so rows written under `session_replication_role = replica` (a logical replication
        subscriber applying its publisher's changes, bulk loads that skip foreign keys) would not
        be captured, silently. Why partitions: a statement trigger is not cloned to partitions, so
        a TRUNCATE of one partition would empty part of the table unseen; each partition gets the
        truncate trigger too (the capture function turns it into a gap for the table). Row
        triggers are cloned by Postgres itself, with the parent's enabled state.
        """
        row_trigger, truncate_trigger = self._trigger_names()
        tree = await partitions(conn, [target], (row_trigger, truncate_trigger), self.query_timeout)
        arg = quote_literal(target)
        lines: list[str] = []
        for part in tree:
            reg, level = part.regclass, part.level
            what = f"partition {part.name} of {target}" if level else target
            truncate_on = part.truncate_on
            # A short wait for the lock: writers queue behind it, and the next check tries again.
            # One string, one implicit transaction: the SET goes with a statement that fails.
            if level and truncate_on is None:
                try:
                    await conn.execute(
                        f"SET lock_timeout = '1s'; CREATE TRIGGER {quote_ident(truncate_trigger)}"
                        f" AFTER TRUNCATE ON {reg} FOR EACH STATEMENT"
                        f" EXECUTE FUNCTION {self.q}.capture({arg}); RESET lock_timeout"
                    )
                except asyncpg.InsufficientPrivilegeError:
                    lines.append(
                        f"warning: a TRUNCATE of {what} would not be captured: "
                        f"GRANT TRIGGER ON {reg} TO {user}, or run `feed migrate` as its owner"
                    )
                    continue
                except asyncpg.LockNotAvailableError:
                    lines.append(f"{what} is busy: its truncate trigger comes at the next check")
                    continue
                except asyncpg.PostgresError as exc:  # a foreign table cannot have one
                    if is_transient(exc):
                        raise
                    lines.append(
                        f"warning: a TRUNCATE of {what} would not be captured: {one_line(exc)}"
                    )
                    continue
                truncate_on = "O"
                lines.append(f"capturing truncates of {what}")
            states = {truncate_trigger: truncate_on}
            if not level:
                states[row_trigger] = part.row_on
            # Enabled in one role only ('O' origin, 'R' replica): made ALWAYS. Disabled ('D') is
            # left alone: the capture watch reports it, with a gap (connectors.postgres_capture).
            turn = [trigger for trigger, state in states.items() if state in ("O", "R")]
            if not turn:
                continue
            enable = ", ".join(f"ENABLE ALWAYS TRIGGER {quote_ident(t)}" for t in turn)
            try:
                await conn.execute(
                    f"SET lock_timeout = '1s'; ALTER TABLE {reg} {enable}; RESET lock_timeout"
                )
            except asyncpg.InsufficientPrivilegeError:
                lines.append(
                    f"warning: writes to {what} under session_replication_role = replica are "
                    f"not captured (its capture triggers fire in the origin role only; setting "
                    f"them to fire always needs the owner): run `feed migrate` as its owner, or "
                    f"ALTER TABLE {reg} {enable}"
                )
            except asyncpg.LockNotAvailableError:
                lines.append(
                    f"{what} is busy: its triggers are set to fire always at the next check"
                )
            except asyncpg.PostgresError as exc:
                if is_transient(exc):
                    raise
                lines.append(
                    f"warning: could not set the triggers of {what} to fire always: {one_line(exc)}"
                )
        return lines

    async def _detach(self, conn: Any, target: str) -> list[str]:
        await conn.execute(
            f"DELETE FROM {self.q}.watches WHERE consumer = $1 AND target = $2", self.name, target
        )
        others = await conn.fetchval(
            f"SELECT count(*) FROM {self.q}.watches WHERE target = $1", target
        )
        if others:
            return [f"stopped watching {target} (still watched by another connector)"]
        found = await capture_triggers(conn, self.schema, target)
        if not found:
            if await conn.fetchval("SELECT to_regclass($1)", regclass_of(target)) is None:
                return [f"stopped watching {target} (table no longer exists)"]
            return [f"unwatched {target} (it had no capture triggers left)"]
        async with conn.transaction():
            await conn.execute("SET LOCAL lock_timeout = '5s'")
            for relation, _, trigger in found:  # a row trigger's clones on partitions go with it
                await conn.execute(f"DROP TRIGGER IF EXISTS {quote_ident(trigger)} ON {relation}")
        row_trigger = self._trigger_names()[0]
        now = next((name for _, name, trigger in found if trigger == row_trigger), target)
        if now == target:
            return [f"unwatched {target} (capture triggers dropped)"]
        # Renamed, or moved to another schema, since it was attached.
        return [f"unwatched {target} (now {now}: capture triggers dropped)"]

    @contextlib.asynccontextmanager
    async def _reader_lock(self, conn: Any, force: bool, action: str) -> AsyncIterator[None]:
        """Hold this connector's reader lock while detaching, so no feed reads meanwhile; refuse
        (naming the reader) when a running feed holds it, unless `force`."""
        key = f"{self.schema}/{self.name}"
        got = False
        for attempt in range(LOCK_PATIENCE):  # a feed stopped a moment ago is still letting go
            got = await conn.fetchval(
                "SELECT pg_try_advisory_lock($1, hashtext($2))", READER_LOCK_CLASS, key
            )
            if got or force or attempt == LOCK_PATIENCE - 1:
                break
            await asyncio.sleep(0.1)
        if not got and not force:
            holder = await conn.fetchrow(
                """SELECT a.pid, a.application_name, coalesce(host(a.client_addr), 'local') AS addr
                   FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                   WHERE l.locktype = 'advisory' AND l.classid::bigint = $1
                     AND l.objid::bigint = (hashtext($2)::bigint & 4294967295)
                     AND l.objsubid = 2 AND l.granted AND l.database = (
                         SELECT oid FROM pg_database WHERE datname = current_database())""",
                READER_LOCK_CLASS,
                key,
            )
            who = (
                f" (pid {holder['pid']}, {holder['application_name']} from {holder['addr']})"
                if holder
                else ""
            )
            raise SourceMisconfigured(
                f"{self.where}: refusing to {action}: a running feed reads connector "
                f"{self.name!r}{who} and would silently lose changes; stop it first, "
                "or add --force"
            )
        try:
            yield
        finally:
            if got:
                await conn.execute(
                    "SELECT pg_advisory_unlock($1, hashtext($2))", READER_LOCK_CLASS, key
                )

    async def migrate(self, *, prune: bool = False, force: bool = False) -> list[str]:
        """`feed migrate`: apply the SQL files, attach configured tables; with `prune`, detach
        watched tables the config no longer names.

        Never silently: a config that names other tables may be a different feed sharing the
        connector name (a new user did this, twice, and detached a running feed's table), so
        without `prune` such tables are only listed, and with it the detach is refused while a
        running feed holds this connector's reader lock, unless `force`.
        """
        conn = await self._admin()
        try:
            if self.mode == "logical":
                from connectors.postgres_logical import LogicalReader

                await self._check_tables(conn, attach=False)
                return await LogicalReader(self._connector()).migrate(conn) or [
                    "logical mode is set up"
                ]
            lines = await apply_migrations(conn, self.schema)
            lines += await self._check_tables(conn, attach=True)
            watched = await conn.fetch(
                f"SELECT target FROM {self.q}.watches WHERE consumer = $1 ORDER BY target",
                self.name,
            )
            extra = [r["target"] for r in watched if r["target"] not in self.targets_by_table]
            if extra and not prune:
                lines += [
                    f"{target} is still watched but not in this config's tables: kept; "
                    f"`feed migrate --prune` (or `feed unwatch --table {target}`) stops it"
                    for target in extra
                ]
            elif extra:
                async with self._reader_lock(conn, force, "detach " + ", ".join(extra)):
                    for target in extra:
                        lines += await self._detach(conn, target)
            return lines
        except asyncpg.PostgresError as exc:
            raise self._setup_error(exc) from None
        finally:
            await conn.close()

    async def unwatch(self, tables: list[str] | None = None, *, force: bool = False) -> list[str]:
        """`feed unwatch`: stop capturing `tables` for this connector (all of them by default).

        A table's triggers are dropped once no connector watches it. With no tables given the
        connector's saved position is forgotten too, so that it no longer holds back journal
        pruning. In logical mode tables leave the publication, and with no tables given the
        replication slot and publication are dropped, so the slot no longer holds WAL.
        """
        conn = await self._admin()
        try:
            if self.mode == "logical":
                return await self._unwatch_logical(conn, tables)
            if await pending(conn, self.schema) == [m.name for m in load_migrations()]:
                return [f"schema {self.schema!r} is not installed: nothing to unwatch"]
            watched = [
                r["target"]
                for r in await conn.fetch(
                    f"SELECT target FROM {self.q}.watches WHERE consumer = $1 ORDER BY target",
                    self.name,
                )
            ]
            chosen = watched if tables is None else list(tables)
            lines: list[str] = []
            async with self._reader_lock(conn, force, "unwatch"):
                for target in chosen:
                    if target not in watched:
                        lines.append(f"{target} is not watched by {self.name!r}")
                        continue
                    lines += await self._detach(conn, target)
                if tables is None:
                    done = await conn.execute(
                        f"DELETE FROM {self.q}.consumers WHERE name = $1", self.name
                    )
                    if done != "DELETE 0":  # say so only when there was one to forget
                        lines.append(f"forgot the position of {self.name!r}")
            return lines or ["nothing to unwatch"]
        except asyncpg.PostgresError as exc:
            raise self._setup_error(exc) from None
        finally:
            await conn.close()

    async def _unwatch_logical(self, conn: Any, tables: list[str] | None) -> list[str]:
        from connectors.postgres_logical import drop_slot

        if tables is None:
            if await drop_slot(conn, self.slot):
                return [f"dropped replication slot and publication {self.slot!r}"]
            return [f"no replication slot {self.slot!r}: nothing to unwatch"]
        lines = []
        for target in tables:
            if target in self.targets_by_table:
                await conn.execute(
                    f"ALTER PUBLICATION {quote_ident(self.slot)} DROP TABLE {self.regclass(target)}"
                )
                lines.append(f"unwatched {target} (removed from publication {self.slot!r})")
            else:
                lines.append(f"{target} is not configured for {self.name!r}")
        return lines

    async def check(self) -> str:
        """Reach the server and check the schema, tables and capture without changing anything.

        Raises (so `feed check` fails) where capture cannot work: triggers missing or disabled,
        a journal gone, in logical mode a slot lost or another database's.
        """
        conn = await self._admin()
        try:
            version = await conn.fetchval("SHOW server_version")
            missing = await pending(conn, self.schema) if self.mode == "notify" else []
            if missing and not self.auto_migrate:
                # `feed serve` would keep this connector down: a failure now, not an "ok".
                raise SourceMisconfigured(
                    f"{len(missing)} migration(s) pending ({', '.join(missing)}): "
                    "run `feed migrate --config <file>` (or set auto_migrate = true)"
                )
            warnings = "".join(f"; {line}" for line in await self._check_tables(conn, attach=False))
            if self.mode == "logical":
                backlog = await self._check_logical(conn)
            elif not missing:
                backlog = await self._check_capture(conn)
            else:
                backlog = f", {len(missing)} migration(s) pending, applied at start (auto_migrate)"
            if self.mode == "notify":
                warnings += "".join(f"; {line}" for line in await newer(conn, self.schema))
            tables = f"{len(self.tables)} table(s)"
            return f"Postgres {version}, {self.mode} mode, {tables}{backlog}{warnings}"
        except asyncpg.PostgresError as exc:
            raise self._setup_error(exc) from None
        finally:
            await conn.close()

    async def _check_capture(self, conn: Any) -> str:
        """`feed check` in notify mode: the capture watch's judgement, and the journal's size."""
        faults = await inspect_notify(
            conn, self.schema, self.name, self.tables, {}, self.query_timeout
        )
        watched = {
            r["target"]
            for r in await conn.fetch(
                f"SELECT target FROM {self.q}.watches WHERE consumer = $1", self.name
            )
        }
        if not watched and all(f.mend for f in faults):
            if self.auto_migrate:
                return ", not attached to its tables yet: attached at start (auto_migrate)"
            raise SourceMisconfigured(
                f"{self.where}: {self.name!r} is not attached to its tables yet: "
                "run `feed migrate --config <file>` (or set auto_migrate = true)"
            )
        # A table added to `tables` since the last migrate has neither triggers nor a watch:
        # new, not "dropped", which is what the capture watch would call it.
        new = [
            f.target
            for f in faults
            if f.kind == "trigger_missing" and f.target is not None and f.target not in watched
        ]
        faults = [f for f in faults if f.target not in new]
        note = ""
        if new and self.auto_migrate:
            note = f", {', '.join(new)} not attached yet: attached at start (auto_migrate)"
        elif new:
            faults.append(
                CaptureFault(
                    None,
                    "not_attached",
                    f"{', '.join(new)} not attached yet (added to `tables` since the last "
                    "`feed migrate`)",
                    "run `feed migrate --config <file>` (or set auto_migrate = true)",
                )
            )
        if faults:
            lines = [f.line if f.hint else f"{f.detail}; run `feed migrate`" for f in faults]
            raise SourceMisconfigured(f"{self.where}: capture cannot work: " + " | ".join(lines))
        stats = await journal_stats(
            conn, self.schema, self.name, self.query_timeout, self.journal_warn_age
        )
        text = (
            f", journal {stats.rows} rows ({stats.bytes // 1024} KiB), oldest undelivered "
            f"{stats.undelivered_age:.0f}s"
        )
        if stats.rows > self.journal_warn_rows or stats.undelivered_age > self.journal_warn_age:
            text += " (past the warning ceiling)"
        if stats.stale_consumers:
            names = ", ".join(stats.stale_consumers)
            text += f"; positions not moved for {self.journal_warn_age:g}s hold pruning: {names}"
        return text + note

    async def _check_logical(self, conn: Any) -> str:
        """`feed check` in logical mode: wal_level, the slot (present, ours, valid) and its WAL."""
        from connectors.postgres_logical import INVALIDATED, LogicalReader, invalidation

        level = await conn.fetchval("SHOW wal_level")
        if level != "logical":
            raise SourceMisconfigured(
                f"{self.where}: mode = 'logical' needs wal_level = logical (it is {level})"
            )
        reader = LogicalReader(self._connector())
        slot = await conn.fetchrow(
            f"SELECT plugin, database, wal_status, {INVALIDATED} AS invalidated"
            " FROM pg_replication_slots s WHERE slot_name = $1",
            self.slot,
        )
        if slot is None:
            if await reader._marked(conn):
                raise SourceMisconfigured(
                    f"{self.where}: replication slot {self.slot!r} is gone (dropped, or lost): "
                    "changes since are lost; the feed recreates it at start, with a gap"
                )
            return (
                f", no replication slot {self.slot!r} yet: `feed migrate` or the first start "
                "creates it"
            )
        if slot["plugin"] != "pgoutput" or slot["database"] != await conn.fetchval(
            "SELECT current_database()"
        ):
            raise SourceMisconfigured(
                f"{self.where}: replication slot {self.slot!r} is not this feed's "
                f"({slot['plugin']} in database {slot['database']!r}): choose another `slot`"
            )
        if slot["wal_status"] == "lost" or slot["invalidated"]:
            why = invalidation(slot["wal_status"], slot["invalidated"])
            raise SourceMisconfigured(
                f"{self.where}: replication slot {self.slot!r} was invalidated ({why}): "
                "changes since are lost; the feed recreates the slot at start, with a gap"
            )
        info = await reader.inspect(conn)
        assert info is not None
        retained = int(info["retained"] or 0)
        text = f", slot {self.slot!r} {slot['wal_status']}, retains {retained // 1024} KiB of WAL"
        if info["tables"] < len(self.tables):
            text += f"; publication covers {info['tables']} of {len(self.tables)} tables"
        return text
