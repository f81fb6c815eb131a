"""The MongoDB connector against a real PyMongo connection (wire server, or FEED_TEST_MONGODB_URL).

Every test here is source-agnostic: it writes through PyMongo and reads what the connector
yields, so it runs unchanged against a real replica set.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import json
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import pytest
from bson import Binary, Decimal128, ObjectId

from connectors.base import RoomAddress
from connectors.mongodb import MongoConnector
from connectors.mongodb_events import cluster_time_of, token_of
from feed.core.change import Change, Gap
from feed.core.rooms import Room
from tests.connector_contract import ConnectorContract, generator, streaming
from tests.support.mongodb import MongoSource, changes, db, make, mongodb, take  # noqa: F401
from tests.support.waiting import stopped

pytestmark = pytest.mark.mongodb
WAIT = 15.0


# -- the shared connector contract ---------------------------------------------------------------


class MongoHarness:
    def __init__(self, source: MongoSource, database: str) -> None:
        self.source = source
        self.db = database
        self.target = f"{database}.orders"
        self.name = MongoSource.unique("contract")

    def make_connector(self) -> MongoConnector:
        # Post-images: an update's `after` is that update's result even if the document is
        # deleted before the event is read (updateLookup would give None then).
        return make(
            self.source,
            [self.target],
            name=self.name,
            full_document="whenAvailable",
            full_document_before_change="whenAvailable",
        )

    def row_key(self, key: str) -> str:
        return key

    @property
    def coll(self) -> Any:
        return self.source.client[self.db]["orders"]

    async def create(self, key: str, fields: Mapping[str, Any]) -> None:
        await self.coll.insert_one({"_id": key, **fields})

    async def modify(self, key: str, fields: Mapping[str, Any]) -> None:
        await self.coll.update_one({"_id": key}, {"$set": dict(fields)})

    async def remove(self, key: str) -> None:
        await self.coll.delete_one({"_id": key})


class TestMongoConnectorContract(ConnectorContract):
    @pytest.fixture
    async def harness(self, mongodb: MongoSource) -> MongoHarness:  # noqa: F811
        database = MongoSource.unique()
        await mongodb.client[database].create_collection(
            "orders", changeStreamPreAndPostImages={"enabled": True}
        )
        return MongoHarness(mongodb, database)


# -- event shapes ----------------------------------------------------------------------------------


async def test_insert_update_replace_delete_carry_documents_and_descriptions(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    coll = mongodb.client[db]["orders"]
    async with streaming(make(mongodb, f"{db}.orders")) as stream:
        await coll.insert_one({"_id": 1, "status": "new", "tags": ["a", "b", "c"], "note": "x"})
        await coll.update_one({"_id": 1}, {"$set": {"status": "paid"}, "$unset": {"note": ""}})
        await coll.update_one({"_id": 1}, [{"$set": {"tags": {"$slice": ["$tags", 1]}}}])
        await coll.replace_one({"_id": 1}, {"status": "shipped"})
        await coll.delete_one({"_id": 1})
        insert, update, truncate, replace, delete = await changes(stream, 5)

    assert [c.op for c in (insert, update, truncate, replace, delete)] == [
        "insert",
        "update",
        "update",
        "replace",
        "delete",
    ]
    assert {c.target for c in (insert, update, replace, delete)} == {f"{db}.orders"}
    assert all(c.key == 1 and c.row_key == "1" and c.source == "mongodb" for c in [insert, delete])
    assert insert.after == {"_id": 1, "status": "new", "tags": ["a", "b", "c"], "note": "x"}
    assert update.meta is not None, "an update carries MongoDB's updateDescription"
    description = update.meta["updateDescription"]
    assert description["updatedFields"] == {"status": "paid"}
    assert description["removedFields"] == ["note"]
    assert truncate.meta and truncate.meta["updateDescription"]["truncatedArrays"] == [
        {"field": "tags", "newSize": 1}
    ]
    # updateLookup (the default) reads the document when the event is read: by then it is gone.
    assert replace.after == {"_id": 1, "status": "shipped"}
    assert delete.after is None and delete.before is None
    assert insert.ts is not None and insert.ts.tzinfo is not None
    assert abs((dt.datetime.now(dt.UTC) - insert.ts).total_seconds()) < 60
    assert len({c.id for c in (insert, update, truncate, replace, delete)}) == 5


async def test_update_lookup_off_and_pre_images(mongodb: MongoSource, db: str) -> None:  # noqa: F811
    client = mongodb.client
    await client[db].command(
        {"collMod": "orders", "changeStreamPreAndPostImages": {"enabled": True}}
    )
    coll = client[db]["orders"]
    connector = make(
        mongodb, f"{db}.orders", full_document="off", full_document_before_change="whenAvailable"
    )
    async with streaming(connector) as stream:
        await coll.insert_one({"_id": "k", "n": 1})
        await coll.update_one({"_id": "k"}, {"$inc": {"n": 1}})
        await coll.delete_one({"_id": "k"})
        insert, update, delete = await changes(stream, 3)
    assert insert.after == {"_id": "k", "n": 1}  # inserts always carry the document
    assert update.after is None  # full_document = "off": only the description
    assert update.meta and update.meta["updateDescription"]["updatedFields"] == {"n": 2}
    assert update.before == {"_id": "k", "n": 1}
    assert delete.before == {"_id": "k", "n": 2}


async def test_post_images_when_available(mongodb: MongoSource, db: str) -> None:  # noqa: F811
    client = mongodb.client
    await client[db].command(
        {"collMod": "orders", "changeStreamPreAndPostImages": {"enabled": True}}
    )
    coll = client[db]["orders"]
    async with streaming(make(mongodb, f"{db}.orders", full_document="whenAvailable")) as stream:
        await coll.insert_one({"_id": "k", "n": 1})
        await coll.update_one({"_id": "k"}, {"$inc": {"n": 1}})
        await coll.delete_one({"_id": "k"})
        _, update, _ = await changes(stream, 3)
    # Unlike updateLookup, the post-image is the document as this update left it.
    assert update.after == {"_id": "k", "n": 2}


async def test_bson_types_become_json(mongodb: MongoSource, db: str) -> None:  # noqa: F811
    coll = mongodb.client[db]["orders"]
    oid = ObjectId()
    when = dt.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=dt.UTC)
    doc = {
        "_id": oid,
        "price": Decimal128(Decimal("19.99")),
        "at": when,
        "blob": Binary(b"\x00\x01hi"),
        "uid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "nested": {"a": [1, {"b": None}], "ok": True},
    }
    connector = make(mongodb, f"{db}.orders")
    async with streaming(connector) as stream:
        await coll.insert_one(doc)
        [insert] = await changes(stream, 1)
        pulling = asyncio.create_task(anext(stream))  # keep the stream moving, as the hub does
        try:
            snap = await asyncio.wait_for(
                connector.snapshot(RoomAddress(f"{db}.orders"), lambda row: True, 10), WAIT
            )
        finally:
            await stopped(pulling)
    assert snap.rows == [insert.after]  # snapshots and changes decode BSON the same way
    body = json.loads(json.dumps(insert.wire))
    assert insert.row_key == str(oid)
    assert body["key"] == {"$oid": str(oid)}
    after = body["after"]
    assert after["_id"] == {"$oid": str(oid)}
    assert after["price"] == {"$numberDecimal": "19.99"}
    assert after["at"] == "2026-01-02T03:04:05.678000Z"
    assert after["blob"] == "AAFoaQ=="
    assert after["uid"] == "12345678-1234-5678-1234-567812345678"
    assert after["nested"] == {"a": [1, {"b": None}], "ok": True}


async def test_database_watch_routes_each_collection(mongodb: MongoSource, db: str) -> None:  # noqa: F811
    client = mongodb.client
    await client[db].create_collection("customers")
    connector = make(mongodb, db)
    async with streaming(connector) as stream:
        assert {f"{db}.orders", f"{db}.customers"} <= set(connector.targets())
        await client[db]["orders"].insert_one({"_id": 1})
        await client[db]["customers"].insert_one({"_id": 2})
        await client[db]["brand_new"].insert_one({"_id": 3})
        got = await changes(stream, 3)
    assert [(c.target, c.key) for c in got] == [
        (f"{db}.orders", 1),
        (f"{db}.customers", 2),
        (f"{db}.brand_new", 3),
    ]
    assert f"{db}.brand_new" in connector.targets()
    assert connector.resolve(f"{db}.later:42") == RoomAddress(f"{db}.later", "42")
    assert connector.resolve(f"{db}.orders") == RoomAddress(f"{db}.orders")
    assert connector.resolve("otherdb.orders") is None


async def test_several_collections_across_databases(mongodb: MongoSource, db: str) -> None:  # noqa: F811
    client = mongodb.client
    other = MongoSource.unique()
    await client[other].create_collection("items")
    try:
        connector = make(mongodb, [f"{db}.orders", f"{other}.items"])
        async with streaming(connector) as stream:
            await client[db]["ignored"].insert_one({"_id": 0})
            await client[db]["orders"].insert_one({"_id": 1})
            await client[other]["items"].insert_one({"_id": 2})
            got = await changes(stream, 2)
        assert [(c.target, c.key) for c in got] == [(f"{db}.orders", 1), (f"{other}.items", 2)]
    finally:
        await client.drop_database(other)


async def test_drop_invalidates_then_gap_then_stream_continues(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    client = mongodb.client
    async with streaming(make(mongodb, f"{db}.orders")) as stream:
        await client[db]["orders"].insert_one({"_id": 1})
        await client[db].drop_collection("orders")
        insert, drop, invalidate, gap = await take(stream, 4)
        await client[db]["orders"].insert_one({"_id": 2})
        [again] = await changes(stream, 1)
    assert isinstance(insert, Change) and insert.op == "insert"
    assert isinstance(drop, Change) and drop.op == "drop" and drop.target == f"{db}.orders"
    assert isinstance(invalidate, Change) and invalidate.op == "invalidate"
    assert isinstance(gap, Gap) and "invalidated" in gap.reason and gap.target == f"{db}.orders"
    assert isinstance(again, Change) and again.key == 2


async def test_rename_is_reported_with_its_destination(mongodb: MongoSource, db: str) -> None:  # noqa: F811
    client = mongodb.client
    async with streaming(make(mongodb, db)) as stream:
        await client[db]["orders"].rename("archive")
        [rename] = await changes(stream, 1)
    assert rename.op == "rename" and rename.target == f"{db}.orders"
    assert rename.meta == {"to": f"{db}.archive"}


async def test_a_buffered_change_from_a_stream_leaves_the_collector(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    """What a room's replay buffer keeps of a MongoDB change (its position included: cluster
    time and resume token) is let go of by the collector's young passes, as for the other
    sources, so buffered changes do not bring its full passes on. A `Timestamp` or a class
    instance in the position kept every buffered change tracked."""
    coll = mongodb.client[db]["orders"]
    connector = make(mongodb, f"{db}.orders")
    async with streaming(connector) as stream:
        await coll.insert_many([{"_id": i, "status": "paid", "n": i / 2} for i in range(20)])
        got = await changes(stream, 20)
    room = Room(f"{connector.name}:{db}.orders", connector.name, f"{db}.orders")
    for change in got:
        room.record(change)
    assert all(cluster_time_of(c.position) is not None for c in got)
    gc.collect(0)
    gc.collect(1)
    assert [i for i, kept in enumerate(room._buffer) if gc.is_tracked(kept)] == []


# -- resume tokens ---------------------------------------------------------------------------------


async def saved_token(source: MongoSource, connector: MongoConnector) -> Any:
    doc = await source.client["dbfeed"]["resume_tokens"].find_one({"_id": connector.name})
    return doc and doc["token"]


async def test_token_saved_after_each_delivered_batch(mongodb: MongoSource, db: str) -> None:  # noqa: F811
    coll = mongodb.client[db]["orders"]
    connector = make(mongodb, f"{db}.orders", token_save_interval=3600.0)
    async with streaming(connector) as stream:
        await coll.insert_one({"_id": 1})
        [first] = await changes(stream, 1)
        before = await saved_token(mongodb, connector)
        await coll.insert_one({"_id": 2})
        await changes(stream, 1)  # asking for it means `first` was routed: saved by now
        after = await saved_token(mongodb, connector)
    assert before is not None  # the starting point is saved as soon as the stream opens
    assert after != before
    token = token_of(first.position)
    assert token is not None and after["_data"] >= token["_data"]


async def test_a_crash_half_way_through_a_large_batch_sends_again_at_most_save_every(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    """A batch (a getMore's answer, up to 16 MiB: tens of thousands of small events) was saved
    only at its end or after `token_save_interval` (10 s), so a crash half way through one sent
    every event of it routed so far again at the next start, past the client libraries'
    window of 4,096 ids. Now the token is saved every `token_save_every` events too."""
    coll = mongodb.client[db]["orders"]
    if mongodb.wire is not None:  # answers of a real server's size
        mongodb.wire.stream_batch = 10_000
    connector = make(mongodb, f"{db}.orders")  # token_save_every = 2000
    stream = generator(connector.changes())
    await connector.start()
    try:
        pulling = asyncio.create_task(anext(stream))  # the stream opens, at the current time
        async with asyncio.timeout(WAIT):
            while await saved_token(mongodb, connector) is None:  # noqa: ASYNC110 - polled
                await asyncio.sleep(0.05)
        await coll.insert_many([{"_id": i} for i in range(1, 6001)])  # one batch
        head = await pulling
        assert isinstance(head, Change), head
        first = [head, *await changes(stream, 4499)]
    finally:
        await stream.aclose()
        await connector._close_client()  # a crash: no token saved at stop
        if mongodb.wire is not None:
            mongodb.wire.stream_batch = 1000
    async with streaming(make(mongodb, f"{db}.orders", name=connector.name)) as again:
        rest = await changes(again, 1)
        rest += await changes(again, 6000 - rest[0].key)
    seen = {c.id for c in first}
    repeated = [c for c in rest if c.id in seen]
    assert [c.key for c in first] == list(range(1, 4501))
    assert 0 < len(repeated) <= 2000, len(repeated)  # from the last save, not from the start
    assert [c.key for c in rest] == list(range(rest[0].key, 6001))  # then the rest, all of it


async def test_idle_stream_keeps_saving_post_batch_token(mongodb: MongoSource, db: str) -> None:  # noqa: F811
    connector = make(mongodb, f"{db}.orders", token_save_interval=0.0, max_await_ms=100)
    other = mongodb.client[db]["elsewhere"]
    async with connector:
        stream = generator(connector.changes())
        pulling = asyncio.create_task(anext(stream))
        try:
            first = None
            async with asyncio.timeout(WAIT):
                while first is None:
                    first = await saved_token(mongodb, connector)
                    await asyncio.sleep(0.05)
                later = first
                while later == first:
                    # Writes elsewhere move the oplog on, as a real server's noop writer does.
                    await other.insert_one({})
                    await asyncio.sleep(0.1)
                    later = await saved_token(mongodb, connector)
        finally:
            await stopped(pulling)
            await stream.aclose()
    assert later["_data"] > first["_data"]


async def test_resume_token_store_can_be_turned_off(mongodb: MongoSource, db: str) -> None:  # noqa: F811
    coll = mongodb.client[db]["orders"]
    name = MongoSource.unique("nostore")
    async with streaming(make(mongodb, f"{db}.orders", name=name, resume_store="none")) as stream:
        await coll.insert_one({"_id": 1})
        await changes(stream, 1)
    await coll.insert_one({"_id": 2})  # missed: nothing remembers where the stream was
    async with streaming(make(mongodb, f"{db}.orders", name=name, resume_store="none")) as stream:
        await coll.insert_one({"_id": 3})
        [got] = await changes(stream, 1)
    assert got.key == 3
    assert await mongodb.client["dbfeed"]["resume_tokens"].find_one({"_id": name}) is None


# -- snapshots -------------------------------------------------------------------------------------


async def test_snapshot_is_consistent_with_the_stream(mongodb: MongoSource, db: str) -> None:  # noqa: F811
    coll = mongodb.client[db]["orders"]
    await coll.insert_many([{"_id": i, "status": "paid" if i % 2 else "new"} for i in range(5)])
    connector = make(mongodb, f"{db}.orders")
    async with streaming(connector) as stream:
        routed: asyncio.Queue[Change | Gap] = asyncio.Queue()

        async def drain() -> None:
            async for item in stream:
                routed.put_nowait(item)

        drainer = asyncio.create_task(drain())
        try:
            await coll.update_one({"_id": 0}, {"$set": {"status": "paid"}})
            async with asyncio.timeout(WAIT):
                seen = await routed.get()
            snap = await asyncio.wait_for(
                connector.snapshot(
                    RoomAddress(f"{db}.orders"), lambda row: row["status"] == "paid", 10
                ),
                WAIT,
            )
            await coll.insert_one({"_id": 9, "status": "paid"})
            async with asyncio.timeout(WAIT):
                later = await routed.get()
            limited = await connector.snapshot(RoomAddress(f"{db}.orders"), lambda row: True, 2)
            one = await connector.snapshot(RoomAddress(f"{db}.orders", "3"), lambda row: True, 10)
        finally:
            await stopped(drainer)
    assert sorted(row["_id"] for row in snap.rows) == [0, 1, 3]
    assert isinstance(seen, Change) and snap.covers(seen)
    assert isinstance(later, Change) and not snap.covers(later)
    assert len(limited.rows) == 2 and limited.truncated
    assert [row["_id"] for row in one.rows] == [3]


async def test_snapshot_of_an_object_id_row(mongodb: MongoSource, db: str) -> None:  # noqa: F811
    coll = mongodb.client[db]["orders"]
    oid = ObjectId()
    await coll.insert_many([{"_id": oid, "n": 1}, {"_id": ObjectId(), "n": 2}])
    connector = make(mongodb, f"{db}.orders")
    async with connector:
        stream = generator(connector.changes())
        pulling = asyncio.create_task(anext(stream))
        try:
            snap = await asyncio.wait_for(
                connector.snapshot(RoomAddress(f"{db}.orders", str(oid)), lambda r: True, 10), WAIT
            )
        finally:
            await stopped(pulling)
            await stream.aclose()
    assert [row["_id"] for row in snap.rows] == [oid]


async def test_room_filters_read_mongodb_values(mongodb: MongoSource, db: str) -> None:  # noqa: F811
    from feed.core.filters import parse_filter

    coll = mongodb.client[db]["orders"]
    owner = ObjectId()
    async with streaming(make(mongodb, f"{db}.orders")) as stream:
        await coll.insert_one(
            {
                "_id": 1,
                "owner": owner,
                "amount": 150,
                "ship": {"country": "FR"},
                "at": dt.datetime(2026, 5, 1, tzinfo=dt.UTC),
            }
        )
        [insert] = await changes(stream, 1)
    assert parse_filter(f"owner=eq.{owner}").matches(insert)
    assert parse_filter("amount=gt.100&ship.country=eq.FR").matches(insert)
    assert parse_filter("at=gte.2026-04-30T00:00:00Z").matches(insert)
    assert not parse_filter("ship.country=eq.DE").matches(insert)


async def test_dropped_database_invalidates_a_database_watch(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    client = mongodb.client
    async with streaming(make(mongodb, db)) as stream:
        await client.drop_database(db)
        drop, drop_db, invalidate, gap = await take(stream, 4)
        await client[db]["orders"].insert_one({"_id": "back"})
        [again] = await changes(stream, 1)
    assert isinstance(drop, Change) and (drop.op, drop.target) == ("drop", f"{db}.orders")
    assert isinstance(drop_db, Change) and (drop_db.op, drop_db.target) == ("dropDatabase", db)
    assert isinstance(invalidate, Change) and invalidate.op == "invalidate"
    assert isinstance(gap, Gap) and gap.target is None  # every room of the database
    assert again.key == "back"


async def test_a_collection_renamed_onto_a_watched_one_gives_it_a_gap(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    """A rename's `ns` is its source: one from a collection nobody watches onto a watched name
    was filtered out, and its documents appeared in the watched collection with no change and
    no gap. Its target (`to`) is matched too, and the destination's rooms get a gap."""
    client = mongodb.client
    await client[db].create_collection("customers")
    await client[db]["staging"].insert_one({"_id": 1})
    other = MongoSource.unique()
    await client[other]["incoming"].insert_one({"_id": 2})
    try:
        # Two collections: a database stream with a $match.
        async with streaming(make(mongodb, [f"{db}.orders", f"{db}.customers"])) as stream:
            await client[db]["staging"].rename("orders", dropTarget=True)
            await client[db]["customers"].insert_one({"_id": "after"})
            gap, after = await take(stream, 2)
        assert isinstance(gap, Gap) and gap.target == f"{db}.orders", gap
        assert f"{db}.staging was renamed to {db}.orders" in gap.reason
        assert isinstance(after, Change) and after.key == "after"
        # Across databases: a cluster stream with a $match.
        watch = [f"{db}.orders", f"{other}.kept"]
        async with streaming(make(mongodb, watch, allow_missing=True)) as stream:
            await client[other]["incoming"].rename("customers_x")  # nobody watches either
            await client.admin.command(
                "renameCollection", f"{other}.customers_x", to=f"{db}.orders", dropTarget=True
            )
            await client[db]["orders"].insert_one({"_id": 3})
            gap, insert = await take(stream, 2)
        assert isinstance(gap, Gap) and gap.target == f"{db}.orders", gap
        assert isinstance(insert, Change) and (insert.target, insert.key) == (f"{db}.orders", 3)
    finally:
        await client.drop_database(other)


async def test_a_watched_collection_replaced_by_a_rename_invalidates_its_stream(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    """One watched collection: a collection stream. mongod shows it a rename onto it (`ns`
    the source, `to` the collection) and invalidates it, as a rename of its own; the feed
    sends the invalidate and a gap for the collection, not a change of the source."""
    client = mongodb.client
    await client[db]["orders"].insert_one({"_id": "old"})
    await client[db]["staging"].insert_one({"_id": "new"})
    async with streaming(make(mongodb, f"{db}.orders")) as stream:
        await client[db]["staging"].rename("orders", dropTarget=True)
        invalidate, gap = await take(stream, 2)
        await client[db]["orders"].insert_one({"_id": "later"})
        [later] = await changes(stream, 1)
    assert isinstance(invalidate, Change) and invalidate.op == "invalidate"
    assert invalidate.target == f"{db}.orders"
    assert isinstance(gap, Gap) and gap.target == f"{db}.orders", gap
    assert later.key == "later"
