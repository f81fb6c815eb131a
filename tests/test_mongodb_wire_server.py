"""Server behaviours the connector relies on, written with plain PyMongo.

They hold for a real replica set too (run them with FEED_TEST_MONGODB_URL), which is how the wire
test server's fidelity is checked against mongod itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pymongo import AsyncMongoClient
from pymongo.errors import OperationFailure, WriteError

from tests.mongo_wire import MongoWireServer
from tests.support.mongodb import MongoSource, mongodb  # noqa: F401

pytestmark = pytest.mark.mongodb
WAIT = 10.0


@pytest.fixture
async def coll(mongodb: MongoSource) -> AsyncIterator[Any]:  # noqa: F811
    name = MongoSource.unique()
    await mongodb.client[name].create_collection("c")
    yield mongodb.client[name]["c"]
    await mongodb.client.drop_database(name)


async def next_event(stream: Any) -> dict[str, Any]:
    async with asyncio.timeout(WAIT):
        while True:
            event = await stream.try_next()
            if event is not None:
                return dict(event)


async def test_start_at_operation_time_is_inclusive(mongodb: MongoSource, coll: Any) -> None:  # noqa: F811
    async with mongodb.client.start_session() as session:
        await coll.insert_one({"_id": "a"}, session=session)
        at = session.operation_time
    await coll.insert_one({"_id": "b"})
    async with await coll.watch(start_at_operation_time=at, max_await_time_ms=100) as stream:
        first, second = await next_event(stream), await next_event(stream)
    assert [first["documentKey"]["_id"], second["documentKey"]["_id"]] == ["a", "b"]
    assert first["clusterTime"] == at


async def test_post_batch_token_resumes_after_the_batch(mongodb: MongoSource, coll: Any) -> None:  # noqa: F811
    async with await coll.watch(max_await_time_ms=100) as stream:
        await coll.insert_one({"_id": 1})
        await next_event(stream)
        assert await stream.try_next() is None  # an empty batch: the token is the batch's end
        token = stream.resume_token
    await coll.insert_one({"_id": 2})
    async with await coll.watch(start_after=token, max_await_time_ms=100) as stream:
        event = await next_event(stream)
    assert event["documentKey"] == {"_id": 2}


async def test_invalidate_allows_start_after_but_not_resume_after(
    mongodb: MongoSource,  # noqa: F811
    coll: Any,
) -> None:
    async with await coll.watch(max_await_time_ms=100) as stream:
        await coll.drop()
        drop, invalidate = await next_event(stream), await next_event(stream)
    assert (drop["operationType"], invalidate["operationType"]) == ("drop", "invalidate")
    with pytest.raises(OperationFailure) as caught:
        async with await coll.watch(resume_after=invalidate["_id"]) as stream:
            await stream.try_next()
    assert caught.value.code == 260
    async with await coll.watch(start_after=invalidate["_id"], max_await_time_ms=100) as stream:
        await coll.insert_one({"_id": "again"})
        event = await next_event(stream)
    assert event["operationType"] == "insert"


async def test_snapshot_read_at_a_cluster_time_sees_that_state(
    mongodb: MongoSource,  # noqa: F811
    coll: Any,
) -> None:
    async with mongodb.client.start_session() as session:
        await coll.insert_one({"_id": 1, "v": "old"}, session=session)
        at = session.operation_time
    await coll.update_one({"_id": 1}, {"$set": {"v": "new"}})
    await coll.insert_one({"_id": 2, "v": "new"})
    cursor = await coll.database.cursor_command(
        "find", coll.name, readConcern={"level": "snapshot", "atClusterTime": at}
    )
    rows = await cursor.to_list()
    assert rows == [{"_id": 1, "v": "old"}]


async def test_an_id_is_never_an_array(coll: Any) -> None:
    """mongod refuses an array `_id` (BadValue): a row key never has to stand for one."""
    with pytest.raises(WriteError) as refused:
        await coll.insert_one({"_id": [1, 2]})
    assert refused.value.code == 2 and "array for _id" in str(refused.value)
    await coll.insert_one({"_id": {"a": [1, 2]}})  # an array inside a document is fine


async def test_an_event_a_match_filters_out_never_needs_its_required_pre_image(
    mongodb: MongoSource,  # noqa: F811
) -> None:
    """mongod pushes a `$match` on `ns` down into its oplog scan (its change stream rewrites),
    so the image lookup never sees an event the `$match` drops: a cluster-wide stream with
    required pre-images, filtered to collections that keep them, is not failed by a write to
    one that does not (the connector's own resume token collection, say). The wire server
    failed it, and a cluster stream with `full_document_before_change = "required"` never got
    past the connector's first token save."""
    name = MongoSource.unique()
    images: dict[str, Any] = {"changeStreamPreAndPostImages": {"enabled": True}}
    kept = await mongodb.client[name].create_collection("kept", **images)
    plain = await mongodb.client[name].create_collection("plain")
    try:
        await kept.insert_one({"_id": 1, "n": 0})
        await plain.insert_one({"_id": 1, "n": 0})
        match = {"$match": {"$nor": [{"ns.db": name, "ns.coll": "plain"}]}}
        async with await mongodb.client.watch(
            [match], full_document_before_change="required", max_await_time_ms=200
        ) as stream:
            await plain.update_one({"_id": 1}, {"$inc": {"n": 1}})
            await kept.update_one({"_id": 1}, {"$inc": {"n": 1}})
            event = await next_event(stream)
            assert event["ns"] == {"db": name, "coll": "kept"}
            assert event["fullDocumentBeforeChange"] == {"_id": 1, "n": 0}
    finally:
        await mongodb.client.drop_database(name)


async def test_a_token_of_another_wire_server_run_is_history_lost() -> None:
    """Wire server only: a restarted wire server starts empty, a new deployment whose oplog
    never held a token the old one handed out. Resuming there is ChangeStreamHistoryLost, as
    mongod answers for a token its oplog does not hold; before, a token no older than the new
    server's start was taken as a place in its oplog, and a connector resumed silently over
    the writes lost with the old server's data."""
    async with MongoWireServer() as before, MongoWireServer() as after:
        old: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(before.url, directConnection=True)
        new: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(after.url, directConnection=True)
        try:
            await old.shop.orders.insert_one({"_id": 1})  # later than `after` started
            async with await old.shop.orders.watch() as stream:
                await stream.try_next()
                token = stream.resume_token
            await new.shop.create_collection("orders")
            with pytest.raises(OperationFailure) as caught:
                await new.shop.orders.watch(resume_after=token)
            assert caught.value.code == 286
        finally:
            await old.close()
            await new.close()


async def test_no_change_stream_on_internal_databases_or_system_collections(
    mongodb: MongoSource,  # noqa: F811
) -> None:
    """mongod refuses a change stream on admin, config and local, and on a system.*
    collection (InvalidNamespace, 73): the connector refuses such a `watch` in the config. The
    wire server opened them."""
    for target in (mongodb.client.admin, mongodb.client.local, mongodb.client.shop["system.js"]):
        with pytest.raises(OperationFailure) as caught:
            async with await target.watch():
                pass
        assert caught.value.code == 73, caught.value


async def test_a_missing_required_image_is_no_matching_document(
    mongodb: MongoSource,  # noqa: F811
    coll: Any,
) -> None:
    """A required pre-image that was not recorded fails the stream with NoMatchingDocument
    (47), "Change stream was configured to require a pre-image ... but the pre-image was not
    found for event" (mongod's document_source_change_stream_add_pre_image.cpp), not a
    labelled ChangeStreamFatalError (280): the wire server answered 280, the code mongod gives
    a resume token it cannot find."""
    await coll.insert_one({"_id": 1, "n": 0})
    async with await coll.watch(
        full_document_before_change="required", max_await_time_ms=200
    ) as stream:
        await coll.update_one({"_id": 1}, {"$inc": {"n": 1}})
        with pytest.raises(OperationFailure) as caught:
            await next_event(stream)
    assert caught.value.code == 47, caught.value
    assert "require a pre-image" in str(caught.value)
    assert not caught.value.has_error_label("ResumableChangeStreamError")


async def test_resuming_after_an_event_without_its_required_pre_image_fails(
    mongodb: MongoSource,  # noqa: F811
    coll: Any,
) -> None:
    """mongod reads the event a resume token names again, through its image lookups, before it
    drops it: resuming after an update written without a pre-image
    with fullDocumentBeforeChange "required" fails with NoMatchingDocument, though that update
    is not returned and every later one has its image; "whenAvailable" resumes. The wire server
    resumed, so the connector's answer to it (it asks for "whenAvailable" and checks
    "required" itself) went untested."""
    await coll.insert_one({"_id": 1, "v": 0})
    async with await coll.watch(max_await_time_ms=200) as stream:
        await coll.update_one({"_id": 1}, {"$set": {"v": 1}})
        token = (await next_event(stream))["_id"]
    await coll.database.command(
        {"collMod": coll.name, "changeStreamPreAndPostImages": {"enabled": True}}
    )
    await coll.update_one({"_id": 1}, {"$set": {"v": 2}})
    async with await coll.watch(
        start_after=token, full_document_before_change="whenAvailable", max_await_time_ms=200
    ) as stream:
        event = await next_event(stream)
        assert event["fullDocumentBeforeChange"] == {"_id": 1, "v": 1}
    with pytest.raises(OperationFailure) as caught:
        async with await coll.watch(
            start_after=token, full_document_before_change="required", max_await_time_ms=200
        ) as stream:
            await next_event(stream)
    assert caught.value.code == 47, caught.value


async def test_an_open_stream_the_oplog_rolls_past_gets_capped_position_lost(
    mongodb: MongoSource,  # noqa: F811
    coll: Any,
) -> None:
    """Wire server only (a real oplog cannot be truncated from a client). mongod's getMore on
    an open stream whose place left the oplog fails as any capped scan does:
    CappedPositionLost (136), unlabelled; resuming there is
    ChangeStreamHistoryLost (286). The wire server answered 286 on the getMore."""
    if mongodb.wire is None:
        pytest.skip("needs the wire server: a real oplog cannot be truncated from a client")
    await coll.insert_one({"_id": 1})
    async with await coll.watch(max_await_time_ms=200) as stream:
        await coll.insert_one({"_id": 2})
        token = (await next_event(stream))["_id"]
        mongodb.wire.store.truncate_oplog()
        with pytest.raises(OperationFailure) as caught:
            await next_event(stream)
    assert caught.value.code == 136, caught.value
    assert not caught.value.has_error_label("ResumableChangeStreamError")
    with pytest.raises(OperationFailure) as resumed:
        async with await coll.watch(resume_after=token) as stream:
            await stream.try_next()
    assert resumed.value.code == 286


async def test_an_event_over_16_mb_fails_its_batch_unless_reshaped(
    mongodb: MongoSource,  # noqa: F811
    coll: Any,
) -> None:
    """A change event over 16 MB (a 9 MB document's update with its pre- and post-images) fails
    the batch with BSONObjectTooLarge (10334), and so every stream reopened before it; an
    `$unset` of its documents lets it through (MongoDB's "Large Change Stream Events"). The
    wire server sent events of any size, so a connector stopped there for good went untested."""
    await coll.database.command(
        {"collMod": coll.name, "changeStreamPreAndPostImages": {"enabled": True}}
    )
    await coll.insert_one({"_id": 1, "blob": "x" * (9 * 1024 * 1024)})
    async with await coll.watch(
        full_document="required",
        full_document_before_change="required",
        max_await_time_ms=200,
    ) as stream:
        token = stream.resume_token
        await coll.update_one({"_id": 1}, {"$set": {"blob": "y" * (9 * 1024 * 1024)}})
        with pytest.raises(OperationFailure) as caught:
            await next_event(stream)
    assert caught.value.code == 10334, caught.value
    stripped = [{"$unset": ["fullDocument", "fullDocumentBeforeChange", "updateDescription"]}]
    async with await coll.watch(
        stripped, start_after=token, full_document="required", max_await_time_ms=200
    ) as stream:
        event = await next_event(stream)
    assert event["operationType"] == "update" and event["documentKey"] == {"_id": 1}
    assert "fullDocument" not in event and "updateDescription" not in event
