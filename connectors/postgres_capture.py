"""The Postgres connector's watch over its own capture (notify mode), and the journal's size.

Why: the reader only sees what the triggers write. A trigger disabled for a bulk load, a table
dropped and re-created, `feed unwatch` run from another shell, all stop the journal filling while
the reader keeps polling happily: nothing fails, changes are just never captured. So the reader
looks, every `capture_check_interval`, at what capture rests on (both triggers present and enabled
on the very table it attached them to, its watch and position rows) and reports what it finds as
`CaptureFault`s; the connector turns them into a gap, a status and, where it can, a repair.

The same queries serve `feed check` and the journal metrics, so what the feed warns about while
running and what `feed check` prints are one judgement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from connectors.postgres_migrate import quote_ident


@dataclass(frozen=True)
class CaptureFault:
    """One way capture of a table stopped or may have stopped.

    `mend` says whether the connector can repair it itself (re-attach its triggers); when it
    cannot, `hint` is the command the operator runs.
    """

    target: str | None
    kind: str
    detail: str
    hint: str = ""
    mend: bool = False

    @property
    def line(self) -> str:
        return f"{self.detail}; {self.hint}" if self.hint else self.detail


@dataclass(frozen=True)
class JournalStats:
    """How much of the journal is waiting, for metrics, warnings and `feed check`."""

    rows: int
    bytes: int
    oldest_age: float  # seconds since the oldest row still in the journal was written
    undelivered_age: float  # seconds since the oldest change this consumer has not delivered
    stale_consumers: list[str]  # positions older than the journal's oldest row's age, not ours
    autovacuum: bool = True
    """Whether autovacuum looks after the journal (on for the server, its statistics collected,
    and not switched off for the table): where it does not, the feed vacuums it itself."""
    may_vacuum: bool = True
    """Whether this role may VACUUM the journal (its owner, the database's, or a superuser)."""


def trigger_names(schema: str) -> tuple[str, str]:
    return f"{schema}_capture", f"{schema}_capture_truncate"


async def capture_triggers(conn: Any, schema: str, target: str) -> list[tuple[str, str, str]]:
    """(relation as SQL, relation's name, trigger) for every capture trigger made for `target`,
    wherever that table now is.

    Found by the function and argument the triggers were made with, not by the table's name: a
    table renamed since it was attached keeps its triggers under its new name, and looking for
    them under the old one left them writing to the journal for good. Row triggers cloned onto
    partitions are left out: they go with their parent's.
    """
    rows = await conn.fetch(
        "SELECT format('%I.%I', cn.nspname, c.relname) AS reg, cn.nspname || '.' || c.relname"
        " AS name, t.tgname FROM pg_trigger t"
        " JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace cn ON cn.oid = c.relnamespace"
        " JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = $1 AND p.proname = 'capture' AND t.tgparentid = 0"
        " AND t.tgargs = convert_to($2, 'UTF8') || '\\x00'::bytea"
        " ORDER BY t.tgrelid, t.tgname",
        schema,
        target,
    )
    return [(r["reg"], r["name"], r["tgname"]) for r in rows]


def regclass_of(target: str) -> str:
    schema, _, name = target.partition(".")
    return f"{quote_ident(schema)}.{quote_ident(name)}"


async def inspect_notify(
    conn: Any,
    schema: str,
    consumer: str,
    tables: list[str],
    oids: dict[str, int],
    query_timeout: float,
) -> list[CaptureFault]:
    """What is wrong with capture for `tables` (empty when all is well), in one round trip.

    `oids` are the tables' oids when the connector attached to them: a different oid under the
    same name is a table dropped and re-created, whose first changes nobody captured.
    """
    q = quote_ident(schema)
    row_trigger, truncate_trigger = trigger_names(schema)
    journal = await conn.fetchval(
        "SELECT to_regclass($1) IS NOT NULL", f"{q}.journal", timeout=query_timeout
    )
    if not journal:
        return [
            CaptureFault(
                None,
                "journal_missing",
                f"the journal table {schema}.journal is gone",
                "run `feed migrate --config <file>`",
            )
        ]
    rows = await conn.fetch(
        f"""SELECT t.target, c.oid::bigint AS oid,
                   count(g.oid) AS present,
                   count(g.oid) FILTER (WHERE g.tgenabled IN ('O', 'A')) AS enabled,
                   EXISTS (SELECT 1 FROM {q}.watches w
                           WHERE w.consumer = $3 AND w.target = t.target) AS watched,
                   EXISTS (SELECT 1 FROM {q}.consumers k WHERE k.name = $3) AS positioned
            FROM unnest($1::text[], $2::text[]) AS t(target, reg)
            LEFT JOIN pg_class c ON c.oid = to_regclass(t.reg)
            LEFT JOIN pg_trigger g ON g.tgrelid = c.oid AND g.tgname = ANY($4::text[])
            GROUP BY t.target, c.oid""",
        tables,
        [regclass_of(t) for t in tables],
        consumer,
        [row_trigger, truncate_trigger],
        timeout=query_timeout,
    )
    faults: list[CaptureFault] = []
    by_target = {r["target"]: r for r in rows}
    if rows and not rows[0]["positioned"]:
        faults.append(
            CaptureFault(
                None,
                "position_lost",
                f"the saved position of {consumer!r} was deleted (`feed unwatch` while running?); "
                "journal rows it had not read may have been pruned",
                mend=True,
            )
        )
    for target in tables:
        row = by_target[target]
        if row["oid"] is None:
            faults.append(
                CaptureFault(
                    target,
                    "table_missing",
                    f"table {target} no longer exists",
                    "re-create it (the feed re-attaches by itself) or remove it from `tables`",
                )
            )
            continue
        known = oids.get(target)
        if known is not None and row["oid"] != known:
            faults.append(
                CaptureFault(
                    target,
                    "table_recreated",
                    f"table {target} was dropped and re-created: changes to the new table "
                    "before now were not captured",
                    mend=True,
                )
            )
            continue
        if row["present"] < 2:
            unwatched = "" if row["watched"] else " (`feed unwatch` while running?)"
            faults.append(
                CaptureFault(
                    target,
                    "trigger_missing",
                    f"the capture triggers on {target} were dropped{unwatched}: changes made "
                    "since were not captured",
                    mend=True,
                )
            )
            continue
        if row["enabled"] < 2:
            regclass = regclass_of(target)
            faults.append(
                CaptureFault(
                    target,
                    "trigger_disabled",
                    f"the capture triggers on {target} are disabled: its changes are not captured",
                    f"run ALTER TABLE {regclass} ENABLE ALWAYS TRIGGER "
                    f"{quote_ident(row_trigger)}, ENABLE ALWAYS TRIGGER "
                    f"{quote_ident(truncate_trigger)}",
                )
            )
            continue
        if not row["watched"]:
            faults.append(
                CaptureFault(
                    target,
                    "watch_missing",
                    f"{target} is no longer recorded as watched by {consumer!r} "
                    "(`feed unwatch` while running?)",
                    mend=True,
                )
            )
    return faults


async def journal_stats(
    conn: Any, schema: str, consumer: str, query_timeout: float, stale_after: float
) -> JournalStats:
    """The journal's size and age, and which other consumers have not read for `stale_after` s.

    Bytes are the table's and its indexes' size on disk (what an operator's disk alert sees);
    rows are counted by the primary key, which is cheap while the journal is pruned.
    """
    q = quote_ident(schema)
    row = await conn.fetchrow(
        f"""SELECT (SELECT count(*) FROM {q}.journal) AS rows,
                   pg_total_relation_size(to_regclass($2)) AS bytes,
                   extract(epoch FROM now() - (SELECT min(ts) FROM {q}.journal)) AS oldest,
                   extract(epoch FROM now() - (
                       SELECT min(j.ts) FROM {q}.journal j, {q}.consumers k
                       WHERE k.name = $1
                         AND j.xid >= pg_snapshot_xmin(k.snapshot::pg_snapshot)
                         AND NOT pg_visible_in_snapshot(j.xid, k.snapshot::pg_snapshot)
                   )) AS undelivered,
                   current_setting('autovacuum')::bool AND current_setting('track_counts')::bool
                     AND coalesce((SELECT option_value::bool FROM pg_class c,
                                     pg_options_to_table(c.reloptions)
                                   WHERE c.oid = to_regclass($2)
                                     AND option_name = 'autovacuum_enabled'), true)
                     AS autovacuum,
                   (SELECT pg_has_role(c.relowner, 'USAGE') FROM pg_class c
                    WHERE c.oid = to_regclass($2))
                     OR (SELECT pg_has_role(d.datdba, 'USAGE') FROM pg_database d
                         WHERE d.datname = current_database())
                     OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
                     AS may_vacuum""",
        consumer,
        f"{q}.journal",
        timeout=query_timeout,
    )
    stale = await conn.fetch(
        f"SELECT name FROM {q}.consumers WHERE name <> $1"
        " AND updated_at < now() - make_interval(secs => $2) ORDER BY name",
        consumer,
        stale_after,
        timeout=query_timeout,
    )
    return JournalStats(
        rows=int(row["rows"]),
        bytes=int(row["bytes"]),
        oldest_age=float(row["oldest"] or 0.0),
        undelivered_age=float(row["undelivered"] or 0.0),
        stale_consumers=[r["name"] for r in stale],
        autovacuum=bool(row["autovacuum"]),
        may_vacuum=bool(row["may_vacuum"]),
    )


@dataclass(frozen=True)
class Partition:
    """One partition (at any depth) of a watched partitioned table, as the capture watch saw it."""

    target: str
    oid: int
    name: str  # schema.name, unquoted, for messages
    regclass: str  # quoted, for SQL
    level: int  # 0: the watched table itself
    row_on: str | None  # notify mode: its row trigger's tgenabled (None: missing)
    truncate_on: str | None  # and its truncate trigger's
    full: bool  # replica identity full (logical mode: whole before images)
    filenode: int  # its storage: a new one after TRUNCATE (0 for a partitioned partition)
    virtual: str | None  # its virtual generated columns (Postgres 18+), comma separated

    @property
    def covered(self) -> bool:
        """Notify mode: its capture triggers are there (the row trigger only on the table
        itself: Postgres clones it to partitions), none firing in one replication role only
        ('O' origin, 'R' replica). A disabled one ('D') counts: the capture check reports it."""
        states = [self.truncate_on] if self.level else [self.row_on, self.truncate_on]
        return all(state not in (None, "O", "R") for state in states)


async def partitions(
    conn: Any, tables: list[str], triggers: tuple[str, str], query_timeout: float
) -> list[Partition]:
    """Every partition of the watched tables, and the tables themselves (level 0), in one
    round trip.

    Why watch them: dropping or detaching a partition (the usual way to expire old rows of a
    partitioned table) removes its rows from the table without a trigger firing, and attaching
    a table that has rows adds them the same way; a new partition also needs the truncate
    trigger, which Postgres does not clone (migrations/0002_partition_truncate.sql). And a
    capture trigger enabled again the plain way (`ENABLE TRIGGER`) fires in the origin
    replication role only, which the connector undoes (PostgresConnector._cover, which reads
    the triggers' states from here too).
    """
    rows = await conn.fetch(
        """SELECT t.target, p.level, p.relid::bigint AS oid,
                  n.nspname || '.' || c.relname AS name,
                  quote_ident(n.nspname) || '.' || quote_ident(c.relname) AS reg,
                  (SELECT g.tgenabled::text FROM pg_trigger g
                   WHERE g.tgrelid = p.relid AND g.tgname = $3) AS row_on,
                  (SELECT g.tgenabled::text FROM pg_trigger g
                   WHERE g.tgrelid = p.relid AND g.tgname = $4) AS truncate_on,
                  c.relreplident = 'f' AS full, c.relfilenode::bigint AS filenode,
                  (SELECT string_agg(a.attname, ', ' ORDER BY a.attnum) FROM pg_attribute a
                   WHERE a.attrelid = p.relid AND a.attgenerated = 'v'
                     AND NOT a.attisdropped) AS virtual
           FROM unnest($1::text[], $2::text[]) AS t(target, reg)
           CROSS JOIN LATERAL (
               SELECT 0 AS level, to_regclass(t.reg) AS relid
               UNION ALL  -- pg_partition_tree: nothing for a plain table
               SELECT level, relid FROM pg_partition_tree(to_regclass(t.reg)) WHERE level > 0
           ) p
           JOIN pg_class c ON c.oid = p.relid
           JOIN pg_namespace n ON n.oid = c.relnamespace
           ORDER BY t.target, p.level""",
        tables,
        [regclass_of(t) for t in tables],
        *triggers,
        timeout=query_timeout,
    )
    return [
        Partition(
            r["target"],
            int(r["oid"]),
            r["name"],
            r["reg"],
            r["level"],
            r["row_on"],
            r["truncate_on"],
            r["full"],
            r["filenode"],
            r["virtual"],
        )
        for r in rows
    ]
