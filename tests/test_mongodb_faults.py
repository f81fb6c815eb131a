"""Dropped connections, resumable errors and lost history, injected with mongod's failCommand.

The fail point is the real server's own (`configureFailPoint: "failCommand"`), scoped to the
connector's appName so the test's own client is unaffected; the wire server implements the same
command, so these tests run unchanged against a replica set started with enableTestCommands=1
(and skip where the fail point is unavailable). The tests marked wire-only need control no real
server offers from a client (truncating the oplog, cutting every connection at once).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from connectors.base import State, Status
from connectors.mongodb import MongoConnector
from feed.core.change import Change, Gap
from feed.errors import SourceUnavailable
from feed.options import Options
from tests.connector_contract import streaming
from tests.mongo_wire import MongoWireServer
from tests.support.mongodb import MongoSource, changes, db, make, mongodb, take  # noqa: F401

pytestmark = pytest.mark.mongodb


def app(connector: MongoConnector) -> str:
    return f"dbfeed-{connector.name}"


def record(connector: MongoConnector) -> list[State]:
    states: list[State] = []

    def listener(status: Status) -> None:
        states.append(status.state)

    connector.on_status(listener)
    return states


async def stopped_after_one_change(
    source: MongoSource, database: str, prefix: str, **settings: object
) -> str:
    """Run a connector on `orders` until it has delivered the insert of _id 1, then stop it.

    Returns the connector's name: a connector made again under that name resumes from the token
    it saved, which is what the tests of stale tokens and of changes made while stopped build on.
    """
    name = MongoSource.unique(prefix)
    async with streaming(make(source, f"{database}.orders", name=name, **settings)) as stream:
        await source.client[database]["orders"].insert_one({"_id": 1})
        await changes(stream, 1)
    return name


async def test_connection_closed_mid_get_more_loses_nothing(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    coll = mongodb.client[db]["orders"]
    connector = make(mongodb, f"{db}.orders", max_await_ms=100)
    async with streaming(connector) as stream:
        await coll.insert_one({"_id": 1})
        await changes(stream, 1)
        data = {"failCommands": ["getMore"], "closeConnection": True, "appName": app(connector)}
        async with mongodb.fail_command({"times": 1}, data) as point:
            await coll.insert_one({"_id": 2})
            await coll.insert_one({"_id": 3})
            got = await take(stream, 2)
        await coll.insert_one({"_id": 4})
        got += await take(stream, 1)
    assert point.count == 1
    assert [c.key for c in got if isinstance(c, Change)] == [2, 3, 4]
    assert not any(isinstance(c, Gap) for c in got)


async def test_resumable_errors_beyond_the_driver_retry_are_retried_with_backoff(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    coll = mongodb.client[db]["orders"]
    connector = make(mongodb, f"{db}.orders", max_await_ms=100)
    states = record(connector)
    async with streaming(connector) as stream:
        await coll.insert_one({"_id": 1})
        await changes(stream, 1)
        data = {
            "failCommands": ["getMore", "aggregate"],
            "errorCode": 6,  # HostUnreachable
            "errorLabels": ["ResumableChangeStreamError"],
            "appName": app(connector),
        }
        # getMore fails; the driver resumes by itself, but its aggregate fails (twice, with the
        # retryable-read retry), so the error reaches the connector, which backs off and reopens.
        async with mongodb.fail_command({"times": 3}, data) as point:
            await coll.insert_one({"_id": 2})
            got = await changes(stream, 1)
        await coll.insert_one({"_id": 3})
        got += await changes(stream, 1)
    assert point.count == 3
    assert [c.key for c in got] == [2, 3]
    assert State.DOWN in states and states[-1] == State.STOPPED
    assert states[states.index(State.DOWN) + 1] == State.UP


async def test_failed_reopens_back_off_then_recover(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    coll = mongodb.client[db]["orders"]
    connector = make(mongodb, f"{db}.orders", max_await_ms=100)
    async with streaming(connector) as stream:
        data = {
            "failCommands": ["getMore", "aggregate"],
            "closeConnection": True,
            "appName": app(connector),
        }
        async with mongodb.fail_command({"times": 4}, data) as point:
            await coll.insert_one({"_id": 1})
            await coll.insert_one({"_id": 2})
            got = await changes(stream, 2)
    assert point.count == 4
    assert [c.key for c in got] == [1, 2]


async def test_gives_up_after_retries_with_one_line(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    connector = make(mongodb, f"{db}.orders", max_await_ms=100, resume_retries=1)
    data = {
        "failCommands": ["getMore", "aggregate"],
        "closeConnection": True,
        "appName": app(connector),
    }
    async with streaming(connector) as stream, mongodb.fail_command("alwaysOn", data):
        with pytest.raises(SourceUnavailable) as caught:
            await asyncio.wait_for(anext(stream), 30)
    message = str(caught.value)
    assert "\n" not in message and "MongoDB" in message
    assert connector.status.state == State.STOPPED  # stopped after leaving `streaming`


async def test_history_lost_sends_gap_and_restarts_from_now(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    coll = mongodb.client[db]["orders"]
    connector = make(mongodb, f"{db}.orders", max_await_ms=100)
    async with streaming(connector) as stream:
        await coll.insert_one({"_id": 1})
        await changes(stream, 1)
        data = {"failCommands": ["getMore"], "errorCode": 286, "appName": app(connector)}
        async with mongodb.fail_command({"times": 1}, data) as point:
            [gap] = await take(stream, 1)
        await coll.insert_one({"_id": 2})
        [after] = await changes(stream, 1)
    assert point.count == 1
    assert isinstance(gap, Gap) and "history lost" in gap.reason
    assert after.key == 2


async def test_history_lost_again_at_once_is_not_retried_in_a_loop(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    connector = make(mongodb, f"{db}.orders", max_await_ms=100)
    data = {"failCommands": ["getMore"], "errorCode": 286, "appName": app(connector)}
    async with streaming(connector) as stream, mongodb.fail_command("alwaysOn", data) as point:
        [gap] = await take(stream, 1)
        with pytest.raises(SourceUnavailable) as caught:
            await asyncio.wait_for(anext(stream), 30)
    assert isinstance(gap, Gap)
    assert point.count == 2
    assert "286" in str(caught.value)


# -- wire-server only --------------------------------------------------------------------------


async def test_stale_saved_token_gives_gap_then_live_changes(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    if mongodb.wire is None:
        pytest.skip("needs the wire server: a real oplog cannot be truncated from a client")
    coll = mongodb.client[db]["orders"]
    name = await stopped_after_one_change(mongodb, db, "stale")
    mongodb.wire.store.truncate_oplog()
    async with streaming(make(mongodb, f"{db}.orders", name=name)) as stream:
        [gap] = await take(stream, 1)
        await coll.insert_one({"_id": 2})
        [live] = await changes(stream, 1)
    assert isinstance(gap, Gap)
    assert live.key == 2


async def test_a_saved_token_the_oplog_never_held_gives_gap_then_live_changes(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    """A token within the oplog's window that names no event there (saved on another replica
    set, or before a restore): mongod answers ChangeStreamFatalError "the resume token was not
    found". It was taken for a missing pre-image: the connector restarted from the same token
    for good, with a hint about collMod. It is history lost: a gap, then from now."""
    if mongodb.wire is None:
        pytest.skip("needs the wire server: its tokens can be made to name no event")
    coll = mongodb.client[db]["orders"]
    name = await stopped_after_one_change(mongodb, db, "unknown")
    tokens = mongodb.client["dbfeed"]["resume_tokens"]
    saved = await tokens.find_one({"_id": name})
    assert saved is not None
    data = saved["token"]["_data"]
    # The fake's token: 82, time, inc, 2B, kind, the event's index within its time, run, 04.
    # An event token (kind 80) at the saved time with an index no event there has.
    forged = {"_data": f"{data[:20]}80{999:08X}{data[30:]}"}
    await tokens.update_one({"_id": name}, {"$set": {"token": forged}})
    async with streaming(make(mongodb, f"{db}.orders", name=name)) as stream:
        [gap] = await take(stream, 1)
        await coll.insert_one({"_id": 2})
        [live] = await changes(stream, 1)
    assert isinstance(gap, Gap) and "history lost" in gap.reason, gap
    assert live.key == 2


async def test_every_connection_dropped_at_once(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    if mongodb.wire is None:
        pytest.skip("needs the wire server to cut every connection")
    coll = mongodb.client[db]["orders"]
    async with streaming(make(mongodb, f"{db}.orders", max_await_ms=100)) as stream:
        await coll.insert_one({"_id": 1})
        await changes(stream, 1)
        mongodb.wire.drop_connections()
        await coll.insert_one({"_id": 2})
        mongodb.wire.drop_connections()
        await coll.insert_one({"_id": 3})
        got = await changes(stream, 2)
    assert [c.key for c in got] == [2, 3]


async def test_reading_old_events_reports_lagging_until_caught_up(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    if mongodb.wire is None:
        pytest.skip("needs the wire server to backdate events")
    coll = mongodb.client[db]["orders"]
    connector = make(mongodb, f"{db}.orders", lag_threshold=30.0, max_await_ms=100)
    states = record(connector)
    async with streaming(connector) as stream:
        mongodb.wire.store.wall_offset = dt.timedelta(seconds=-120)
        try:
            await coll.insert_one({"_id": 1})
            await changes(stream, 1)
            lagging = connector.status
        finally:
            mongodb.wire.store.wall_offset = dt.timedelta(0)
        await coll.insert_one({"_id": 2})
        await changes(stream, 1)
        caught_up = connector.status
    assert lagging.state == State.LAGGING and "30s behind" in lagging.detail
    assert caught_up.state == State.UP
    assert states.count(State.LAGGING) == 1


# -- the capture review of issue 17: every way the stream loses track is announced --------------


async def test_a_renamed_collection_is_announced_and_counted(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    coll = mongodb.client[db]["orders"]
    await coll.insert_one({"_id": 0})
    connector = make(mongodb, f"{db}.orders", max_await_ms=100)
    async with streaming(connector) as stream:
        await coll.rename("archive")
        rename, invalidate, gap = await take(stream, 3)
        await mongodb.client[db]["orders"].insert_one({"_id": 1})  # a new collection, same name
        [again] = await changes(stream, 1)
    assert isinstance(rename, Change) and rename.op == "rename"
    assert isinstance(invalidate, Change) and invalidate.op == "invalidate"
    assert isinstance(gap, Gap) and "dropped or renamed" in gap.reason
    assert gap.target == f"{db}.orders"
    assert again.key == 1
    assert connector.capture_faults == {"stream_invalidated": 1}


async def test_a_collection_dropped_while_stopped_is_announced_at_restart(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    coll = mongodb.client[db]["orders"]
    name = await stopped_after_one_change(mongodb, db, "dropped", max_await_ms=100)
    await coll.drop()
    await coll.insert_one({"_id": 2})  # re-created while the feed was stopped
    connector = make(mongodb, f"{db}.orders", name=name, max_await_ms=100)
    async with streaming(connector) as stream:
        # The last change before the stop may come again (it was not acknowledged), then:
        items = await take(stream, 3)
        if isinstance(items[0], Change) and items[0].op == "insert":
            items = items[1:] + await take(stream, 1)
        drop, invalidate, gap = items
        assert isinstance(gap, Gap) and gap.target == f"{db}.orders"
        await coll.insert_one({"_id": 3})
        later = await changes(stream, 2)
    assert isinstance(drop, Change) and drop.op == "drop"
    assert isinstance(invalidate, Change) and invalidate.op == "invalidate"
    # The stream goes on after the invalidate: the re-created collection's changes, even those
    # made while the feed was stopped, are delivered.
    assert [c.key for c in later] == [2, 3]


async def test_a_token_the_oplog_no_longer_holds_says_why_and_is_counted(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    if mongodb.wire is None:
        pytest.skip("needs the wire server: a real oplog cannot be truncated from a client")
    coll = mongodb.client[db]["orders"]
    name = await stopped_after_one_change(mongodb, db, "rolled")
    await coll.insert_one({"_id": 2})  # never delivered: the oplog loses it
    mongodb.wire.store.truncate_oplog()
    connector = make(mongodb, f"{db}.orders", name=name)
    async with streaming(connector) as stream:
        [gap] = await take(stream, 1)
    assert isinstance(gap, Gap) and "oplog no longer holds the resume token" in gap.reason
    assert connector.capture_faults == {"history_lost": 1}


async def test_a_wire_server_restarted_without_its_data_is_a_gap() -> None:
    """The wire server keeps everything in memory: restarted, it is a new deployment whose
    oplog never held the connector's token, and resuming there must be history lost (a gap),
    as mongod says for a token its oplog does not reach. Its tokens carried only a cluster
    time, so one handed out in the second of the restart was taken as a place in the new
    oplog: the stream resumed silently over every write lost with the old server's data."""
    async with MongoWireServer() as first:
        port = first.port
        url = f"{first.url}?replicaSet={first.set_name}"
        options = {"uri": url, "watch": "shop.orders", "max_await_ms": 100}
        connector = MongoConnector("restarted", Options(options, "connectors.restarted"))
        writer: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(url)
        try:
            await writer.shop.create_collection("orders")
            async with streaming(connector) as stream:
                await writer.shop.orders.insert_one({"_id": 1})
                await changes(stream, 1)
                await _mid_second()  # the restart falls in the second of the last token
                await first.stop()
                async with MongoWireServer(port=port) as second:
                    assert second.port == port
                    await writer.shop.create_collection("orders")
                    await writer.shop.orders.insert_one({"_id": 2})
                    [gap] = await take(stream, 1)
                    await writer.shop.orders.insert_one({"_id": 3})
                    [live] = await changes(stream, 1)
        finally:
            await writer.close()
    assert isinstance(gap, Gap) and "history lost" in gap.reason, gap
    assert live.key == 3


async def _mid_second() -> None:
    """Until about 0.4 s into a second: the stream's getMores (every 0.1 s) have handed out
    tokens of this second, and a server started now starts its clock in it."""
    fraction = time.time() % 1
    await asyncio.sleep((1.4 - fraction) % 1)


async def test_a_fatal_stream_error_is_not_taken_for_a_missing_pre_image(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    """A ChangeStreamFatalError (280) other than a lost resume token says what MongoDB said:
    it was taken for a missing required image and shown with "enable them with collMod
    changeStreamPreAndPostImages", a hint that cannot help (mongod reports a missing image as
    NoMatchingDocument, 47: tests/test_mongodb_wire_server.py)."""
    connector = make(mongodb, f"{db}.orders", max_await_ms=100)
    data = {"failCommands": ["getMore"], "errorCode": 280, "appName": app(connector)}
    async with streaming(connector) as stream, mongodb.fail_command("alwaysOn", data):
        with pytest.raises(SourceUnavailable) as caught:
            await asyncio.wait_for(anext(stream), 30)
    message = str(caught.value)
    assert "280" in message and "\n" not in message
    assert "changeStreamPreAndPostImages" not in message


async def test_an_oplog_rolling_past_an_open_stream_is_a_gap(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    """The oplog rolls past the place of a running connector (it fell behind): mongod fails
    the open stream's getMore with CappedPositionLost (136), not ChangeStreamHistoryLost. It
    was shown as "MongoDB error 136" and the connector raised (down, restarted by the hub);
    it is history lost: a gap, then from now, as a resume would find."""
    if mongodb.wire is None:
        pytest.skip("needs the wire server: a real oplog cannot be truncated from a client")
    coll = mongodb.client[db]["orders"]
    connector = make(mongodb, f"{db}.orders", max_await_ms=100)
    async with streaming(connector) as stream:
        await coll.insert_one({"_id": 1})
        await changes(stream, 1)
        mongodb.wire.store.truncate_oplog()
        [gap] = await take(stream, 1)
        await coll.insert_one({"_id": 2})
        [after] = await changes(stream, 1)
    assert isinstance(gap, Gap) and "oplog no longer holds" in gap.reason, gap
    assert after.key == 2
    assert connector.capture_faults == {"history_lost": 1}


async def test_a_change_event_over_16_mb_is_delivered_without_its_documents_and_a_gap(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    """A 9 MB document updated with pre- and post-images makes an event over 16 MB: MongoDB
    fails its batch (BSONObjectTooLarge, 10334), and every reopening from the connector's
    token, which stopped there for good (down, restarted by the hub, failing again). The
    changes before it arrive whole, it arrives without its documents, its collection's rooms
    get a gap, and the changes after it flow again."""
    coll = mongodb.client[db]["orders"]
    await mongodb.client[db].command(
        {"collMod": "orders", "changeStreamPreAndPostImages": {"enabled": True}}
    )
    connector = make(
        mongodb,
        f"{db}.orders",
        full_document="whenAvailable",
        full_document_before_change="whenAvailable",
        max_await_ms=100,
    )
    big = 9 * 1024 * 1024
    async with streaming(connector) as stream:
        await coll.insert_one({"_id": "big", "blob": "x" * big})
        await coll.insert_many([{"_id": n} for n in range(1, 6)])  # in the failing batch
        await coll.update_one({"_id": "big"}, {"$set": {"blob": "y" * big}})
        await coll.insert_one({"_id": 6})
        items = await take(stream, 9)
        await coll.insert_one({"_id": 7})
        [later] = await changes(stream, 1)
    first, *before, update, gap, after = items
    assert isinstance(first, Change) and first.key == "big" and first.after is not None
    assert [c.key for c in before if isinstance(c, Change)] == [1, 2, 3, 4, 5]
    assert isinstance(update, Change) and update.op == "update" and update.key == "big"
    assert update.before is None and update.after is None
    assert isinstance(gap, Gap) and gap.target == f"{db}.orders" and "16 MB" in gap.reason
    assert isinstance(after, Change) and after.key == 6 and after.after == {"_id": 6}
    assert later.key == 7
    assert connector.capture_faults == {"event_too_large": 1}
