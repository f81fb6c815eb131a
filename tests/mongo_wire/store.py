"""Databases, collections with version history, the oplog, and change stream cursors.

Every write gets a fresh cluster time from a single clock and appends one oplog entry; documents
keep every version with the cluster time that wrote it, so a read at `atClusterTime` sees exactly
the state after the writes up to that time (what a snapshot read on a real replica set sees).

Resume tokens imitate the server's v1 KeyString hex layout only where clients may look: `_data`
starts with "82" and the big-endian (seconds, increment) cluster time, which is also what the
server itself extracts (SERVER-133517). The rest is this server's own: a kind byte (00 high-water
mark, 80 event, 81 invalidate), the event's index inside its cluster time, and the server's run
(a random number per `Store`): a token of another run names history this server never had, as a
token kept from before a restart of this in-memory server does (it starts empty), and resuming
from it is ChangeStreamHistoryLost (286). Before, a restart within the second of the last token
handed out accepted it, and the feed went on over the lost writes without a gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import re
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import bson
from bson.regex import Regex
from bson.timestamp import Timestamp

from tests.mongo_wire.query import QueryError, describe_update, matches
from tests.mongo_wire.wire import CODEC

HWM, EVENT, INVALIDATE = 0x00, 0x80, 0x81
TOKEN = re.compile(r"^82([0-9A-F]{8})([0-9A-F]{8})2B([0-9A-F]{2})([0-9A-F]{8})([0-9A-F]{8})04$")
INTERNAL_DBS = {"admin", "config", "local"}


class CommandError(Exception):
    """A command failure the server reports as {ok: 0, code, codeName, errmsg}."""

    def __init__(
        self, code: int, code_name: str, message: str, labels: list[str] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.code_name = code_name
        self.labels = labels or []


def id_key(value: Any) -> bytes:
    """A hashable, type-exact key for an _id value (a UUID `_id` encoded as the wire does)."""
    return bson.encode({"v": value}, codec_options=CODEC)


def make_token(ts: Timestamp, kind: int, index: int, run: int) -> dict[str, str]:
    return {"_data": f"82{ts.time:08X}{ts.inc:08X}2B{kind:02X}{index:08X}{run:08X}04"}


@dataclass(frozen=True)
class Position:
    """A place in the oplog: events strictly after (ts, index), or from ts on for a mark."""

    ts: Timestamp
    index: int
    kind: int
    run: int | None = None  # the server run the token came from (None: not from a token)

    @classmethod
    def parse(cls, token: Any) -> Position:
        data = token.get("_data") if isinstance(token, Mapping) else None
        found = TOKEN.match(data) if isinstance(data, str) else None
        if not found:
            raise CommandError(260, "InvalidResumeToken", f"Invalid resume token: {token!r}")
        t, i, kind, index, run = (int(g, 16) for g in found.groups())
        return cls(Timestamp(t, i), index, kind, run)

    def admits(self, ts: Timestamp, index: int) -> bool:
        if self.kind == HWM:
            return ts >= self.ts
        return (ts, index) > (self.ts, self.index)


@dataclass
class Entry:
    """One oplog entry, with both images kept so any fullDocument mode can be answered."""

    ts: Timestamp
    index: int
    wall: dt.datetime
    op: str
    db: str
    coll: str | None
    key: Any = None
    pre: dict[str, Any] | None = None
    post: dict[str, Any] | None = None
    images: bool = False  # changeStreamPreAndPostImages was on when this was written
    update: dict[str, Any] | None = None
    to: tuple[str, str] | None = None
    run: int = 0

    @property
    def token(self) -> dict[str, str]:
        return make_token(self.ts, EVENT, self.index, self.run)


@dataclass
class Collection:
    name: str
    uuid: uuid.UUID = field(default_factory=uuid.uuid4)
    options: dict[str, Any] = field(default_factory=dict)
    versions: dict[bytes, list[tuple[Timestamp, dict[str, Any] | None]]] = field(
        default_factory=dict
    )

    @property
    def images(self) -> bool:
        spec = self.options.get("changeStreamPreAndPostImages") or {}
        return bool(spec.get("enabled"))

    def current(self, key: bytes) -> dict[str, Any] | None:
        history = self.versions.get(key)
        return history[-1][1] if history else None

    def docs(self, at: Timestamp | None = None) -> Iterator[dict[str, Any]]:
        for history in self.versions.values():
            doc = None
            for ts, version in history:
                if at is not None and ts > at:
                    break
                doc = version
            if doc is not None:
                yield doc


class Store:
    def __init__(self) -> None:
        self.dbs: dict[str, dict[str, Collection]] = {}
        self.oplog: list[Entry] = []
        self.run = int.from_bytes(os.urandom(4), "big")
        """This server's run, in its tokens (see the module docstring)."""
        self.floor = self._now()
        self._last = self.floor
        self._changed = asyncio.Event()
        self.wall_offset = dt.timedelta(0)
        """Added to events' wallTime, to show a reader far behind the writes (lag)."""

    # -- the clock -----------------------------------------------------------------------------

    @staticmethod
    def _now() -> Timestamp:
        return Timestamp(int(time.time()), 1)

    def tick(self) -> Timestamp:
        """A cluster time later than every one handed out (the server's noop writer does this)."""
        now = int(time.time())
        if now > self._last.time:
            self._last = Timestamp(now, 1)
        else:
            self._last = Timestamp(self._last.time, self._last.inc + 1)
        return self._last

    @property
    def last(self) -> Timestamp:
        return self._last

    def truncate_oplog(self) -> None:
        """Forget all history so far, as a small oplog that rolled over would."""
        self.floor = self.tick()
        self.oplog.clear()

    # -- namespaces ----------------------------------------------------------------------------

    def collection(self, db: str, name: str, create: bool = False) -> Collection | None:
        colls = self.dbs.get(db)
        if colls is None or name not in colls:
            if not create:
                return None
            colls = self.dbs.setdefault(db, {})
            colls[name] = Collection(name)
        return colls[name]

    def create(self, db: str, name: str, options: dict[str, Any]) -> None:
        if self.collection(db, name) is not None:
            raise CommandError(48, "NamespaceExists", f"Collection {db}.{name} already exists.")
        coll = self.collection(db, name, create=True)
        assert coll is not None
        coll.options = options

    def _append(self, entry: Entry) -> Entry:
        self.oplog.append(entry)
        self._changed.set()
        self._changed = asyncio.Event()
        return entry

    def _entry(self, op: str, db: str, coll: str | None, **fields: Any) -> Entry:
        now = dt.datetime.now(dt.UTC) + self.wall_offset
        wall = now.replace(microsecond=now.microsecond // 1000 * 1000)  # BSON dates hold ms
        return self._append(Entry(self.tick(), 0, wall, op, db, coll, **fields, run=self.run))

    async def wait_for_write(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    # -- writes --------------------------------------------------------------------------------

    def insert(self, db: str, name: str, doc: dict[str, Any]) -> None:
        if isinstance(doc["_id"], list | Regex):
            # mongod's own check (insert.cpp fixDocumentForInsert): an _id is never an array
            # (an index on it could not be unique) nor a regular expression.
            kind = "an array" if isinstance(doc["_id"], list) else "a regex"
            raise CommandError(2, "BadValue", f"can't use {kind} for _id")
        coll = self.collection(db, name, create=True)
        assert coll is not None
        key = id_key(doc["_id"])
        if coll.current(key) is not None:
            raise CommandError(
                11000, "DuplicateKey", f"E11000 duplicate key error collection: {db}.{name}"
            )
        entry = self._entry("insert", db, name, key=doc["_id"], post=doc, images=coll.images)
        coll.versions.setdefault(key, []).append((entry.ts, doc))

    def replace_or_update(
        self,
        db: str,
        name: str,
        old: dict[str, Any],
        new: dict[str, Any],
        replace: bool,
        truncations: bool,
    ) -> None:
        coll = self.collection(db, name)
        assert coll is not None
        update = None if replace else describe_update(old, new, truncations)
        entry = self._entry(
            "replace" if replace else "update",
            db,
            name,
            key=old["_id"],
            pre=old,
            post=new,
            images=coll.images,
            update=update,
        )
        coll.versions.setdefault(id_key(old["_id"]), []).append((entry.ts, new))

    def delete(self, db: str, name: str, doc: dict[str, Any]) -> None:
        coll = self.collection(db, name)
        assert coll is not None
        entry = self._entry("delete", db, name, key=doc["_id"], pre=doc, images=coll.images)
        coll.versions[id_key(doc["_id"])].append((entry.ts, None))

    def drop(self, db: str, name: str) -> bool:
        colls = self.dbs.get(db, {})
        if name not in colls:
            return False
        del colls[name]
        if not colls:
            self.dbs.pop(db, None)
        self._entry("drop", db, name)
        return True

    def drop_database(self, db: str) -> None:
        for name in list(self.dbs.get(db, {})):
            self.drop(db, name)
        self._entry("dropDatabase", db, None)

    def rename(self, source: tuple[str, str], target: tuple[str, str], drop_target: bool) -> None:
        coll = self.collection(*source)
        if coll is None:
            raise CommandError(
                26, "NamespaceNotFound", f"Source collection {'.'.join(source)} does not exist"
            )
        if self.collection(*target) is not None:
            if not drop_target:
                raise CommandError(48, "NamespaceExists", "target namespace exists")
            # One oplog entry, as mongod writes it (the rename carries dropTarget): streams see
            # the rename, no drop of the target (jstests/change_streams/metadata_notifications.js).
            del self.dbs[target[0]][target[1]]
        del self.dbs[source[0]][source[1]]
        if not self.dbs[source[0]]:
            del self.dbs[source[0]]
        coll.name = target[1]
        self.dbs.setdefault(target[0], {})[target[1]] = coll
        self._entry("rename", source[0], source[1], to=target)


@dataclass
class ChangeStream:
    """One $changeStream cursor: its scope, options and place in the oplog."""

    store: Store
    db: str | None  # None: the whole cluster
    coll: str | None  # None: the whole database
    pipeline: list[Mapping[str, Any]]
    full_document: str
    before_change: str
    position: Position
    batch_size: int = 1000
    finished: bool = False

    def __post_init__(self) -> None:
        for stage in self.pipeline:
            if len(stage) != 1 or not set(stage) <= {"$match", "$unset"}:
                raise CommandError(
                    40324, "Location40324", f"Unsupported stage in this test server: {stage}"
                )
            if "_id" in _unset_paths(stage.get("$unset", [])):
                # mongod fails such a stream when it meets an event (280); refused at once here.
                raise CommandError(
                    280,
                    "ChangeStreamFatalError",
                    "Encountered an event whose _id field, which contains the resume token, "
                    "was modified by the pipeline.",
                )
        if self.position.ts < self.store.floor:
            raise _history_lost()
        if self.position.run is not None and self.position.run != self.store.run:
            raise _history_lost()  # a token from before a restart: history this run never had
        if self.position.kind == EVENT and self.position.run is not None:
            at = (self.position.ts, self.position.index)
            found = [entry for entry in self.store.oplog if (entry.ts, entry.index) == at]
            if not found:
                # Within the oplog's window but no such event (a token of another replica set,
                # or of a restored backup): mongod says so, and it is not resumable.
                raise _token_not_found(self.position)
            self._resumed = found[0]

    _resumed: Entry | None = field(default=None, init=False)
    """The event a resume token names: mongod reads it again, through the image lookups, before
    it checks the token and drops the event (resuming after an update written
    without a pre-image, with fullDocumentBeforeChange "required", fails with
    NoMatchingDocument though that update is not returned)."""

    def _check_resumed(self) -> None:
        entry, self._resumed = self._resumed, None
        if entry is None or not self._in_scope(entry):
            return
        if self.coll is not None and entry.op == "dropDatabase":
            return
        event = self.render(entry)
        missing = event.pop(_MISSING, None)
        if missing is not None and self._passes(event):
            raise _image_missing(missing, event)

    def _in_scope(self, entry: Entry) -> bool:
        if self.db is None:
            return entry.db not in INTERNAL_DBS
        if entry.op == "rename" and entry.to is not None and self._watches(*entry.to):
            # A stream on the rename's target sees it too (`ns` the source, `to` the target),
            # and a collection stream is invalidated by it, as by a rename of its own: mongod's
            # jstests/change_streams/metadata_notifications.js ("This is true if the change
            # stream is on the source or target collection of the rename").
            return True
        if entry.db != self.db:
            return False
        return self.coll is None or entry.coll == self.coll or entry.op == "dropDatabase"

    def _watches(self, db: str, coll: str) -> bool:
        return db == self.db and (self.coll is None or coll == self.coll)

    def _invalidates(self, entry: Entry) -> bool:
        if self.coll is not None:
            return entry.op in ("drop", "rename", "dropDatabase")
        return self.db is not None and entry.op == "dropDatabase"

    def next_batch(self) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """Events after the current position (at most batch_size) and the postBatchResumeToken."""
        if self.position.ts < self.store.floor:
            # An open stream whose place left the oplog: its oplog scan dies as any capped
            # collection scan does (CappedPositionLost, 136, with no resumable label); mongod
            # says ChangeStreamHistoryLost only when a stream is opened or resumed there
            # (a mid-stream CappedPositionLost is passed on as is).
            raise _capped_position_lost()
        self._check_resumed()
        batch: list[dict[str, Any]] = []
        for entry in self.store.oplog:
            if len(batch) >= self.batch_size:
                return batch, dict(batch[-1]["_id"])
            if not self.position.admits(entry.ts, entry.index) or not self._in_scope(entry):
                continue
            if self.coll is not None and entry.op == "dropDatabase":
                event = None  # a collection stream only sees the drop of its collection
            else:
                event = self.render(entry)
            self.position = Position(entry.ts, entry.index, EVENT)
            if event is not None and self._passes(event):
                missing = event.pop(_MISSING, None)
                if missing is not None:
                    raise _image_missing(missing, event)
                event = self._reshape(event)
                size = len(bson.encode(event, codec_options=CODEC))
                if size > MAX_EVENT_SIZE:
                    raise _too_large(event, size)
                batch.append(event)
            if self._invalidates(entry):
                invalidate: dict[str, Any] = {
                    "_id": make_token(entry.ts, INVALIDATE, entry.index, self.store.run),
                    "operationType": "invalidate",
                    "clusterTime": entry.ts,
                    "wallTime": entry.wall,
                }
                if self._passes(invalidate):
                    batch.append(invalidate)
                self.finished = True
                return batch, dict(invalidate["_id"])
        # Everything available has been scanned: a high-water mark past it, as the periodic noop
        # writer of a real replica set keeps an idle stream's token moving.
        mark = self.store.tick()
        self.position = Position(mark, 0, HWM)
        return batch, make_token(mark, HWM, 0, self.store.run)

    def _reshape(self, event: dict[str, Any]) -> dict[str, Any]:
        """The `$unset` stages (after the `$match` ones: this server keeps them in that order)."""
        for stage in self.pipeline:
            for path in _unset_paths(stage.get("$unset", [])):
                *parents, last = path.split(".")
                place: Any = event
                for part in parents:
                    place = place.get(part) if isinstance(place, dict) else None
                if isinstance(place, dict):
                    place.pop(last, None)
        return event

    def _passes(self, event: Mapping[str, Any]) -> bool:
        try:
            return all(
                matches(event, stage["$match"]) for stage in self.pipeline if "$match" in stage
            )
        except QueryError as exc:
            raise CommandError(exc.code, "BadValue", str(exc)) from None

    def render(self, entry: Entry) -> dict[str, Any]:
        """The change event document, per https://www.mongodb.com/docs/manual/reference/change-events/.

        A required image that is missing is marked (`_MISSING`), not raised here: the stream
        fails only when the event passes the `$match` stages. mongod pushes a `$match` on
        `ns`, `operationType` and the like down into its oplog scan (the change stream rewrites
        of 6.0+, jstests/change_streams/oplog_rewrite/), so an event filtered out never reaches
        the image lookup; failing on it made a cluster-wide stream with required pre-images die
        on the connector's own (filtered out) resume token writes."""
        event: dict[str, Any] = {
            "_id": entry.token,
            "operationType": entry.op,
            "clusterTime": entry.ts,
            "wallTime": entry.wall,
            "ns": {"db": entry.db} if entry.coll is None else {"db": entry.db, "coll": entry.coll},
        }
        if entry.op in ("insert", "update", "replace", "delete"):
            event["documentKey"] = {"_id": entry.key}
        if entry.op in ("insert", "replace"):
            event["fullDocument"] = entry.post
        elif entry.op == "update":
            event["updateDescription"] = entry.update
            if self.full_document == "updateLookup":
                coll = self.store.collection(entry.db, entry.coll or "")
                event["fullDocument"] = coll.current(id_key(entry.key)) if coll else None
            elif self.full_document in ("whenAvailable", "required"):
                if not entry.images and self.full_document == "required":
                    event[_MISSING] = "post"
                event["fullDocument"] = entry.post if entry.images else None
        if entry.op in ("update", "replace", "delete") and self.before_change != "off":
            if not entry.images and self.before_change == "required":
                event.setdefault(_MISSING, "pre")
            event["fullDocumentBeforeChange"] = entry.pre if entry.images else None
        if entry.op == "rename" and entry.to:
            event["to"] = {"db": entry.to[0], "coll": entry.to[1]}
        return event


MAX_EVENT_SIZE = 16 * 1024 * 1024 + 16 * 1024
"""mongod's BSONObjMaxInternalSize: a change event larger than this (a big document with its
pre- and post-images, say) fails the batch with BSONObjectTooLarge (10334)."""


def _unset_paths(spec: Any) -> list[str]:
    return [spec] if isinstance(spec, str) else [str(path) for path in spec]


def _too_large(event: Mapping[str, Any], size: int) -> CommandError:
    """mongod's words for an event over 16 MB: its first element, `_id`, is the event's token
    (MongoDB's docs: "Large Change Stream Events"; $changeStreamSplitLargeEvent is 7.0's way
    round it)."""
    return CommandError(
        10334,
        "BSONObjectTooLarge",
        f"Executor error during getMore :: caused by :: BSONObj size: {size} (0x{size:X}) is "
        f"invalid. Size must be between 0 and {MAX_EVENT_SIZE}(16MB) First element: _id: "
        f'{{ _data: "{event["_id"]["_data"]}" }}',
    )


_MISSING = "\x00missing image"
"""An event's key naming the required image it lacks (`render`), removed before it is sent."""


def _history_lost() -> CommandError:
    return CommandError(
        286,
        "ChangeStreamHistoryLost",
        "Resume of change stream was not possible, as the resume point may no longer be in the "
        "oplog.",
    )


def _capped_position_lost() -> CommandError:
    return CommandError(
        136,
        "CappedPositionLost",
        "Executor error during getMore :: caused by :: CollectionScan died due to position in "
        "capped collection being deleted.",
    )


def _token_not_found(position: Position) -> CommandError:
    data = make_token(position.ts, position.kind, position.index, position.run or 0)["_data"]
    return CommandError(
        280,
        "ChangeStreamFatalError",
        f'cannot resume stream; the resume token was not found. {{_data: "{data}"}}',
        ["NonResumableChangeStreamError"],
    )


def _image_missing(which: str, event: Mapping[str, Any]) -> CommandError:
    """mongod's error for a required image it has not got: NoMatchingDocument (47), no label
    (document_source_change_stream_add_pre_image.cpp / _add_post_image.cpp; SERVER-66808
    shows the text). This server answered 280 ChangeStreamFatalError, the code mongod gives a
    resume token it cannot find, which a connector must tell apart."""
    shown = {k: event[k] for k in ("_id", "operationType", "clusterTime") if k in event}
    return CommandError(
        47,
        "NoMatchingDocument",
        f"Executor error during getMore :: caused by :: Change stream was configured to "
        f"require a {which}-image for all update, delete and replace events, but the "
        f"{which}-image was not found for event: {shown}",
    )
