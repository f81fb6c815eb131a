"""Pure pieces of the MongoDB connector: watch targets, the stream's $match, and event conversion.

Kept apart from the I/O so they can be read (and reasoned about) without a server: what the
connector watches, which events it lets through, and how one change event becomes a `Change`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bson.timestamp import Timestamp

from feed.core.change import Change
from feed.errors import ConfigError

# Characters MongoDB refuses in database names (https://www.mongodb.com/docs/manual/reference/limits/).
_BAD_DB = re.compile(r'[/\\. "$*<>:|?\x00]')
INTERNAL_DBS = frozenset({"admin", "config", "local"})
_TOKEN_TIME = re.compile(r"^82([0-9A-Fa-f]{8})([0-9A-Fa-f]{8})")


@dataclass(frozen=True)
class Watch:
    """One `watch` entry: a whole database (`coll` None) or one collection."""

    db: str
    coll: str | None = None

    @property
    def name(self) -> str:
        return self.db if self.coll is None else f"{self.db}.{self.coll}"

    @classmethod
    def parse(cls, text: str, key: str) -> Watch:
        db, dot, coll = text.partition(".")
        if not db or _BAD_DB.search(db) or (dot and (not coll or "$" in coll)):
            raise ConfigError(
                f'{text!r} is not a database or database.collection name (e.g. "shop.orders")',
                key=key,
            )
        if db in INTERNAL_DBS or coll.startswith("system."):
            # mongod refuses a change stream there (InvalidNamespace: "$changeStream may not be
            # opened on the internal ... database/collection"): said now, not as a connector
            # that starts and is refused for ever.
            where = f"the internal database {db!r}" if db in INTERNAL_DBS else "a system collection"
            raise ConfigError(
                f"{text!r} is {where}: MongoDB opens no change streams on admin, config, local "
                "or system.* collections; watch your application's databases or collections",
                key=key,
            )
        return cls(db, coll or None)


def stream_scope(watches: Sequence[Watch]) -> tuple[str | None, str | None]:
    """The narrowest stream that sees every watched namespace: (db, coll), (db, None) or cluster."""
    dbs = {w.db for w in watches}
    if len(watches) == 1:
        return watches[0].db, watches[0].coll
    if len(dbs) == 1:
        return next(iter(dbs)), None
    return None, None


def stream_match(
    watches: Sequence[Watch], scope: tuple[str | None, str | None], exclude: tuple[str, str] | None
) -> list[dict[str, Any]]:
    """The $match stage (if any) that keeps only watched namespaces (a rename's source or
    target) and never the token store.

    Invalidate events carry no namespace, so they are always let through: the connector must see
    them to know the stream ended.
    """
    db, coll = scope
    if coll is not None:
        return []
    clauses: list[dict[str, Any]] = []
    if db is None or all(w.coll is not None for w in watches):
        # A rename's `ns` is its source: one whose target (`to`) is watched must pass too, or
        # the documents it brings in would appear with no change and no gap.
        wanted: list[dict[str, Any]] = [
            {f"{field}.db": w.db}
            if w.coll is None
            else {f"{field}.db": w.db, f"{field}.coll": w.coll}
            for field in ("ns", "to")
            for w in watches
        ]
        clauses.append({"$or": [*wanted, {"operationType": "invalidate"}]})
    if exclude is not None and (db is None or db == exclude[0]):
        clauses.append({"$nor": [{"ns.db": exclude[0], "ns.coll": exclude[1]}]})
    if not clauses:
        return []
    return [{"$match": clauses[0] if len(clauses) == 1 else {"$and": clauses}}]


def watched(watches: Sequence[Watch], namespace: Any) -> str | None:
    """`db.coll` when an event's namespace (`ns`, or a rename's `to`) is watched, else None."""
    if not isinstance(namespace, Mapping) or not namespace.get("coll"):
        return None
    db, coll = str(namespace.get("db")), str(namespace["coll"])
    if any(w.db == db and w.coll in (None, coll) for w in watches):
        return f"{db}.{coll}"
    return None


def token_time(token: Mapping[str, Any] | None) -> Timestamp | None:
    """The cluster time at the front of a resume token's `_data` (v1 tokens, MongoDB 4.2+).

    The format is not a public API, but its first 18 hex digits (type byte 0x82 and the
    big-endian timestamp) are what the server itself reads first (SERVER-133517). Anything else
    returns None and the connector falls back to event cluster times.
    """
    data = token.get("_data") if token else None
    found = _TOKEN_TIME.match(data) if isinstance(data, str) else None
    if not found:
        return None
    return Timestamp(int(found.group(1), 16), int(found.group(2), 16))


def just_before(ts: Timestamp) -> Timestamp:
    """The latest cluster time strictly before `ts`."""
    if ts.inc > 0:
        return Timestamp(ts.time, ts.inc - 1)
    return Timestamp(ts.time - 1, 0xFFFFFFFF)


Position = tuple[Any, ...]
"""Where a change sits in the oplog: its cluster time as seconds and increment (-1, -1 when the
event has none), for snapshots, then its resume token's keys and values in turn (`_data` and
its text, as a rule): `position_of`, `cluster_time_of`, `token_of`.

One flat tuple, as Postgres's positions are (connectors/postgres.py says why): a replay buffer
keeps each change's position, and the garbage collector never lets go of a tuple that holds a
`Timestamp`, a class instance or a dict (even a dict of strings), and lets go of a tuple inside
a tuple only a pass later, by which time it may have reached the old generation: each buffered
change would stay tracked and bring the full passes nearer (docs/benchmarks.md, "Replay buffers
and the garbage collector")."""


def position_of(cluster_time: Timestamp | None, token: Mapping[str, Any]) -> Position:
    time, inc = (-1, -1) if cluster_time is None else (cluster_time.time, cluster_time.inc)
    return (time, inc, *[part for item in token.items() for part in item])


def cluster_time_of(position: Any) -> Timestamp | None:
    """The cluster time in a MongoDB change's position (`position_of`; None when the event had
    none, or the change has no position)."""
    if type(position) is tuple and len(position) % 2 == 0 and position[0] >= 0:
        return Timestamp(position[0], position[1])
    return None


def token_of(position: Any) -> Mapping[str, Any] | None:
    """The resume token in a MongoDB change's position (`position_of`; None when the change
    has no position)."""
    if type(position) is tuple and len(position) % 2 == 0:
        return dict(zip(position[2::2], position[3::2], strict=True))
    return None


def change_id(connector: str, token: Mapping[str, Any], cluster_time: Timestamp | None) -> str:
    """Stable per event: the same event read again (after a resume or restart) gets the same id.

    The resume token is unique per event, but long; its digest keeps ids short, and the cluster
    time in front keeps them readable and sortable by commit time.
    """
    data = str(token.get("_data", token))
    digest = hashlib.blake2b(data.encode(), digest_size=8).hexdigest()
    when = f"{cluster_time.time}.{cluster_time.inc}" if cluster_time else "0.0"
    return f"{connector}:{when}:{digest}"


def to_change(connector: str, event: Mapping[str, Any], fallback_target: str) -> Change:
    """One change stream event as a `Change` (see docs/connectors/mongodb.md for the mapping)."""
    op = str(event["operationType"])
    ns = event.get("ns") or {}
    if ns.get("coll"):
        target = f"{ns['db']}.{ns['coll']}"
    elif ns.get("db"):
        target = str(ns["db"])
    else:
        target = fallback_target
    key = (event.get("documentKey") or {}).get("_id")
    cluster_time = event.get("clusterTime")
    ts = event.get("wallTime")
    if ts is None and isinstance(cluster_time, Timestamp):
        ts = cluster_time.as_datetime()
    if isinstance(ts, dt.datetime) and ts.tzinfo is None:
        ts = ts.replace(tzinfo=dt.UTC)
    meta: dict[str, Any] = {}
    if "updateDescription" in event and event["updateDescription"] is not None:
        meta["updateDescription"] = event["updateDescription"]
    if op == "rename" and event.get("to"):
        to = event["to"]
        meta["to"] = f"{to.get('db')}.{to.get('coll')}"
    for extra in ("txnNumber", "lsid"):
        if extra in event:
            meta[extra] = event[extra]
    token = event["_id"]
    return Change(
        id=change_id(connector, token, cluster_time),
        connector=connector,
        source="mongodb",
        target=target,
        op=op,
        key=key,
        before=event.get("fullDocumentBeforeChange"),
        after=event.get("fullDocument"),
        ts=ts,
        meta=meta or None,
        position=position_of(cluster_time if isinstance(cluster_time, Timestamp) else None, token),
    )
