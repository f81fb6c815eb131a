"""MongoDB through the whole product: real server, real Socket.IO clients, the real connector."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Any

import pytest
from bson import Binary, Code, Decimal128, Int64, ObjectId, Timestamp
from dbfeed_client import FeedClient, Subscription

from feed.core.filters import parse_filter
from tests.support.mongodb import MongoSource, db, mongodb, shop_connector  # noqa: F401
from tests.support.server import RunningFeed, feed_client, running_feed
from tests.test_client_python import Log

pytestmark = pytest.mark.mongodb
WAIT = 15.0


def config(source: MongoSource, watch: str, extra: str = "") -> str:
    return f"""
[server]
replay_buffer = 50
{shop_connector(source, watch)}{extra}
"""


async def wait_up(feed: RunningFeed, name: str = "shop") -> None:
    async with asyncio.timeout(WAIT):
        while feed.hub.connectors[name].status.state.value != "up":  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def test_insert_reaches_target_and_row_rooms(mongodb: MongoSource, db: str) -> None:  # noqa: F811
    coll = mongodb.client[db]["orders"]
    oid = ObjectId()
    async with running_feed(config(mongodb, f"{db}.orders")) as feed:
        await wait_up(feed)
        async with feed_client(feed.url) as target, feed_client(feed.url) as row:
            assert (await target.subscribe(f"shop:{db}.orders"))["ok"]
            ack = await row.subscribe(f"shop:{db}.orders:{oid}")
            assert ack["ok"] and ack["room"] == f"shop:{db}.orders:{oid}"
            await coll.insert_one({"_id": ObjectId(), "status": "other"})
            await coll.insert_one({"_id": oid, "status": "new"})
            await coll.update_one({"_id": oid}, {"$set": {"status": "paid"}})
            first, second, third = await target.take(3)
            mine = await row.take(2)
    assert [c["op"] for c in (first, second, third)] == ["insert", "insert", "update"]
    assert second["key"] == {"$oid": str(oid)} and second["source"] == "mongodb"
    assert second["target"] == f"{db}.orders" and second["connector"] == "shop"
    assert second["after"] == {"_id": {"$oid": str(oid)}, "status": "new"}
    assert third["meta"]["updateDescription"]["updatedFields"] == {"status": "paid"}
    assert [c["seq"] for c in (first, second, third)] == [1, 2, 3]
    assert [c["id"] for c in mine] == [second["id"], third["id"]]
    assert second["ts"].endswith("Z")


async def test_snapshot_then_live_without_loss_or_doubles(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    # Pre-images let the filter room see that _id 1 stops matching (its `before` was paid).
    await mongodb.client[db].command(
        {"collMod": "orders", "changeStreamPreAndPostImages": {"enabled": True}}
    )
    coll = mongodb.client[db]["orders"]
    await coll.insert_many([{"_id": i, "status": "paid" if i % 2 else "new"} for i in range(6)])
    images = 'full_document_before_change = "whenAvailable"'
    async with running_feed(config(mongodb, f"{db}.orders", images)) as feed:
        await wait_up(feed)
        async with feed_client(feed.url) as client:
            await coll.update_one({"_id": 0}, {"$set": {"status": "paid"}})
            ack = await client.subscribe(
                f"shop:{db}.orders", filter="status=eq.paid", snapshot=True
            )
            await coll.insert_one({"_id": 7, "status": "paid"})
            await coll.update_one({"_id": 1}, {"$set": {"status": "new"}})
            live = await client.take(2)
            # A sentinel write: if anything had been doubled, it would arrive before this.
            await coll.insert_one({"_id": 99, "status": "paid"})
            sentinel = await client.next_change()
    assert ack["ok"], ack
    assert sorted(row["_id"] for row in ack["snapshot"]) == [0, 1, 3, 5]
    # Each row's key as in row room names (and as clients render `change.key`), beside it.
    assert ack["snapshot_keys"] == [str(row["_id"]) for row in ack["snapshot"]]
    # The update of _id 0 is in the snapshot, so it is not sent again; what follows is.
    assert [(c["op"], c["key"]) for c in live] == [("insert", 7), ("update", 1)]
    assert sentinel["key"] == 99


async def test_without_pre_images_a_filter_room_hears_a_document_leave_it_or_go(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    """No pre-images: updates and deletes carry no `before`. The feed remembers which documents
    the filter room was given (the snapshot, matching changes) and sends their next change."""
    coll = mongodb.client[db]["orders"]
    await coll.insert_many([{"_id": i, "status": "paid"} for i in (1, 2)])
    async with running_feed(config(mongodb, f"{db}.orders")) as feed:
        await wait_up(feed)
        async with feed_client(feed.url) as client:
            ack = await client.subscribe(
                f"shop:{db}.orders", filter="status=eq.paid", snapshot=True
            )
            assert ack["ok"] and sorted(ack["snapshot_keys"]) == ["1", "2"], ack
            await coll.update_one({"_id": 1}, {"$set": {"status": "refunded"}})
            await coll.delete_one({"_id": 2})
            await coll.insert_one({"_id": 3, "status": "new"})  # never in the room
            await coll.insert_one({"_id": 4, "status": "paid"})
            got = await client.take(3)
            await coll.update_one({"_id": 4}, {"$set": {"status": "new"}})
            got += await client.take(1)
            assert client.changes.empty()
    assert [(c["op"], c["key"], c.get("left")) for c in got] == [
        ("update", 1, True),
        ("delete", 2, None),
        ("insert", 4, None),
        ("update", 4, True),
    ]
    assert all(c["before"] is None for c in got)


async def test_a_document_leaving_while_the_rooms_snapshot_is_read_is_still_announced(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    """The snapshot reads at a point T; a document of its rows that leaves the filter after T,
    before the rows are held, was routed to no one: the subscriber kept it for good. The feed
    now notes the target's changes while the snapshot is read and sends that one after it."""
    coll = mongodb.client[db]["orders"]
    await coll.insert_many([{"_id": i, "status": "paid"} for i in (1, 2, 3)])
    async with running_feed(config(mongodb, f"{db}.orders")) as feed:
        await wait_up(feed)
        app = "dbfeed-shop"
        block = {"failCommands": ["find"], "blockConnection": True, "blockTimeMS": 1500}
        async with (
            feed_client(feed.url) as client,
            mongodb.fail_command({"times": 1}, {**block, "appName": app}),
        ):
            subscribing = asyncio.create_task(
                client.subscribe(f"shop:{db}.orders", filter="status=eq.paid", snapshot=True)
            )
            async with asyncio.timeout(WAIT):  # the snapshot's find waits at the fail point
                while not await mongodb.running("find", app):  # noqa: ASYNC110 - a server state
                    await asyncio.sleep(0.01)
            await coll.update_one({"_id": 1}, {"$set": {"status": "refunded"}})
            await coll.delete_one({"_id": 2})
            await coll.update_one({"_id": 3}, {"$set": {"note": "still paid"}})
            ack = await subscribing
            got = await client.take(3)
            await coll.insert_one({"_id": 99, "status": "paid"})  # a sentinel: nothing else came
            sentinel = await client.next_change()
    assert ack["ok"] and sorted(ack["snapshot_keys"]) == ["1", "2", "3"], ack
    assert sorted((c["key"], c["op"], c.get("left")) for c in got) == [
        (1, "update", True),
        (2, "delete", None),
        (3, "update", None),
    ]
    assert sentinel["key"] == 99


async def test_misconfigured_source_is_down_then_recovers_others_unaffected(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    extra = """
[[connectors]]
name = "mem"
type = "memory"
targets = ["public.orders"]
"""
    async with running_feed(config(mongodb, f"{db}.later", extra)) as feed:
        shop = feed.hub.connectors["shop"]
        async with asyncio.timeout(WAIT):
            while shop.status.state.value != "down":  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        assert "does not exist" in shop.status.detail and "\n" not in shop.status.detail
        async with feed_client(feed.url) as client:
            catalog = await client.call("catalog")
            mem = feed.hub.connectors["mem"]
            assert mem.status.state.value == "up"
            await mongodb.client[db].create_collection("later")
            await wait_up(feed)
            assert (await client.subscribe(f"shop:{db}.later"))["ok"]
            await mongodb.client[db]["later"].insert_one({"_id": "x"})
            change = await client.next_change()
    assert change["key"] == "x"
    assert "shop" in str(catalog)


async def returned(source: MongoSource) -> int:
    """Documents the server has sent in query batches so far (serverStatus)."""
    status = await source.client.admin.command("serverStatus")
    return int(status["metrics"]["document"]["returned"])


async def test_a_per_user_snapshot_reads_that_users_documents_not_the_collection(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    """The room's eq/in conditions go into the find (connectors/mongodb_filters): a subscribe
    takes the user's documents from the server, with every value the feed's own comparison
    finds equal (7 as a number of any BSON type, as text), and no other."""
    coll = mongodb.client[db]["orders"]
    await coll.insert_many([{"_id": i, "user_id": i % 100, "n": i} for i in range(2000)])
    odd: list[dict[str, Any]] = [
        {"_id": "text", "user_id": "7", "n": 0},
        {"_id": "double", "user_id": 7.0, "n": 0},
        {"_id": "long", "user_id": Int64(7), "n": 0},
        {"_id": "decimal", "user_id": Decimal128("7"), "n": 0},
        {"_id": "code", "user_id": Code("7"), "n": 0},
        # The feed compares a Decimal128 as its text: this one is not 7 to it.
        {"_id": "decimal-other", "user_id": Decimal128("7.0"), "n": 0},
        {"_id": "bool", "user_id": True, "n": 0},
        {"_id": "dotted", "owner": {"id": 7}},
    ]
    await coll.insert_many(odd)
    docs = [doc async for doc in coll.find({})]
    async with running_feed(config(mongodb, f"{db}.orders")) as feed:
        await wait_up(feed)
        seen: dict[str, set[str]] = {}
        async with feed_client(feed.url) as client:
            for text in ("user_id=eq.7", "user_id=in.(7,13)&n=gte.0", "owner.id=eq.7"):
                wanted = parse_filter(text)
                before = await returned(mongodb)
                ack = await client.subscribe(f"shop:{db}.orders", filter=text, snapshot=True)
                taken = await returned(mongodb) - before
                assert ack["ok"], ack
                expected = sorted(str(d["_id"]) for d in docs if wanted.matches_image(d))
                assert sorted(ack["snapshot_keys"]) == expected, text
                if text.startswith("user_id"):
                    # The matches and the text-compared Decimal128; never the collection.
                    assert taken <= len(expected) + 1, (text, taken)
                else:  # a dotted field is left to the per-document check
                    assert taken >= len(docs), (text, taken)
                seen[text] = set(ack["snapshot_keys"])
    # A number of any BSON type, or the text; not `Code("7")`, `True` nor Decimal128 `7.0`.
    found = seen["user_id=eq.7"] - {str(i) for i in range(2000)}
    assert found == {"text", "double", "long", "decimal"}
    assert seen["owner.id=eq.7"] == {"dotted"}


async def test_without_the_document_clients_patch_their_rows_from_the_update_description(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    """`full_document = "off"`: an update's `after` is null and its `meta.updateDescription`
    says what changed; the Python client applies it to its rows, which stay the documents."""
    coll = mongodb.client[db]["orders"]
    await coll.insert_one(
        {"_id": 1, "status": "new", "lines": [1, 2, 3], "ship": {"city": "Oslo", "zip": "0150"}}
    )
    extra = 'full_document = "off"'
    async with (
        running_feed(config(mongodb, f"{db}.orders", extra)) as feed,
        FeedClient(feed.url) as client,
    ):
        await wait_up(feed)
        async with client.subscribe(f"shop:{db}.orders", snapshot=True) as sub:
            log = Log(sub)
            await coll.update_one(
                {"_id": 1},
                {
                    "$set": {"status": "paid", "ship.city": "Bergen", "lines.4": 9, "note.a": 1},
                    "$unset": {"ship.zip": ""},
                },
            )
            await coll.update_one({"_id": 1}, {"$pop": {"lines": 1}})
            await log.until(lambda: len(log.changes) == 2, "both updates")
            assert all(c["after"] is None for c in log.changes)
            doc = await coll.find_one({"_id": 1})
            assert sub.rows == {"1": doc}


async def test_a_subscribe_given_up_before_its_answer_leaves_the_room(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    """`asyncio.timeout` around `async with client.subscribe(...)` that runs out while the
    snapshot is read: the subscription ends, and the client leaves the room once the server's
    answer comes (before, it stayed subscribed in the background for good)."""
    coll = mongodb.client[db]["orders"]
    await coll.insert_one({"_id": 1, "status": "paid"})
    async with running_feed(config(mongodb, f"{db}.orders")) as feed:
        await wait_up(feed)
        block = {"failCommands": ["find"], "blockConnection": True, "blockTimeMS": 1000}
        async with (
            FeedClient(feed.url) as client,
            mongodb.fail_command({"times": 1}, {**block, "appName": "dbfeed-shop"}),
        ):
            sub = client.subscribe(f"shop:{db}.orders", snapshot=True)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3), sub:
                    raise AssertionError("the snapshot is held up: no answer yet")
            assert sub not in client.subscriptions
            room = (
                feed.hub.rooms.get(f"shop:{db}.orders")
                or feed.hub._target_rooms("shop", f"{db}.orders").room
            )
            async with asyncio.timeout(WAIT):  # the answer comes, and the client leaves
                while not room.members:  # noqa: ASYNC110 - server state
                    await asyncio.sleep(0.01)
                while room.members:  # noqa: ASYNC110 - server state
                    await asyncio.sleep(0.01)


ODD_IDS: list[Any] = [
    ObjectId("64b7f0c2a1b2c3d4e5f60718"),
    42,
    Int64(43),
    "abc",
    "a,b",
    1.5,
    2.0,
    {"a": 1, "b": "x"},
    {"day": dt.datetime(2026, 5, 1, tzinfo=dt.UTC), "n": Decimal128("1.50")},
    True,
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    b"\x01\x02",
    Binary(b"\x03\x04", 5),
    dt.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=dt.UTC),
    Decimal128("9.90"),
    Timestamp(1700000000, 7),
]
"""An `_id` of every type a collection can have (not an array: MongoDB refuses one)."""


def rows(sub: Subscription) -> dict[str, Any]:
    assert sub.rows is not None, "a subscription with a snapshot keeps rows"
    return sub.rows


async def test_every_kind_of_id_has_its_row_rooms_snapshot_and_one_key_everywhere(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    """A row room's snapshot finds its document whatever the `_id`'s type, by the name the
    server gives it (`snapshot_keys`, the changes' key): only text, ObjectIds and numbers were
    looked up, so a document, date, UUID, binary, boolean or Decimal128 `_id` gave an empty
    snapshot. And a client keys the document as the server does: a Decimal128 `_id` was
    `{'$numberDecimal': '9.90'}` to the server and `9.90` to the client (two rows, a dead row
    room), a double 2.0 `2.0` and `2`."""
    coll = mongodb.client[db]["orders"]
    await coll.insert_many([{"_id": i, "n": 0} for i in ODD_IDS])
    docs = [doc async for doc in coll.find({})]
    async with (
        running_feed(config(mongodb, f"{db}.orders")) as feed,
        FeedClient(feed.url) as client,
    ):
        await wait_up(feed)
        async with client.subscribe(f"shop:{db}.orders", snapshot=True) as whole:
            keys = sorted(rows(whole))
            assert len(keys) == len(ODD_IDS), keys
            assert "9.90" in keys and "2" in keys and "1,x" in keys
            rooms: dict[str, Any] = {}
            for key in keys:
                sub = client.subscribe(f"shop:{db}.orders:{key}", snapshot=True)
                await sub.ready()
                rooms[key] = (sub, Log(sub))
                assert list(rows(sub)) == [key], (key, rows(sub))
                assert rows(sub)[key] == rows(whole)[key]
            log = Log(whole)
            for doc in docs:
                await coll.update_one({"_id": doc["_id"]}, {"$inc": {"n": 1}})
            await log.until(lambda: len(log.changes) == len(docs), "every update")
            # The changes' keys name the rows the snapshot named: no row twice.
            assert sorted(rows(whole)) == keys
            assert all(row["n"] == 1 for row in rows(whole).values())
            for key, (sub, row_log) in rooms.items():
                await row_log.until(lambda row_log=row_log: len(row_log.changes) == 1, key)
                assert list(rows(sub)) == [key] and rows(sub)[key]["n"] == 1
                await sub.unsubscribe()


async def test_a_row_rooms_snapshot_reads_its_document_only(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    """The row room's query looks the `_id` up by value: on a collection keyed by ObjectIds,
    numbers or text it takes one document from the server, not the collection (documents
    keyed by documents, whose text has no field names, are read by type)."""
    coll = mongodb.client[db]["orders"]
    oids = [ObjectId() for _ in range(300)]
    await coll.insert_many([{"_id": oid} for oid in oids] + [{"_id": i} for i in range(300)])
    async with running_feed(config(mongodb, f"{db}.orders")) as feed:
        await wait_up(feed)
        async with feed_client(feed.url) as client:
            for key in (str(oids[7]), "7", "nothing"):
                before = await returned(mongodb)
                ack = await client.subscribe(f"shop:{db}.orders:{key}", snapshot=True)
                taken = await returned(mongodb) - before
                assert ack["ok"], ack
                assert ack["snapshot_keys"] == ([] if key == "nothing" else [key])
                assert taken == len(ack["snapshot"]), (key, taken)


async def test_a_collection_renamed_back_onto_a_followed_one_reloads_its_rows(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    """The probe's case: orders renamed away (the room's rows are cleared), then renamed back:
    its documents were back in the collection but never in the client's rows, with no gap.
    Now the room gets a gap, and the client reloads its rows from a fresh snapshot."""
    client = mongodb.client
    coll = client[db]["orders"]
    await client[db].create_collection("customers")
    await coll.insert_one({"_id": 77, "status": "kept"})
    watch = f'{db}.orders", "{db}.customers'  # two collections: a database stream
    async with (
        running_feed(config(mongodb, watch)) as feed,
        FeedClient(feed.url) as feed_client_,
    ):
        await wait_up(feed)
        async with feed_client_.subscribe(f"shop:{db}.orders", snapshot=True) as sub:
            log = Log(sub)
            assert list(rows(sub)) == ["77"]
            await coll.rename("orders_old")
            await log.until(lambda: not rows(sub), "the rename clears the rows")
            await client[db]["orders_old"].rename("orders")
            await log.until(lambda: "reload" in log.names, "a gap: reload")
            await log.until(lambda: log.names[-1] == "live" and "77" in rows(sub), "reloaded")
            await coll.insert_one({"_id": 78})
            await log.until(lambda: "78" in rows(sub), "the insert after it")
            assert sorted(rows(sub)) == ["77", "78"]


async def test_a_watched_databases_room_receives_every_change_of_its_collections(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    """`watch = ["<db>"]`: the catalog lists the database as a target, and its room gets every
    change of every collection, each naming its collection as `target`; before, the room was
    accepted and heard nothing. A gap of one of its collections reaches it too. It has no row
    rooms (a key names a document of one collection), no snapshot, and, without pre-images,
    no filter rooms (`_id`s repeat across collections), and says so."""
    client = mongodb.client
    await client[db].create_collection("customers")
    async with running_feed(config(mongodb, db)) as feed:
        await wait_up(feed)
        async with feed_client(feed.url) as whole, feed_client(feed.url) as one:
            catalog = await whole.call("catalog")
            [shop] = [c for c in catalog["connectors"] if c["name"] == "shop"]
            assert db in shop["targets"]
            assert (await whole.subscribe(f"shop:{db}"))["ok"]
            assert (await one.subscribe(f"shop:{db}.orders"))["ok"]
            await client[db]["orders"].insert_one({"_id": 1, "status": "paid"})
            await client[db]["customers"].insert_one({"_id": 1, "status": "new"})
            await client[db]["brand_new"].insert_one({"_id": 2, "status": "paid"})
            got = await whole.take(3)
            mine = await one.take(1)
            await client[db]["staging"].insert_one({"_id": 3})
            await client[db]["staging"].rename("orders", dropTarget=True)
            gaps = [await whole.next_gap(), await one.next_gap()]
            row = await whole.call("subscribe", {"room": f"shop:{db}:1"})
            snap = await whole.call("subscribe", {"room": f"shop:{db}", "snapshot": True})
            paid = await whole.call("subscribe", {"room": f"shop:{db}", "filter": "status=eq.paid"})
    assert [(c["room"], c["target"], c["key"]) for c in got] == [
        (f"shop:{db}", f"{db}.orders", 1),
        (f"shop:{db}", f"{db}.customers", 1),
        (f"shop:{db}", f"{db}.brand_new", 2),
    ]
    assert [c["seq"] for c in got] == [1, 2, 3]
    assert [(c["room"], c["key"]) for c in mine] == [(f"shop:{db}.orders", 1)]
    assert [(g["room"], g["target"]) for g in gaps] == [
        (f"shop:{db}", db),
        (f"shop:{db}.orders", f"{db}.orders"),
    ]
    assert not row["ok"] and row["error"]["code"] == "unknown_target"
    assert f"shop:{db}.<collection>:1" in row["error"]["message"]
    assert not snap["ok"] and snap["error"]["code"] == "snapshot_unsupported", snap
    assert not paid["ok"] and paid["error"]["code"] == "bad_filter", paid
    assert f"shop:{db}.<collection>?status=eq.paid" in paid["error"]["message"]


async def test_with_pre_images_a_watched_databases_room_takes_filters(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    """With every change carrying its before image, a filter room on the database's room
    needs no memory of its rows: it gets each collection's matching changes, and the one
    that makes a document leave it (`left`)."""
    client = mongodb.client
    await client[db].create_collection("customers")
    for name in ("orders", "customers"):
        await client[db].command(
            {"collMod": name, "changeStreamPreAndPostImages": {"enabled": True}}
        )
    images = 'full_document_before_change = "required"'
    async with running_feed(config(mongodb, db, images)) as feed:
        await wait_up(feed)
        async with feed_client(feed.url) as paid:
            ack = await paid.subscribe(f"shop:{db}", filter="status=eq.paid")
            assert ack["ok"], ack
            await client[db]["orders"].insert_one({"_id": 1, "status": "paid"})
            await client[db]["customers"].insert_one({"_id": 1, "status": "new"})
            await client[db]["customers"].update_one({"_id": 1}, {"$set": {"n": 1}})
            await client[db]["orders"].update_one({"_id": 1}, {"$set": {"status": "sent"}})
            await client[db]["customers"].insert_one({"_id": 2, "status": "paid"})
            got = await paid.take(3)
    assert [(c["target"], c["key"], c["op"], c.get("left")) for c in got] == [
        (f"{db}.orders", 1, "insert", None),
        (f"{db}.orders", 1, "update", True),
        (f"{db}.customers", 2, "insert", None),
    ]
