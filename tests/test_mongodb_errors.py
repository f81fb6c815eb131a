"""A user's mistakes with MongoDB come back as one line that names the fix, never a traceback."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from connectors.base import State
from connectors.mongodb import MongoConnector
from feed.errors import ConfigError, SourceMisconfigured, SourceUnavailable
from feed.options import Options
from tests.connector_contract import streaming
from tests.mongo_wire import MongoWireServer
from tests.support.mongodb import MongoSource, changes, db, make, mongodb  # noqa: F401

pytestmark = pytest.mark.mongodb


def build(**raw: Any) -> MongoConnector:
    return MongoConnector("shop", Options(raw, "connectors.shop"))


async def start_error(connector: MongoConnector) -> str:
    with pytest.raises((SourceMisconfigured, SourceUnavailable)) as caught:
        await asyncio.wait_for(connector.start(), 30)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    assert connector.status.state == State.DOWN and connector.status.detail == message
    return message


@pytest.mark.parametrize(
    ("raw", "key", "words"),
    [
        ({"watch": ["shop.orders"]}, "connectors.shop.uri", "required"),
        ({"uri": "mongodb://h/"}, "connectors.shop.watch", "required"),
        ({"uri": "mongodb://h/", "watch": ["sh op.orders"]}, "connectors.shop.watch", "database"),
        ({"uri": "mongodb://h/", "watch": ["shop."]}, "connectors.shop.watch", "database"),
        (
            {"uri": "mongodb://h/", "watch": "shop", "full_document": "yes"},
            "connectors.shop.full_document",
            "updateLookup",
        ),
        (
            {"uri": "mongodb://h/", "watch": "shop", "resume_collection": "tokens"},
            "connectors.shop.resume_collection",
            "database.collection",
        ),
        # mongod opens no change stream on its internal databases or system collections.
        ({"uri": "mongodb://h/", "watch": ["admin"]}, "connectors.shop.watch", "internal"),
        ({"uri": "mongodb://h/", "watch": "local.oplog.rs"}, "connectors.shop.watch", "internal"),
        ({"uri": "mongodb://h/", "watch": "shop.system.views"}, "connectors.shop.watch", "system"),
        # Watching where the tokens are saved: every save was a change, saved in turn (a loop).
        (
            {"uri": "mongodb://h/", "watch": "dbfeed.resume_tokens"},
            "connectors.shop.watch",
            "resume tokens",
        ),
        (
            {"uri": "mongodb://h/", "watch": ["shop.orders", "t.k"], "resume_collection": "t.k"},
            "connectors.shop.watch",
            "resume tokens",
        ),
        (
            {"uri": "mongodb://h/", "watch": "shop", "colection": "x"},
            "connectors.shop.colection",
            "known",
        ),
    ],
)
def test_config_mistakes_name_their_key(raw: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build(**raw)
    assert caught.value.key == key
    assert words in str(caught.value)


def test_watch_accepts_a_single_name_or_a_list() -> None:
    assert build(uri="mongodb://h/", watch="shop").targets() == ["shop"]
    assert build(uri="mongodb://h/", watch=["a.b", "c"]).targets() == ["a.b", "c"]


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("http://example.com/", "must be a mongodb:// or mongodb+srv:// URI, and this is http://"),
        ("$MONGODB_URL", "to read the environment variable write ${MONGODB_URL}"),
        ("mongodb://", "invalid MongoDB uri:"),
        ("mongodb://h/?w=banana&x=1", "invalid MongoDB uri:"),
        ("mongodb://h/?replicaSett=rs0", "invalid MongoDB uri: unknown option 'replicaSett'"),
        # Reported when the connector started, as "[Errno 2] The tlscafile file is not
        # readable" naming no path, and `feed serve` retried it forever.
        (
            "mongodb://u:secret@h/?tls=true&tlsCAFile=/nonexistent/ca.pem",
            "tlsCAFile=/nonexistent/ca.pem: no such file",
        ),
    ],
)
def test_a_uri_that_cannot_work_is_a_config_error(uri: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build(uri=uri, watch="shop.orders")
    assert caught.value.key == "connectors.shop.uri"
    assert words in str(caught.value) and "secret" not in str(caught.value)


def test_an_srv_uri_is_left_to_the_connection() -> None:
    """Parsing mongodb+srv:// asks DNS: not at config time."""
    assert build(uri="mongodb+srv://cluster0.invalid/", watch="shop").targets() == ["shop"]


async def test_unreachable_server() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    connector = build(uri=f"mongodb://127.0.0.1:{port}/", watch="shop.orders", connect_timeout=0.5)
    message = await start_error(connector)
    assert message.startswith(f"cannot reach MongoDB at 127.0.0.1:{port}")


async def test_authentication_failure(mongodb: MongoSource) -> None:  # noqa: F811
    uri = mongodb.url.replace("mongodb://", "mongodb://nobody:wrong-password@", 1)
    message = await start_error(build(uri=uri, watch="shop.orders", connect_timeout=5.0))
    assert "authentication failed" in message and "wrong-password" not in message


async def test_unknown_collection_and_database(mongodb: MongoSource, db: str) -> None:  # noqa: F811
    missing = await start_error(make(mongodb, f"{db}.nope"))
    assert f"collection '{db}.nope' does not exist" in missing
    nodb = MongoSource.unique("absent")
    message = await start_error(make(mongodb, nodb))
    assert f"database '{nodb}' does not exist" in message


async def test_allow_missing_watches_a_collection_before_it_exists(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    async with streaming(make(mongodb, f"{db}.later", allow_missing=True)) as stream:
        await mongodb.client[db]["later"].insert_one({"_id": 1})
        [got] = await changes(stream, 1)
    assert got.target == f"{db}.later" and got.key == 1


async def test_standalone_server_is_refused_in_one_line() -> None:
    # Wire server only: the point is what a standalone answers, whatever MongoDB the suite uses.
    async with MongoWireServer(standalone=True) as server:
        message = await start_error(build(uri=server.url, watch="shop.orders"))
    assert "standalone MongoDB servers do not support change streams" in message
    assert "replica set" in message and "rs.initiate()" in message


async def test_check_describes_the_source_and_saves_nothing(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    connector = make(mongodb, f"{db}.orders")
    text = await connector.check()
    assert text.startswith("MongoDB ") and f"{db}.orders" in text
    tokens = mongodb.client["dbfeed"]["resume_tokens"]
    assert await tokens.find_one({"_id": connector.name}) is None
    with pytest.raises(SourceMisconfigured):
        await make(mongodb, f"{db}.missing").check()


async def test_required_images_without_pre_and_post_images(mongodb: MongoSource, db: str) -> None:  # noqa: F811
    coll = mongodb.client[db]["orders"]
    connector = make(mongodb, f"{db}.orders", full_document="required")
    # Depending on the server this fails when the stream opens or at the first update event.
    with pytest.raises(SourceMisconfigured) as caught:
        async with streaming(connector) as stream:
            await coll.insert_one({"_id": 1})
            await coll.update_one({"_id": 1}, {"$set": {"n": 1}})
            async with asyncio.timeout(15):
                while True:
                    await anext(stream)
    message = str(caught.value)
    assert "changeStreamPreAndPostImages" in message and "\n" not in message


async def test_required_pre_images_resume_after_an_update_written_without_one(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    """A feed run without pre-images saved the token of an update (an event's own token, as a
    real server's post-batch token often is); pre-images are then turned on and the connector
    set to "required". mongod reads the token's event again through its image lookups and, asked
    for "required", fails with NoMatchingDocument: the connector was down for
    good with a collMod hint that could not help. It asks for "whenAvailable" and checks
    "required" itself, so it resumes, and the next update arrives with its `before`."""
    coll = mongodb.client[db]["orders"]
    await coll.insert_one({"_id": 1, "v": 0})
    async with await coll.watch(max_await_time_ms=200) as raw:
        await coll.update_one({"_id": 1}, {"$set": {"v": 1}})
        async with asyncio.timeout(15):
            while (event := await raw.try_next()) is None:
                pass
    name = MongoSource.unique("req")
    await mongodb.client.dbfeed.resume_tokens.replace_one(
        {"_id": name}, {"token": event["_id"], "watch": [f"{db}.orders"]}, upsert=True
    )
    await mongodb.client[db].command(
        {"collMod": "orders", "changeStreamPreAndPostImages": {"enabled": True}}
    )
    await coll.update_one({"_id": 1}, {"$set": {"v": 2}})
    connector = make(mongodb, f"{db}.orders", name=name, full_document_before_change="required")
    async with streaming(connector) as stream:
        (update,) = await changes(stream, 1)
    assert update.op == "update" and update.before == {"_id": 1, "v": 1}


async def test_required_pre_images_stop_at_the_change_without_one(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    """Checked by the connector, "required" still never delivers a change without its image:
    it stops at that change, saying which, and what to do."""
    coll = mongodb.client[db]["orders"]
    connector = make(mongodb, f"{db}.orders", full_document_before_change="required")
    with pytest.raises(SourceMisconfigured) as caught:
        async with streaming(connector) as stream:
            await coll.insert_one({"_id": 7})
            await coll.delete_one({"_id": 7})
            async with asyncio.timeout(15):
                (insert,) = await changes(stream, 1)
                assert insert.op == "insert"
                await anext(stream)
    message = str(caught.value)
    assert "no pre-image for the delete" in message and "_id 7" in message
    assert "changeStreamPreAndPostImages" in message and "\n" not in message
    assert connector.status.state in (State.DOWN, State.STOPPED)


async def test_a_wrong_replica_set_name_names_the_right_one() -> None:
    """Wire server only: its set name is known. A uri whose replicaSet the server does not
    bear was "cannot reach MongoDB at host: No replica set members available for replica set
    name" of a server that answered; the server, asked directly, names its set."""
    async with MongoWireServer() as server:
        uri = f"{server.url}?replicaSet=myset"
        message = await start_error(build(uri=uri, watch="shop.orders", connect_timeout=1.0))
    assert f"is replica set {server.set_name!r}, not 'myset'" in message
    assert f"replicaSet={server.set_name}" in message
