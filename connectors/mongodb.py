"""MongoDB change streams through PyMongo's native async API, with durable resume.

Why PyMongo's `AsyncMongoClient` and not Motor: MongoDB deprecated Motor in favour of the async
API built into PyMongo 4.9+, which talks to the server from the event loop directly instead of
through a thread pool, and Motor is past its end of life.

One change stream covers every `watch` entry (a collection stream, a database stream with a
$match, or a cluster stream with a $match), so there is one position to save and one commit
order. The connector saves the stream's resume token when the hub asks for the next item after
the last change of a batch (the hub has routed everything before it), every `token_save_every`
events inside a large batch, and, while idle, the postBatchResumeToken at most every
`token_save_interval` seconds so a quiet stream never falls
out of the oplog window. A restart resumes with `startAfter`. Resumable errors are retried by the
driver once and by the connector `resume_retries` more times with backoff before it gives up and
lets the hub restart it. ChangeStreamHistoryLost (286) and invalidate events produce a `Gap` and
a new stream from now (after an invalidate, from just after it), so no error is ever retried in
a loop.

Snapshots read with `readConcern: snapshot` at a cluster time just before the stream's delivered
position, so every change the rows reflect has already been yielded and `covers` is exact.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from typing import Any
from urllib.parse import unquote

from bson import Decimal128, ObjectId, json_util
from bson.errors import BSONError
from bson.timestamp import Timestamp
from pymongo import AsyncMongoClient
from pymongo.common import URI_OPTIONS_VALIDATOR_MAP
from pymongo.errors import (
    ConfigurationError,
    ConnectionFailure,
    CursorNotFound,
    InvalidURI,
    OperationFailure,
    PyMongoError,
    ServerSelectionTimeoutError,
)
from pymongo.uri_parser import parse_uri

from connectors.base import Connector, RoomAddress, Snapshot, State, Where
from connectors.mongodb_events import (
    Watch,
    cluster_time_of,
    just_before,
    stream_match,
    stream_scope,
    to_change,
    token_of,
    token_time,
    watched,
)
from connectors.mongodb_filters import conjunction, pushdown
from connectors.mongodb_tokens import TokenStore
from feed.core.change import Change, Gap, room_key
from feed.core.filters import RowFilter
from feed.errors import (
    ConnectorError,
    FeedError,
    ProtocolError,
    SnapshotNotSupported,
    SourceMisconfigured,
    SourceUnavailable,
)
from feed.options import DAY, HOUR, Options

log = logging.getLogger("feed.connectors.mongodb")

HISTORY_LOST = 286
AUTH_FAILED = 18
UNAUTHORIZED = 13
STANDALONE = 40573
TOO_LARGE = 10334  # BSONObjectTooLarge: an event over 16 MB (a big document with its images)
STRIPPED = ["fullDocument", "fullDocumentBeforeChange", "updateDescription"]
"""What an event too large to read is read without: what is left (its kind, namespace, key,
time and token) is always small."""
CAPPED_POSITION_LOST = 136  # an open stream's place left the oplog (it rolled over)
FATAL = 280  # ChangeStreamFatalError: e.g. "the resume token was not found"
NO_MATCHING_DOCUMENT = 47  # what mongod says when a required pre- or post-image is missing


def _errmsg(exc: OperationFailure) -> str:
    return str((exc.details or {}).get("errmsg") or exc)


def history_lost(exc: OperationFailure) -> bool:
    """ChangeStreamHistoryLost, or a resume token the oplog's window should hold but does not
    (ChangeStreamFatalError "the resume token was not found": a token of another replica set,
    or saved before a restore). Either way the stream cannot go on from the token: a gap, then
    from now. The second was read as a missing image, and the connector restarted from the
    same token for good.

    An open stream whose place the oplog rolled past gets CappedPositionLost (136) from its
    getMore: the oplog is the only capped collection a change stream reads, and whatever
    followed that place is gone too. It has no resumable label, so it was shown as "MongoDB
    error 136", the connector restarted, and only its reopening found the history lost."""
    if exc.code in (HISTORY_LOST, CAPPED_POSITION_LOST):
        return True
    return exc.code == FATAL and "resume token was not found" in _errmsg(exc)


def image_missing(exc: OperationFailure) -> bool:
    """A required pre- or post-image that MongoDB did not record: NoMatchingDocument (47),
    "Change stream was configured to require a pre-image ... but the pre-image was not found"
    (mongod's document_source_change_stream_add_pre_image.cpp; 51770 on 4.4's pre-images).
    Every ChangeStreamFatalError (280) was taken for this and shown with a collMod hint, while
    mongod answers 47 here and 280 for other fatal errors."""
    message = _errmsg(exc)
    return exc.code in (NO_MATCHING_DOCUMENT, 51770) and (
        "pre-image" in message or "post-image" in message
    )


STANDALONE_HINT = (
    "standalone MongoDB servers do not support change streams: run it as a replica set "
    "(a single-node one is enough: mongod --replSet rs0, then rs.initiate())"
)


class MongoConnector(Connector):
    kind = "mongodb"

    def configure(self, options: Options) -> None:
        self.uri: str = options.str("uri", required=True, spaces="none")
        problem = uri_problem(self.uri)
        if problem is not None:
            options.fail("uri", problem)
        raw_watch = options.raw.get("watch")
        if isinstance(raw_watch, str):
            names = [options.str("watch", required=True)]
        else:
            names = options.str_list("watch", required=True)
        self.watches = [Watch.parse(name, options.path("watch")) for name in names]
        self.full_document = options.choice(
            "full_document", ["off", "updateLookup", "whenAvailable", "required"], "updateLookup"
        )
        self.before_change = options.choice(
            "full_document_before_change", ["off", "whenAvailable", "required"], "off"
        )
        self.before_images = self.before_change == "required"
        store = options.choice("resume_store", ["mongodb", "none"], "mongodb")
        store_name = options.str("resume_collection", "dbfeed.resume_tokens")
        db, _, coll = store_name.partition(".")
        if not db or not coll:
            options.fail("resume_collection", f"must be database.collection, not {store_name!r}")
        self.resume_collection = (db, coll) if store == "mongodb" else None
        if self.resume_collection is not None and store_name in {w.name for w in self.watches}:
            # Each save is a change of the watched collection, delivered, then saved: a loop
            # (638 changes in 6 s of an idle feed), and with other entries the stream's $match
            # keeps the collection out, so it would hear nothing.
            options.fail(
                "watch",
                f"{store_name!r} is where this connector keeps its resume tokens "
                "(resume_collection): watch another collection, or set resume_collection",
            )
        # Without a token store a new instance starts from now: a cluster that hands the
        # connector to another node must then announce a gap (feed.engine.lease), or what was
        # written while no node read it is lost without a word.
        self.durable = self.resume_collection is not None
        self.save_interval = options.float("token_save_interval", 10.0, minimum=0, maximum=HOUR)
        self.save_every = options.int("token_save_every", 2000, minimum=1, maximum=4096)
        """Events routed between token saves inside one batch, whatever the time. A batch
        (what a getMore returns, up to 16 MiB) was saved only at its end or after
        `token_save_interval`, so a crash half way through a large one sent every event of
        it routed so far again: more than the client libraries' window of 4,096 ids."""
        self.max_await_ms = options.int("max_await_ms", 1000, minimum=10, maximum=60_000)
        self.connect_timeout = options.float("connect_timeout", 10.0, minimum=0.1, maximum=HOUR)
        self.resume_retries = options.int("resume_retries", 5, minimum=0, maximum=1000)
        self.allow_missing = options.bool("allow_missing", False)
        self.lag_threshold = options.float("lag_threshold", 30.0, minimum=0.1, maximum=DAY)

        self._client: AsyncMongoClient[dict[str, Any]] | None = None
        self._tokens: TokenStore | None = None
        self._token: Mapping[str, Any] | None = None  # last delivered position
        self._mark: Timestamp | None = None  # its cluster time
        self._mark_is_event = False  # an event's own time: more events may share it
        self._mark_moved = asyncio.Event()
        self._saved_at = float("-inf")
        self._routed_unsaved = 0  # events routed since the last save (`token_save_every`)
        self._known: set[str] = {w.name for w in self.watches}
        self._whole_dbs = {w.db for w in self.watches if w.coll is None}
        self._open_stream: Any = None  # opened by start(), consumed by changes()
        self._progress = 0  # batches read, to tell a fresh failure from a repeated one
        self._one_by_one = False  # reading one event a batch, to reach one too large to read
        self._server = ""

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        await self._start(stream=True)

    async def _start(self, *, stream: bool) -> None:
        self.set_status(State.STARTING)
        try:
            await self._connect(stream)
        except ConnectorError as exc:
            self.set_status(State.DOWN, str(exc))
            await self._close_client()
            raise
        except PyMongoError as exc:
            error = await self._wrong_set_name(exc) or self._explain(exc)
            self.set_status(State.DOWN, str(error))
            await self._close_client()
            raise error from None

    async def _wrong_set_name(self, exc: PyMongoError) -> ConnectorError | None:
        """A `replicaSet` in the uri that the server does not bear: PyMongo only says "No
        replica set members available for replica set name", shown as "cannot reach MongoDB"
        of a server that answered. Asked directly, the server names its set."""
        if not isinstance(exc, ServerSelectionTimeoutError) or "replica set name" not in str(exc):
            return None
        try:
            options = parse_uri(self.uri)
            wanted = options["options"].get("replicaSet")
            for host, port in options["nodelist"]:
                client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
                    host,
                    port,
                    directConnection=True,
                    serverSelectionTimeoutMS=int(self.connect_timeout * 1000),
                )
                try:
                    hello = await client.admin.command("hello")
                finally:
                    await client.close()
                actual = hello.get("setName")
                if actual and actual != wanted:
                    return SourceMisconfigured(
                        f"MongoDB at {host}:{port} is replica set {actual!r}, not {wanted!r}: "
                        f"fix replicaSet in uri (replicaSet={actual})"
                    )
        except (PyMongoError, InvalidURI, ConfigurationError, ValueError):
            return None
        return None

    async def _connect(self, stream: bool) -> None:
        try:
            nodes = parse_uri(self.uri)["nodelist"]
        except (InvalidURI, ConfigurationError, ValueError) as exc:
            raise SourceMisconfigured(
                f"invalid MongoDB uri: {_uri_problem(self.uri, exc)}"
            ) from None
        self._server = ",".join(f"{host}:{port}" for host, port in nodes)
        timeout_ms = int(self.connect_timeout * 1000)
        self._client = AsyncMongoClient(
            self.uri,
            appname=f"dbfeed-{self.name}",
            serverSelectionTimeoutMS=timeout_ms,
            connectTimeoutMS=timeout_ms,
            tz_aware=True,
            uuidRepresentation="standard",
        )
        hello = await self._client.admin.command("hello")
        if not hello.get("setName") and hello.get("msg") != "isdbgrid":
            raise SourceMisconfigured(
                f"MongoDB at {self._server} is a standalone server; {STANDALONE_HINT}"
            )
        if not self.allow_missing:
            await self._check_namespaces()
        if not stream:
            return
        self._tokens = TokenStore(self._client, self.resume_collection, self.name)
        if self._token is None:
            self._token = await self._tokens.load()
        # Open the stream now, so that every change committed after start() returns is captured
        # even before the first call to changes(). History loss surfaces there, as a Gap.
        try:
            self._open_stream = await self._watch()
        except OperationFailure as exc:
            if not history_lost(exc):
                raise

    async def _check_namespaces(self) -> None:
        assert self._client is not None
        for watch in self.watches:
            db = self._client[watch.db]
            if watch.coll is None:
                names = await db.list_collection_names()
                if not names:
                    raise SourceMisconfigured(
                        f"MongoDB database {watch.db!r} does not exist (no collections): fix "
                        "`watch`, create it, or set allow_missing = true"
                    )
                self._known.update(f"{watch.db}.{n}" for n in names)
            elif not await db.list_collection_names(filter={"name": watch.coll}):
                raise SourceMisconfigured(
                    f"MongoDB collection {watch.name!r} does not exist: fix `watch`, create it "
                    f"(db.createCollection({watch.coll!r})), or set allow_missing = true"
                )

    def forget_unsaved(self) -> None:
        if self._tokens is not None:  # without a token store, memory is all there is
            self._token = None  # `start` loads the saved token again

    async def stop(self) -> None:
        if self._tokens is not None and self._token is not None:
            try:
                await self.settle()  # nothing saved past what a cluster could not publish
                await asyncio.wait_for(self._tokens.save(self._token, self._watch_names()), 5)
            except (PyMongoError, TimeoutError, FeedError) as exc:
                log.warning("%s: could not save the resume token on stop: %s", self.name, exc)
        await self._close_client()
        self.set_status(State.STOPPED)

    async def _close_client(self) -> None:
        stream, self._open_stream = self._open_stream, None
        if stream is not None:
            with contextlib.suppress(PyMongoError):
                await stream.close()
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def check(self) -> str:
        """Connect and check the namespaces, without opening a stream or saving a token."""
        await self._start(stream=False)
        try:
            assert self._client is not None
            info = await self._client.admin.command("buildInfo")
            hello = await self._client.admin.command("hello")
        except PyMongoError as exc:
            raise self._explain(exc) from None
        finally:
            await self._close_client()
            self.set_status(State.STOPPED)
        where = hello.get("setName") or "sharded cluster"
        watching = ", ".join(self._watch_names())
        return f"MongoDB {info.get('version')} ({where}), watching {watching}"

    # -- the stream ----------------------------------------------------------------------------

    async def changes(self) -> AsyncIterator[Change | Gap]:
        failures = 0
        lost_at = -1
        while True:
            gap: Gap | None = None
            try:
                async for item in self._stream():
                    failures = 0
                    yield item
                continue  # the stream ended by itself (invalidated): open a new one
            except OperationFailure as exc:
                if history_lost(exc):
                    if lost_at == self._progress:
                        # Lost again without a single batch since starting from now: not a
                        # rolled-over oplog, so do not loop; the hub restarts us with backoff.
                        error = self._explain(exc)
                        self.set_status(State.DOWN, str(error))
                        raise error from None
                    lost_at = self._progress
                    log.warning("%s: change stream history lost: %s", self.name, _one_line(exc))
                    if self._tokens is not None:
                        await self._tokens.forget()
                    self._token = None
                    self.count_fault("history_lost")
                    gap = Gap(
                        self.name,
                        "MongoDB change stream history lost: the oplog no longer holds the "
                        "resume token (it rolled over while the feed was behind or stopped; "
                        "a bigger oplog, replSetResizeOplog, keeps a longer window)",
                    )
                elif exc.code == TOO_LARGE and self._token is not None:
                    # An event over 16 MB fails its whole batch, and every reopening from our
                    # token: the connector stopped there for good. Reopened for one event at a
                    # time (a stream's first batch of one: PyMongo asks getMores for two),
                    # every event before it arrives whole; once opening fails, the next event
                    # is that one: read without its documents, delivered, and its rooms get a
                    # gap (reload that document).
                    if not self._one_by_one:
                        log.warning("%s: %s", self.name, _one_line(exc))
                        self._one_by_one = True
                        continue
                    async for item in self._read_stripped():
                        yield item
                    self._one_by_one = False
                    continue
                elif not exc.has_error_label("ResumableChangeStreamError"):
                    error = self._explain(exc)
                    self.set_status(State.DOWN, str(error))
                    raise error from None
                else:
                    failures = await self._back_off(failures, exc)
            except (ConnectionFailure, CursorNotFound) as exc:
                failures = await self._back_off(failures, exc)
            if gap is not None:
                # Open the new stream before announcing the gap: whatever a client writes after
                # seeing it is captured.
                with contextlib.suppress(PyMongoError):
                    self._open_stream = await self._watch()
                yield gap

    async def _read_stripped(self) -> AsyncIterator[Change | Gap]:
        """The event after the delivered position, known to be too large to read: read without
        its documents (`STRIPPED`), delivered with `before` and `after` null, then a gap for
        its collection's rooms, whose clients reload the document."""
        scope = stream_scope(self.watches)
        pipeline = stream_match(self.watches, scope, self.resume_collection)
        pipeline.append({"$unset": STRIPPED})
        deadline = time.monotonic() + self.connect_timeout + self.max_await_ms / 1000
        try:
            async with await self._target().watch(
                pipeline,
                start_after=self._token,
                batch_size=1,
                max_await_time_ms=self.max_await_ms,
            ) as stream:
                while (event := await stream.try_next()) is None:
                    if not stream.alive or time.monotonic() > deadline:
                        raise SourceUnavailable(
                            f"MongoDB at {self._server}: the change event too large to read "
                            "did not come again"
                        )
        except OperationFailure as exc:
            error = self._explain(exc)
            self.set_status(State.DOWN, str(error))
            raise error from None
        change = to_change(self.name, event, self._fallback_target())
        if change.target not in self._known and "." in change.target:
            self._known.add(change.target)
        yield change
        self.count_fault("event_too_large")
        yield Gap(
            self.name,
            f"MongoDB change event over 16 MB ({change.op} of {change.target}, with its "
            "documents): delivered without them; reload",
            change.target if "." in change.target else None,
        )
        await self._advance(event["_id"], event=True, end_of_batch=True, change=change)

    async def _back_off(self, failures: int, exc: PyMongoError) -> int:
        """Wait before reopening the stream, or give up and let the hub restart the connector."""
        error = self._explain(exc)
        self.set_status(State.DOWN, str(error))
        if failures >= self.resume_retries:
            raise error from None
        self.count_restart()
        delay = min(0.1 * 2**failures, 5.0)
        log.info("%s: %s; reopening the change stream in %.1fs", self.name, error, delay)
        await asyncio.sleep(delay)
        return failures + 1

    def _target(self) -> Any:
        assert self._client is not None
        db, coll = stream_scope(self.watches)
        if db is None:
            return self._client
        return self._client[db] if coll is None else self._client[db][coll]

    async def _watch(self) -> Any:
        """Open a change stream at the delivered position (or now, when there is none)."""
        if self._client is None:
            raise SourceUnavailable(f"connector {self.name!r} is not started")
        scope = stream_scope(self.watches)
        pipeline = stream_match(self.watches, scope, self.resume_collection)
        options: dict[str, Any] = {"max_await_time_ms": self.max_await_ms}
        # "required" is asked of MongoDB as "whenAvailable" and checked here (`_check_images`):
        # mongod reads the event a resume token names again, through its image lookups, so a
        # restart after an update written before pre-images were on failed with
        # NoMatchingDocument for good, though that update was delivered long ago and every
        # later one has its images.
        if self.full_document != "off":
            options["full_document"] = _asked(self.full_document)
        if self.before_change != "off":
            options["full_document_before_change"] = _asked(self.before_change)
        if self._token is not None:
            options["start_after"] = self._token
        if self._one_by_one:
            options["batch_size"] = 1
        return await self._target().watch(pipeline, **options)

    async def _stream(self) -> AsyncIterator[Change | Gap]:
        """One change stream from the delivered position until it ends or fails."""
        stream, self._open_stream = self._open_stream, None
        if stream is None:
            stream = await self._watch()
        try:
            self.set_status(State.UP)
            await self._advance(stream.resume_token, event=False, end_of_batch=True)
            if self._one_by_one and _batch_done(stream):
                self._one_by_one = False  # nothing after the token to step through one by one
            while True:
                event = await stream.try_next()
                self._progress += 1
                if event is None:
                    if not stream.alive:
                        # Closed without an invalidate we could see: resuming from our token
                        # could meet the same end again, so start from now and say so.
                        self._token = None
                        self.count_fault("stream_closed")
                        yield Gap(self.name, "MongoDB change stream closed by the server")
                        return
                    await self._advance(stream.resume_token, event=False, end_of_batch=True)
                    self._report_lag(None)  # an empty batch: caught up
                    continue
                self._check_images(event)
                change = to_change(self.name, event, self._fallback_target())
                self._report_lag(change)
                into = watched(self.watches, event.get("to")) if change.op == "rename" else None
                if into is None or watched(self.watches, event.get("ns")) is not None:
                    if change.target not in self._known and "." in change.target:
                        self._known.add(change.target)
                    yield change  # (a rename from a collection nobody watches is not)
                if into is not None and stream_scope(self.watches)[1] is None:
                    # A collection renamed onto a watched name: the destination's documents
                    # came with no change of their own. (A collection stream is invalidated
                    # next, and that gap says so.)
                    self._known.add(into)
                    self.count_fault("renamed_into")
                    reason = (
                        f"MongoDB collection {change.target} was renamed to {into}: its "
                        "documents arrived there without changes; reload"
                    )
                    yield Gap(self.name, reason, into)
                # Asked for the next item: the hub has routed `change`.
                await self._advance(
                    stream.resume_token, event=True, end_of_batch=_batch_done(stream), change=change
                )
                if change.op == "invalidate":
                    # Reopened with startAfter the invalidate token: nothing after it is missed,
                    # but clients should reload what the dropped or renamed collection showed.
                    target = change.target if "." in change.target else None
                    self.count_fault("stream_invalidated")
                    reason = (
                        f"MongoDB change stream invalidated ({change.target} was dropped or "
                        "renamed, or a collection was renamed onto it): reload; changes to a "
                        "re-created collection follow"
                    )
                    yield Gap(self.name, reason, target)
                    return
                if self._one_by_one:
                    return  # the next event from a stream of its own (`changes`)
        finally:
            with contextlib.suppress(PyMongoError):
                await stream.close()

    def _check_images(self, event: Mapping[str, Any]) -> None:
        """What "required" asks of MongoDB (`_watch`), checked on each event delivered: an
        image MongoDB did not record stops the connector at that event, which is not
        delivered (clients relying on `before` never get a change without it)."""
        op = event.get("operationType")
        which = None
        if self.before_change == "required" and op in ("update", "replace", "delete"):
            which = "pre" if event.get("fullDocumentBeforeChange") is None else None
        if which is None and self.full_document == "required" and op == "update":
            which = "post" if event.get("fullDocument") is None else None
        if which is None:
            return
        ns = event.get("ns") or {}
        key = (event.get("documentKey") or {}).get("_id")
        setting = "full_document_before_change" if which == "pre" else "full_document"
        when = event.get("wallTime") or event.get("clusterTime")
        if isinstance(when, dt.datetime):
            when = when.isoformat()
        error = SourceMisconfigured(
            f"MongoDB has no {which}-image for the {op} of {ns.get('db')}.{ns.get('coll')} "
            f'_id {key!r} at {when} and {setting} is "required": enable '
            "changeStreamPreAndPostImages on the collection (collMod; images are kept only for "
            f'writes made after that), or set {setting} = "whenAvailable" (this change then '
            "comes with null)"
        )
        self.set_status(State.DOWN, str(error))
        raise error

    def _report_lag(self, change: Change | None) -> None:
        """LAGGING while the events read are older than `lag_threshold` (by their wallTime)."""
        lag = 0.0
        if change is not None and change.ts is not None:
            lag = (dt.datetime.now(dt.UTC) - change.ts).total_seconds()
        if lag > self.lag_threshold:
            self.set_status(State.LAGGING, f"more than {self.lag_threshold:g}s behind MongoDB")
        elif self.own_status.state == State.LAGGING:
            self.set_status(State.UP)

    def _fallback_target(self) -> str:
        db, coll = stream_scope(self.watches)
        return (f"{db}.{coll}" if coll else db) if db else "*"

    async def _advance(
        self,
        token: Mapping[str, Any] | None,
        *,
        event: bool,
        end_of_batch: bool,
        change: Change | None = None,
    ) -> None:
        """Record the delivered position and save it at the end of a batch (or every so often)."""
        if token is None:
            return
        self._token = token
        mark = token_time(token)
        if mark is None and change is not None:
            mark = cluster_time_of(change.position)
        if mark is not None:
            # The position is an event's own time when the token is that event's (not a mark past
            # the end of the batch): other events of the same transaction may still follow.
            self._mark = mark
            self._mark_is_event = (
                event and change is not None and token_of(change.position) == token
            )
            self._mark_moved.set()
            self._mark_moved = asyncio.Event()
        if event:
            self._routed_unsaved += 1
        now = time.monotonic()
        due = now - self._saved_at >= self.save_interval
        due = due or self._routed_unsaved >= self.save_every
        if self._tokens is not None and ((event and end_of_batch) or due):
            await self.settle()  # in a cluster: published first (connectors.base)
            try:
                await self._tokens.save(token, self._watch_names())
            except OperationFailure as exc:
                if exc.code == UNAUTHORIZED:
                    db, coll = self.resume_collection or ("", "")
                    raise SourceMisconfigured(
                        f"cannot save resume tokens in {db}.{coll}: not authorized (grant "
                        'readWrite on it, set resume_collection, or resume_store = "none")'
                    ) from None
                raise
            self._saved_at = now
            self._routed_unsaved = 0

    # -- catalog, rooms and snapshots ----------------------------------------------------------

    def _watch_names(self) -> list[str]:
        return [w.name for w in self.watches]

    def targets(self) -> list[str]:
        return sorted(self._known)

    def known_targets(self) -> Collection[str]:
        return self._known

    def configured_targets(self) -> list[str]:
        return sorted(watch.name for watch in self.watches)

    def parent_target(self, target: str) -> str | None:
        """A collection of a database watched whole: the database's room (`shop:crm`) gets its
        changes too. The catalog lists the database as a target, and a target room receives
        every change of what it names; before, `shop:crm` was accepted and heard nothing but
        a dropDatabase."""
        db, dot, _ = target.partition(".")
        if dot and db in self._whole_dbs:
            return db
        return None

    def inner_prefix(self, target: str) -> str | None:
        return f"{target}." if target in self._whole_dbs else None

    def check_filter(self, target: str, row_filter: RowFilter) -> None:
        """Refuse a filter on a whole database's room without pre-images: a document leaving
        the filter is then told by the rows a room was given, keyed by `_id`, and `_id`s
        repeat across the database's collections (one collection's document would pass for
        another's); a collection's room knows its documents."""
        if target in self._whole_dbs and not self.before_images:
            raise ProtocolError(
                "bad_filter",
                f"{target!r} is a whole database: filter its collections' rooms "
                f"({self.name}:{target}.<collection>?{row_filter.canonical[:128]}), or set "
                'full_document_before_change = "required" (pre-images), with which its own '
                "room takes filters",
            )

    def resolve(self, rest: str) -> RoomAddress | None:
        found = super().resolve(rest)
        if found is not None and found.key is not None and found.target in self._whole_dbs:
            # A key names a document of one collection; `_id`s repeat across collections.
            raise ProtocolError(
                "unknown_target",
                f"{found.target!r} is a whole database: it has no row rooms; follow a "
                f"document in its collection's room, {self.name}:{found.target}.<collection>:"
                f"{found.key[:64]}",
            )
        if found is not None:
            return found
        # A watched database offers its collections even before their first change.
        for watch in self.watches:
            prefix = watch.db + "."
            if watch.coll is None and rest.startswith(prefix) and len(rest) > len(prefix):
                coll, _, key = rest[len(prefix) :].partition(":")
                if coll and "$" not in coll:
                    return RoomAddress(prefix + coll, key or None)
        return None

    async def snapshot(
        self, address: RoomAddress, where: Callable[[Mapping[str, Any]], bool], limit: int
    ) -> Snapshot:
        db, _, coll = address.target.partition(".")
        if not coll:
            raise SnapshotNotSupported(
                f"{address.target!r} is a whole database: subscribe to database.collection rooms "
                "for snapshots"
            )
        if self._client is None:
            raise SourceUnavailable(f"connector {self.name!r} is not running")
        at = await self._snapshot_time()
        parts: list[dict[str, Any]] = []
        if address.key is not None:
            parts.append(row_query(address.key))
        if isinstance(where, Where):  # the room's filter, as far as MongoDB keeps every match
            parts.append(pushdown(where.filter))
        query = conjunction([part for part in parts if part])
        rows: list[Mapping[str, Any]] = []
        keys: list[str | None] = []
        truncated = False
        try:
            cursor = await self._client[db].cursor_command(
                "find",
                coll,
                filter=query,
                codec_options=self._client.codec_options,  # same types as the changes
                readConcern={"level": "snapshot", "atClusterTime": at},
                batchSize=min(max(limit + 1, 1), 1000),
            )
            async with cursor:
                async for doc in cursor:
                    key = room_key(doc.get("_id"))
                    if address.key is not None and key != address.key:
                        continue
                    if not where(doc):
                        continue
                    if len(rows) >= limit:
                        truncated = True
                        break
                    rows.append(doc)
                    keys.append(key)
        except PyMongoError as exc:
            raise self._explain(exc) from None

        def covers(change: Change) -> bool:
            cluster_time = cluster_time_of(change.position)
            return cluster_time is not None and cluster_time <= at

        return Snapshot(rows=rows, covers=covers, truncated=truncated, keys=keys)

    async def _snapshot_time(self) -> Timestamp:
        """A cluster time whose every change has been delivered: just before the stream's mark.

        Reading just before the mark is always safe. When the mark is an event's own time, that
        event is then not in the rows (the hub replays it from the room's buffer); waiting for
        the stream's next batch (about one getMore) usually moves the mark past it, so the rows
        include it and the replay is shorter.
        """
        deadline = time.monotonic() + self.max_await_ms / 1000 + 1
        while self._mark is None or self._mark_is_event:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(self._mark_moved.wait(), remaining)
            except TimeoutError:
                break
        if self._mark is None:
            raise SourceUnavailable(f"connector {self.name!r}: change stream not running yet")
        # A high-water mark sorts before any event at its own time, so the read stops just
        # before it in both cases.
        return just_before(self._mark)

    # -- errors --------------------------------------------------------------------------------

    def _explain(self, exc: BaseException) -> ConnectorError:
        """One line a user can act on, for every way MongoDB can refuse us."""
        if isinstance(exc, (InvalidURI, ConfigurationError)):
            return SourceMisconfigured(f"invalid MongoDB uri: {_one_line(exc)}")
        if isinstance(exc, OperationFailure):
            message = (exc.details or {}).get("errmsg") or _one_line(exc)
            if exc.code == AUTH_FAILED:
                return SourceMisconfigured(
                    f"MongoDB at {self._server} refused the credentials in uri (authentication "
                    "failed): check the user name, password and authSource"
                )
            if exc.code == UNAUTHORIZED:
                return SourceMisconfigured(f"MongoDB user may not do this: {message}")
            if image_missing(exc):
                return SourceMisconfigured(
                    f"{message} (enable them with collMod changeStreamPreAndPostImages: "
                    '{enabled: true}, or use "whenAvailable")'
                )
            if exc.code == STANDALONE:
                return SourceMisconfigured(f"MongoDB at {self._server}: {STANDALONE_HINT}")
            return SourceUnavailable(f"MongoDB error {exc.code}: {message}")
        if isinstance(exc, ServerSelectionTimeoutError):
            # PyMongo's text repeats the address and appends the topology; keep the reason.
            reason = _one_line(exc).split(", Timeout:")[0].split(" (configured timeouts")[0]
            reason = reason.split(": ", 1)[1] if reason.startswith(self._server + ": ") else reason
            return SourceUnavailable(f"cannot reach MongoDB at {self._server}: {reason}")
        if isinstance(exc, ConnectionFailure | CursorNotFound):
            return SourceUnavailable(
                f"lost the change stream from MongoDB at {self._server}: {_one_line(exc)}"
            )
        return SourceUnavailable(f"MongoDB at {self._server}: {_one_line(exc)}")


def _asked(mode: str) -> str:
    """The image mode asked of MongoDB: "required" is checked by the connector instead."""
    return "whenAvailable" if mode == "required" else mode


def _one_line(exc: BaseException) -> str:
    text = str(exc).split(", full error:")[0]
    return " ".join(text.split())[:300]


TLS_FILES = ("tlscafile", "tlscertificatekeyfile", "tlscrlfile")


def uri_problem(uri: str) -> str | None:
    """What is wrong with `uri` before connecting, or None: a config error, not a connector
    that `feed serve` starts and retries forever. `mongodb+srv://` is left to the connection:
    parsing it asks DNS."""
    if uri.startswith("mongodb+srv://"):
        return None
    if not uri.startswith("mongodb://"):
        if uri.startswith("$") and uri[1:].isidentifier():
            return f"is {uri!r}: to read the environment variable write ${{{uri[1:]}}}"
        scheme = uri.partition("://")[0] + "://" if "://" in uri else "not a URI"
        return f"must be a mongodb:// or mongodb+srv:// URI, and this is {scheme}"
    query = uri.partition("?")[2]
    for part in query.split("&"):
        name, _, path = part.partition("=")
        if name.lower() in TLS_FILES and path and not os.path.isfile(unquote(path)):
            return f"{name}={unquote(path)}: no such file; give the path of an existing file"
    try:
        parse_uri(uri)
    except (InvalidURI, ConfigurationError, ValueError, OSError) as exc:
        return f"invalid MongoDB uri: {_uri_problem(uri, exc)}"
    return None


def _uri_problem(uri: str, exc: BaseException) -> str:
    """PyMongo says only "Unknown option." for a misspelt option: name it (never the password)."""
    text = _one_line(exc)
    if text.startswith("Unknown option"):
        query = uri.partition("?")[2]
        names = [part.partition("=")[0] for part in query.split("&") if part]
        unknown = [n for n in names if n.lower() not in URI_OPTIONS_VALIDATOR_MAP]
        if unknown:
            return f"unknown option {unknown[0]!r} (see the PyMongo connection string options)"
    return text


def _batch_done(stream: Any) -> bool:
    """Whether the driver has handed out its whole current batch (private API, so guarded)."""
    has_next = getattr(getattr(stream, "_cursor", None), "_has_next", None)
    return not has_next() if callable(has_next) else True


UNSPELLED_TYPES = ["object", "javascript", "javascriptWithScope", "symbol", "minKey", "maxKey"]
"""BSON types of `_id` whose row key text cannot be read back into the value: a document's
text is its values without their field names (`{a: 1, b: "x"}` is `1,x`), and the rest are
rare enough not to bother. A row room's snapshot reads the documents with such an `_id` by type
(on the `_id` index, a range holding those types only) and keeps the one whose text is the
room's key."""


def row_query(key: str) -> dict[str, Any]:
    """The query for the document(s) whose `_id` renders as `key` in a row room name.

    Every `_id` value whose text (`room_key`) is `key` is looked up by value on the `_id`
    index (`_key_candidates`); `_id`s of the types that text cannot name back
    (`UNSPELLED_TYPES`, embedded documents above all) are read by type. Where `_id`s are
    ObjectIds, strings, numbers, UUIDs or dates, as they usually are, the second part reads
    nothing. Before, only the text, an ObjectId and a number were tried, and a row room of a
    document keyed by a document, a date, a UUID, binary data, a boolean or a Decimal128 had
    an empty snapshot though its changes reached the room.
    """
    return {
        "$or": [
            {"_id": {"$in": _key_candidates(key)}},
            {"_id": {"$type": UNSPELLED_TYPES}},
        ]
    }


def _key_candidates(key: str) -> list[Any]:
    """The `_id` values whose row key text is `key`, read back from it as each BSON type it
    can spell: text, an ObjectId, numbers (int, double, Decimal128: MongoDB's equality crosses
    the numeric types, but a Decimal128 of other digits renders differently), a boolean, a
    date, a UUID, binary data (base64, or its extended JSON's `{"base64": .., "subType": ..}`),
    a timestamp. Only values that render back as `key` are kept."""
    readings: list[Callable[[str], Any]] = [
        ObjectId,
        _int64,
        float,
        Decimal128,
        {"true": True, "false": False}.__getitem__,
        _date,
        uuid.UUID,
        lambda text: base64.b64decode(text, validate=True),
        lambda text: json_util.loads(f'{{"$binary": {text}}}'),
        lambda text: json_util.loads(f'{{"$timestamp": {text}}}'),
    ]
    candidates: list[Any] = [key]
    for read in readings:
        with contextlib.suppress(ValueError, TypeError, KeyError, ArithmeticError, BSONError):
            value = read(key)
            if room_key(value) == key:
                candidates.append(value)
    return candidates


def _int64(text: str) -> int:
    """An integer BSON can hold (a longer one could not be an `_id`, and would fail the query)."""
    value = int(text)
    if not -(2**63) <= value < 2**63:
        raise ValueError(text)
    return value


def _date(text: str) -> dt.datetime:
    """A date as `room_key` writes it (UTC, with a `Z`); BSON dates keep milliseconds."""
    when = dt.datetime.fromisoformat(text)
    if when.tzinfo is None:
        raise ValueError(text)
    return when
