"""A MongoDB wire-protocol test server, because no real MongoDB can run on the build machines.

The real PyMongo driver talks to it over TCP, so the connector's whole code path runs: server
discovery and monitoring, sessions, OP_MSG framing, change stream resumption inside the driver.
It keeps everything in memory and implements only what the connector and its tests use:

- Framing (MongoDB Wire Protocol, https://www.mongodb.com/docs/manual/reference/mongodb-wire-protocol/):
  a legacy OP_QUERY `hello`/`isMaster` handshake answered with OP_REPLY, and OP_MSG with kind-0
  body and kind-1 document sequence sections and the checksumPresent and moreToCome flags
  (tests/test_mongodb_wire_protocol.py checks these byte for byte).
- Commands: hello/isMaster (a single-node replica set primary, or a standalone with
  `standalone=True`), ping, buildInfo, endSessions, saslStart (always AuthenticationFailed: the
  server has no users), insert, update (operators, replacements, pipeline updates, upserts),
  delete, find (with `readConcern: {level: "snapshot", atClusterTime}` served from per-document
  version history), aggregate, getMore with awaitData and maxTimeMS, killCursors, create, drop,
  dropDatabase, renameCollection, collMod (changeStreamPreAndPostImages), listCollections,
  listDatabases, and configureFailPoint with mongod's own `failCommand` fail point
  (failCommands, errorCode, errorLabels, closeConnection, blockConnection, appName; modes
  alwaysOn, off, {times}, {skip}), so fault-injection tests also run unchanged against a real
  mongod started with `--setParameter enableTestCommands=1`.
- Change streams: `$changeStream` on a collection, a database or the cluster
  (allChangesForCluster) with resumeAfter, startAfter, startAtOperationTime, fullDocument
  (default, updateLookup, whenAvailable, required), fullDocumentBeforeChange (off,
  whenAvailable, required) served from pre- and post-images kept when the collection has
  changeStreamPreAndPostImages enabled (a required one missing is NoMatchingDocument, 47, also
  for the event a resume token names, which mongod reads again), refused on
  admin, config, local and system.* collections (InvalidNamespace, 73), `$match` and `$unset`
  stages after it, BSONObjectTooLarge (10334) for an event over 16 MB, postBatchResumeToken on every
  batch (a high-water mark that advances while idle, as the periodic noop writer makes it do on
  a real replica set), invalidate after drop/rename/dropDatabase, and ChangeStreamHistoryLost
  (286) for resume points before `store.truncate_oplog()` (CappedPositionLost, 136, for the
  getMore of a stream open across it); ChangeStreamFatalError (280) "the
  resume token was not found" for an event token of this run that names no event in the oplog.

Event documents follow MongoDB's change event reference
(https://www.mongodb.com/docs/manual/reference/change-events/): `_id` (resume token with
`_data`), operationType, clusterTime, wallTime, ns, documentKey, fullDocument,
fullDocumentBeforeChange, updateDescription (updatedFields, removedFields, truncatedArrays) and
`to` for renames. Resumability follows the drivers' Change Streams specification
(https://github.com/mongodb/specifications/blob/master/source/change-streams/change-streams.md):
errors from getMore labelled ResumableChangeStreamError, network errors and CursorNotFound are
resumable; an aggregate error is not; the driver caches postBatchResumeToken and resumes with
startAfter until the first event, resumeAfter afterwards.

Known differences from mongod: no indexes, no transactions, no write concern, no access control,
tokens that only this server can decode beyond their leading cluster time, and queries limited
to the operators in `query.py`.
"""

from tests.mongo_wire.server import MongoWireServer

__all__ = ["MongoWireServer"]
