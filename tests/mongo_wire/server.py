"""An asyncio TCP server speaking enough of MongoDB's wire protocol for PyMongo and the connector.

See the package docstring for what it implements and the documents it follows.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from bson import ObjectId
from bson.binary import Binary
from bson.int64 import Int64
from bson.timestamp import Timestamp

from tests.mongo_wire.query import (
    QueryError,
    apply_update,
    is_operator_update,
    matches,
    project,
    sort_docs,
)
from tests.mongo_wire.store import (
    HWM,
    INTERNAL_DBS,
    INVALIDATE,
    ChangeStream,
    CommandError,
    Position,
    Store,
    make_token,
)
from tests.mongo_wire.wire import HEADER, Request, WireError, parse, reply

log = logging.getLogger("tests.mongo_wire")

MAX_WIRE_VERSION = 21  # MongoDB 7.0: change stream pre-images, startAfter, snapshot reads
ELECTION_ID = ObjectId("7fffffff0000000000000001")
FULL_DOCUMENT = ("default", "updateLookup", "whenAvailable", "required")
BEFORE_CHANGE = ("off", "whenAvailable", "required")
# Fields any command may carry that are not the command's own arguments.
GENERIC_FIELDS = frozenset(
    {
        "$db",
        "lsid",
        "$clusterTime",
        "txnNumber",
        "writeConcern",
        "readConcern",
        "$readPreference",
        "comment",
        "maxTimeMS",
        "apiVersion",
        "apiStrict",
        "apiDeprecationErrors",
    }
)


class _Close(Exception):
    """Close the connection without replying (the failCommand fail point's closeConnection)."""


@dataclass
class Connection:
    id: int
    writer: asyncio.StreamWriter
    app_name: str | None = None


@dataclass
class FindCursor:
    ns: str
    docs: list[dict[str, Any]]


@dataclass
class StreamCursor:
    ns: str
    stream: ChangeStream
    max_await_ms: int = 1000


@dataclass
class FailPoint:
    """MongoDB's `failCommand` fail point, configured with the same command as on mongod."""

    mode: Any = "off"
    data: dict[str, Any] = field(default_factory=dict)
    entered: int = 0

    def applies(self, command: str, conn: Connection) -> bool:
        if self.mode == "off" or command not in self.data.get("failCommands", []):
            return False
        app = self.data.get("appName")
        if app is not None and app != conn.app_name:
            return False
        if isinstance(self.mode, Mapping):
            if self.mode.get("skip", 0) > 0:
                self.mode = {**self.mode, "skip": self.mode["skip"] - 1}
                return False
            times = self.mode.get("times")
            if times is not None:
                if times <= 0:
                    return False
                self.mode = {**self.mode, "times": times - 1}
        self.entered += 1
        return True


class MongoWireServer:
    """A single-node replica set primary (or a standalone) in memory, on a local TCP port."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        standalone: bool = False,
        set_name: str = "rs0",
    ) -> None:
        self.host = host
        self.port = port
        self.standalone = standalone
        self.set_name = set_name
        self.store = Store()
        self.fail_point = FailPoint()
        self.commands_seen: list[str] = []
        self.stream_batch = 1000
        """Events per getMore answer of a change stream without a batchSize (a real server
        fills up to 16 MiB: tens of thousands of small events)."""
        self._server: asyncio.Server | None = None
        self._connections: dict[int, Connection] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._conn_ids = itertools.count(1)
        self._cursor_ids = itertools.count(1_000_001)
        self.in_flight: dict[tuple[str, str], int] = {}
        """(command, client's appName) -> how many are being served now (`currentOp`, for
        tests that act while a command waits at a fail point)."""
        self.returned = 0
        """Documents sent in find and getMore batches (`serverStatus().metrics.document
        .returned`): what a test reads to see how much of a collection a query took."""
        self._reply_ids = itertools.count(1)
        self._cursors: dict[int, FindCursor | StreamCursor] = {}
        self._commands: dict[str, Callable[[Connection, dict[str, Any]], Awaitable[dict[str, Any]]]]
        self._commands = {
            "hello": self._hello,
            "isMaster": self._hello,
            "ismaster": self._hello,
            "ping": self._ok,
            "endSessions": self._ok,
            "buildInfo": self._build_info,
            "buildinfo": self._build_info,
            "saslStart": self._auth,
            "saslContinue": self._auth,
            "authenticate": self._auth,
            "insert": self._insert,
            "update": self._update,
            "delete": self._delete,
            "find": self._find,
            "aggregate": self._aggregate,
            "getMore": self._get_more,
            "killCursors": self._kill_cursors,
            "create": self._create,
            "drop": self._drop,
            "dropDatabase": self._drop_database,
            "renameCollection": self._rename,
            "collMod": self._coll_mod,
            "listCollections": self._list_collections,
            "listDatabases": self._list_databases,
            "configureFailPoint": self._configure_fail_point,
            "serverStatus": self._server_status,
        }

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"mongodb://{self.address}/"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self.drop_connections()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

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

    def drop_connections(self) -> None:
        """Close every client connection at once, as a network blip or a restart would."""
        for conn in list(self._connections.values()):
            conn.writer.close()

    # -- the connection loop -------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = Connection(next(self._conn_ids), writer)
        self._connections[conn.id] = conn
        try:
            while True:
                header = await reader.readexactly(HEADER.size)
                length, request_id, _, op_code = HEADER.unpack(header)
                body = await reader.readexactly(length - HEADER.size)
                request = parse(request_id, op_code, body)
                response = await self._dispatch(conn, request)
                if request.more_to_come:
                    continue
                writer.write(reply(request, next(self._reply_ids), response))
                await writer.drain()
        except (_Close, asyncio.IncompleteReadError, ConnectionError, WireError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.pop(conn.id, None)
            writer.close()
            self._tasks.discard(task)

    async def _dispatch(self, conn: Connection, request: Request) -> dict[str, Any]:
        cmd = request.command
        name = next(iter(cmd))
        self.commands_seen.append(name)
        running = (name, conn.app_name or "")
        self.in_flight[running] = self.in_flight.get(running, 0) + 1
        try:
            if name != "configureFailPoint" and self.fail_point.applies(name, conn):
                await self._fail(name)
            handler = self._commands.get(name)
            if handler is None:
                raise CommandError(59, "CommandNotFound", f"no such command: '{name}'")
            response = await handler(conn, cmd)
            response.setdefault("ok", 1.0)
        except CommandError as exc:
            response = {"ok": 0.0, "errmsg": str(exc), "code": exc.code, "codeName": exc.code_name}
            if exc.labels:
                response["errorLabels"] = exc.labels
        except QueryError as exc:
            response = {"ok": 0.0, "errmsg": str(exc), "code": exc.code, "codeName": "BadValue"}
        finally:
            self.in_flight[running] -= 1
        if name not in ("hello", "isMaster", "ismaster") and not self.standalone:
            now = self.store.last
            response["operationTime"] = now
            response["$clusterTime"] = {
                "clusterTime": now,
                "signature": {"hash": Binary(b"\x00" * 20), "keyId": 0},
            }
        return response

    async def _fail(self, name: str) -> None:
        data = self.fail_point.data
        if data.get("blockConnection"):
            await asyncio.sleep(data.get("blockTimeMS", 0) / 1000)
        if data.get("closeConnection"):
            raise _Close()
        if "errorCode" in data:
            labels = list(data.get("errorLabels", []))
            raise CommandError(
                int(data["errorCode"]),
                "FailPoint",
                f"Failing command {name} via 'failCommand' failpoint",
                labels,
            )

    # -- handshake and administration ----------------------------------------------------------

    async def _hello(self, conn: Connection, cmd: dict[str, Any]) -> dict[str, Any]:
        client = cmd.get("client")
        if isinstance(client, Mapping):
            conn.app_name = (client.get("application") or {}).get("name")
        name = next(iter(cmd))
        doc: dict[str, Any] = {
            "helloOk": True,
            ("isWritablePrimary" if name == "hello" else "ismaster"): True,
            "maxBsonObjectSize": 16 * 1024 * 1024,
            "maxMessageSizeBytes": 48_000_000,
            "maxWriteBatchSize": 100_000,
            "localTime": dt.datetime.now(dt.UTC),
            "logicalSessionTimeoutMinutes": 30,
            "connectionId": conn.id,
            "minWireVersion": 0,
            "maxWireVersion": MAX_WIRE_VERSION,
            "readOnly": False,
        }
        if not self.standalone:
            now = self.store.last
            doc.update(
                {
                    "setName": self.set_name,
                    "setVersion": 1,
                    "hosts": [self.address],
                    "primary": self.address,
                    "me": self.address,
                    "secondary": False,
                    "electionId": ELECTION_ID,
                    "lastWrite": {
                        "opTime": {"ts": now, "t": 1},
                        "lastWriteDate": dt.datetime.now(dt.UTC),
                        "majorityOpTime": {"ts": now, "t": 1},
                        "majorityWriteDate": dt.datetime.now(dt.UTC),
                    },
                }
            )
        return doc

    async def _ok(self, conn: Connection, cmd: dict[str, Any]) -> dict[str, Any]:
        return {}

    async def _server_status(self, conn: Connection, cmd: dict[str, Any]) -> dict[str, Any]:
        """Only the counter tests read (a real server's has hundreds of fields)."""
        return {"metrics": {"document": {"returned": Int64(self.returned)}}}

    async def _build_info(self, conn: Connection, cmd: dict[str, Any]) -> dict[str, Any]:
        return {
            "version": "7.0.0-wire-test-server",
            "versionArray": [7, 0, 0, 0],
            "gitVersion": "tests.mongo_wire",
            "bits": 64,
            "maxBsonObjectSize": 16 * 1024 * 1024,
        }

    async def _auth(self, conn: Connection, cmd: dict[str, Any]) -> dict[str, Any]:
        # This server has no users, which is what a real server says for unknown credentials.
        raise CommandError(18, "AuthenticationFailed", "Authentication failed.")

    async def _configure_fail_point(self, conn: Connection, cmd: dict[str, Any]) -> dict[str, Any]:
        if cmd["configureFailPoint"] != "failCommand":
            raise CommandError(
                2,
                "BadValue",
                f"this test server only has failCommand, not {cmd['configureFailPoint']}",
            )
        # Like mongod, "count" is how often the fail point was entered over its whole life.
        count = self.fail_point.entered
        self.fail_point = FailPoint(cmd.get("mode", "off"), dict(cmd.get("data") or {}), count)
        return {"count": count}

    # -- namespaces ----------------------------------------------------------------------------

    async def _create(self, conn: Connection, cmd: dict[str, Any]) -> dict[str, Any]:
        options = {k: v for k, v in cmd.items() if k != "create" and k not in GENERIC_FIELDS}
        self.store.create(cmd["$db"], cmd["create"], options)
        return {}

    async def _drop(self, conn: Connection, cmd: dict[str, Any]) -> dict[str, Any]:
        self.store.drop(cmd["$db"], cmd["drop"])
        return {"ns": f"{cmd['$db']}.{cmd['drop']}", "nIndexesWas": 1}

    async def _drop_database(self, conn: Connection, cmd: dict[str, Any]) -> dict[str, Any]:
        self.store.drop_database(cmd["$db"])
        return {"dropped": cmd["$db"]}

    async def _rename(self, conn: Connection, cmd: dict[str, Any]) -> dict[str, Any]:
        if cmd["$db"] != "admin":
            raise CommandError(
                13, "Unauthorized", "renameCollection may only be run against the admin database."
            )
        source = tuple(cmd["renameCollection"].split(".", 1))
        target = tuple(cmd["to"].split(".", 1))
        self.store.rename(source, target, bool(cmd.get("dropTarget")))
        return {}

    async def _coll_mod(self, conn: Connection, cmd: dict[str, Any]) -> dict[str, Any]:
        coll = self.store.collection(cmd["$db"], cmd["collMod"])
        if coll is None:
            raise CommandError(
                26, "NamespaceNotFound", f"ns does not exist: {cmd['$db']}.{cmd['collMod']}"
            )
        if "changeStreamPreAndPostImages" in cmd:
            coll.options["changeStreamPreAndPostImages"] = dict(cmd["changeStreamPreAndPostImages"])
        return {}

    async def _list_collections(self, conn: Connection, cmd: dict[str, Any]) -> dict[str, Any]:
        db = cmd["$db"]
        out = []
        for name, coll in self.store.dbs.get(db, {}).items():
            doc = {
                "name": name,
                "type": "collection",
                "options": dict(coll.options),
                "info": {"readOnly": False, "uuid": coll.uuid},
                "idIndex": {"v": 2, "key": {"_id": 1}, "name": "_id_"},
            }
            if matches(doc, cmd.get("filter") or {}):
                out.append({"name": name, "type": "collection"} if cmd.get("nameOnly") else doc)
        return {"cursor": {"id": 0, "ns": f"{db}.$cmd.listCollections", "firstBatch": out}}

    async def _list_databases(self, conn: Connection, cmd: dict[str, Any]) -> dict[str, Any]:
        names = sorted(self.store.dbs)
        if cmd.get("nameOnly"):
            return {"databases": [{"name": n} for n in names]}
        return {
            "databases": [{"name": n, "sizeOnDisk": 8192, "empty": False} for n in names],
            "totalSize": 8192 * len(names),
            "totalSizeMb": 0,
        }

    # -- writes --------------------------------------------------------------------------------

    async def _insert(self, conn: Connection, cmd: dict[str, Any]) -> dict[str, Any]:
        db, coll = cmd["$db"], cmd["insert"]
        n = 0
        errors = []
        for index, doc in enumerate(cmd.get("documents", [])):
            doc = dict(doc)
            if "_id" not in doc:
                doc = {"_id": ObjectId(), **doc}
            try:
                self.store.insert(db, coll, doc)
                n += 1
            except CommandError as exc:
                errors.append({"index": index, "code": exc.code, "errmsg": str(exc)})
                if cmd.get("ordered", True):
                    break
        response: dict[str, Any] = {"n": n}
        if errors:
            response["writeErrors"] = errors
        return response

    def _matching(self, db: str, coll_name: str, query: Mapping[str, Any]) -> list[dict[str, Any]]:
        coll = self.store.collection(db, coll_name)
        if coll is None:
            return []
        return [doc for doc in coll.docs() if matches(doc, query)]

    async def _update(self, conn: Connection, cmd: dict[str, Any]) -> dict[str, Any]:
        db, coll = cmd["$db"], cmd["update"]
        n = modified = 0
        upserted = []
        for index, spec in enumerate(cmd.get("updates", [])):
            found = self._matching(db, coll, spec["q"])
            if not spec.get("multi"):
                found = found[:1]
            if not found and spec.get("upsert"):
                seed = {
                    k: v
                    for k, v in spec["q"].items()
                    if not k.startswith("$") and not isinstance(v, Mapping)
                }
                seed.setdefault("_id", ObjectId())
                if is_operator_update(spec["u"]) or isinstance(spec["u"], list):
                    doc, _ = apply_update(seed, spec["u"])
                else:
                    doc = {"_id": seed["_id"], **{k: v for k, v in spec["u"].items() if k != "_id"}}
                self.store.insert(db, coll, doc)
                upserted.append({"index": index, "_id": doc["_id"]})
                n += 1
                continue
            for old in found:
                new, truncations = apply_update(old, spec["u"])
                n += 1
                if new == old:
                    continue  # a no-op update writes nothing to the oplog
                replace = not is_operator_update(spec["u"]) and not isinstance(spec["u"], list)
                self.store.replace_or_update(db, coll, old, new, replace, truncations)
                modified += 1
        response: dict[str, Any] = {"n": n, "nModified": modified}
        if upserted:
            response["upserted"] = upserted
        return response

    async def _delete(self, conn: Connection, cmd: dict[str, Any]) -> dict[str, Any]:
        db, coll = cmd["$db"], cmd["delete"]
        n = 0
        for spec in cmd.get("deletes", []):
            found = self._matching(db, coll, spec["q"])
            if spec.get("limit", 0) == 1:
                found = found[:1]
            for doc in found:
                self.store.delete(db, coll, doc)
                n += 1
        return {"n": n}

    # -- reads and cursors ---------------------------------------------------------------------

    def _cursor_reply(
        self,
        ns: str,
        docs: list[dict[str, Any]],
        batch_size: int | None,
        first: bool,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        size = len(docs) if batch_size in (None, 0) and not first else (batch_size or 101)
        batch, rest = docs[:size], docs[size:]
        cursor_id = 0
        if rest:
            cursor_id = next(self._cursor_ids)
            self._cursors[cursor_id] = FindCursor(ns, rest)
        key = "firstBatch" if first else "nextBatch"
        self.returned += len(batch)
        return {"cursor": {key: batch, "id": cursor_id, "ns": ns, **(extra or {})}}

    def _read_time(self, cmd: Mapping[str, Any]) -> Timestamp | None:
        concern = cmd.get("readConcern") or {}
        at: Timestamp | None = concern.get("atClusterTime")
        if at is None:
            return None
        if concern.get("level") != "snapshot":
            raise CommandError(2, "BadValue", "atClusterTime is only allowed with level snapshot")
        if at < self.store.floor:
            raise CommandError(
                239,
                "SnapshotTooOld",
                "Read timestamp is older than the oldest available timestamp.",
            )
        if at > self.store.last:
            raise CommandError(2, "BadValue", "atClusterTime must not be in the future")
        return at

    async def _find(self, conn: Connection, cmd: dict[str, Any]) -> dict[str, Any]:
        db, name = cmd["$db"], cmd["find"]
        at = self._read_time(cmd)
        coll = self.store.collection(db, name)
        docs = [d for d in (coll.docs(at) if coll else []) if matches(d, cmd.get("filter") or {})]
        docs = sort_docs(docs, cmd.get("sort"))
        docs = docs[cmd.get("skip", 0) :]
        limit = cmd.get("limit", 0)
        if limit:
            docs = docs[: abs(limit)]
        docs = [project(d, cmd.get("projection")) for d in docs]
        extra = {}
        if (cmd.get("readConcern") or {}).get("level") == "snapshot":
            extra["atClusterTime"] = at if at is not None else self.store.last
        batch_size = cmd.get("batchSize")
        if cmd.get("singleBatch") or (limit and limit < 0):
            batch_size = len(docs) or 1
        return self._cursor_reply(f"{db}.{name}", docs, batch_size, True, extra)

    async def _aggregate(self, conn: Connection, cmd: dict[str, Any]) -> dict[str, Any]:
        pipeline = list(cmd.get("pipeline", []))
        if pipeline and "$changeStream" in pipeline[0]:
            return self._open_change_stream(cmd, pipeline)
        db, name = cmd["$db"], cmd["aggregate"]
        coll = self.store.collection(db, name) if isinstance(name, str) else None
        docs = list(coll.docs(self._read_time(cmd))) if coll else []
        for stage in pipeline:
            ((op, spec),) = stage.items()
            if op == "$match":
                docs = [d for d in docs if matches(d, spec)]
            elif op == "$sort":
                docs = sort_docs(docs, spec)
            elif op == "$skip":
                docs = docs[spec:]
            elif op == "$limit":
                docs = docs[:spec]
            elif op == "$project":
                docs = [project(d, spec) for d in docs]
            elif op == "$group" and set(spec) == {"_id", "n"} and spec["n"] == {"$sum": 1}:
                docs = [{"_id": spec["_id"], "n": len(docs)}] if docs else []
            else:
                raise CommandError(
                    40324, "Location40324", f"Unsupported stage in this test server: {op}"
                )
        batch_size = (cmd.get("cursor") or {}).get("batchSize")
        return self._cursor_reply(f"{db}.{name}", docs, batch_size, True)

    def _open_change_stream(self, cmd: dict[str, Any], pipeline: list[Any]) -> dict[str, Any]:
        if self.standalone:
            raise CommandError(
                40573, "Location40573", "The $changeStream stage is only supported on replica sets"
            )
        spec = dict(pipeline[0]["$changeStream"])
        db, target = cmd["$db"], cmd["aggregate"]
        if spec.get("allChangesForCluster"):
            if db != "admin" or target != 1:
                raise CommandError(
                    72,
                    "InvalidOptions",
                    "A $changeStream with 'allChangesForCluster:true' may only be opened on the 'admin' database",
                )
            scope_db, scope_coll = None, None
        elif target == 1:
            scope_db, scope_coll = db, None
        else:
            scope_db, scope_coll = db, target
        if scope_db in INTERNAL_DBS:
            # mongod (document_source_change_stream.cpp assertIsLegalSpecification)
            raise CommandError(
                73,
                "InvalidNamespace",
                f"$changeStream may not be opened on the internal {scope_db} database",
            )
        if scope_coll is not None and scope_coll.startswith("system."):
            raise CommandError(
                73,
                "InvalidNamespace",
                f"$changeStream may not be opened on the internal {db}.{scope_coll} collection",
            )
        full_document = spec.get("fullDocument", "default")
        before = spec.get("fullDocumentBeforeChange", "off")
        if full_document not in FULL_DOCUMENT or before not in BEFORE_CHANGE:
            raise CommandError(
                2, "BadValue", f"invalid fullDocument options: {full_document!r}, {before!r}"
            )
        given = [k for k in ("resumeAfter", "startAfter", "startAtOperationTime") if k in spec]
        if len(given) > 1:
            raise CommandError(
                40674,
                "Location40674",
                "Only one type of resume option is allowed, but multiple were found.",
            )
        if "resumeAfter" in spec or "startAfter" in spec:
            position = Position.parse(spec.get("resumeAfter") or spec.get("startAfter"))
            if position.kind == INVALIDATE and "resumeAfter" in spec:
                raise CommandError(
                    260,
                    "InvalidResumeToken",
                    "Attempting to resume a change stream using 'resumeAfter' is not allowed from an invalidate notification.",
                )
        elif "startAtOperationTime" in spec:
            position = Position(spec["startAtOperationTime"], 0, HWM)
        else:
            position = Position(self.store.tick(), 0, HWM)
        batch_size = (cmd.get("cursor") or {}).get("batchSize")
        stream = ChangeStream(
            self.store,
            scope_db,
            scope_coll,
            pipeline[1:],
            full_document,
            before,
            position,
        )
        ns = f"{db}.{target}" if isinstance(target, str) else f"{db}.$cmd.aggregate"
        if batch_size == 0:
            batch: list[dict[str, Any]] = []
            token = dict(spec.get("startAfter") or spec.get("resumeAfter") or {}) or None
            if token is None:
                token = make_token(position.ts, HWM, 0, self.store.run)
        else:
            stream.batch_size = batch_size or 101
            batch, token = stream.next_batch()
            stream.batch_size = self.stream_batch
        cursor_id = 0
        if not stream.finished:
            cursor_id = next(self._cursor_ids)
            self._cursors[cursor_id] = StreamCursor(ns, stream)
        return {
            "cursor": {
                "firstBatch": batch,
                "postBatchResumeToken": token,
                "id": cursor_id,
                "ns": ns,
            }
        }

    async def _get_more(self, conn: Connection, cmd: dict[str, Any]) -> dict[str, Any]:
        cursor_id = cmd["getMore"]
        cursor = self._cursors.get(cursor_id)
        if cursor is None:
            raise CommandError(43, "CursorNotFound", f"cursor id {cursor_id} not found")
        if isinstance(cursor, FindCursor):
            size = cmd.get("batchSize") or len(cursor.docs)
            batch, cursor.docs = cursor.docs[:size], cursor.docs[size:]
            if not cursor.docs:
                del self._cursors[cursor_id]
                cursor_id = 0
            self.returned += len(batch)
            return {"cursor": {"nextBatch": batch, "id": cursor_id, "ns": cursor.ns}}
        stream = cursor.stream
        if cmd.get("batchSize"):
            stream.batch_size = cmd["batchSize"]
        wait = cmd.get("maxTimeMS", cursor.max_await_ms) / 1000
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        try:
            batch, token = stream.next_batch()
            while not batch and not stream.finished and loop.time() < deadline:
                await self.store.wait_for_write(deadline - loop.time())
                batch, token = stream.next_batch()
        except CommandError:
            self._cursors.pop(cursor_id, None)
            raise
        if stream.finished:
            self._cursors.pop(cursor_id, None)
            cursor_id = 0
        return {
            "cursor": {
                "nextBatch": batch,
                "postBatchResumeToken": token,
                "id": cursor_id,
                "ns": cursor.ns,
            }
        }

    async def _kill_cursors(self, conn: Connection, cmd: dict[str, Any]) -> dict[str, Any]:
        killed: list[int] = []
        missing: list[int] = []
        for cursor_id in cmd.get("cursors", []):
            (killed if self._cursors.pop(cursor_id, None) is not None else missing).append(
                cursor_id
            )
        return {
            "cursorsKilled": killed,
            "cursorsNotFound": missing,
            "cursorsAlive": [],
            "cursorsUnknown": [],
        }
