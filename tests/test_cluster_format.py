"""Nodes of two builds on one Redis: the cluster format stamp (feed.engine.format).

A rolling upgrade runs nodes of two builds on one Redis, and a newer reader may publish what an
older node cannot read (since 2026-12-07: a change over 1 MiB goes as a `ref` message). Each
reader announces the cluster format it writes with its connector's status; a node that reads
an older one shows that connector down on itself, saying what to do, instead of "up" with
holes; a room message it cannot read is logged once and filled from the history. The older
build is simulated by FEED_TEST_CLUSTER_FORMAT=1 (a knob for tests only): the node reads and
announces format 1, so a `ref` is a head it does not know.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from feed.engine.format import CLUSTER_FORMAT, TEST_KNOB
from tests.support import postgres as pg_support
from tests.support import redis as redis_support
from tests.support.cluster import (
    FeedNode,
    cluster_config,
    memory,
    reader_and_other,
    reading_node,
    subscribed,
    write_postgres_config,
)
from tests.support.postgres import PgDatabase
from tests.support.redis import RedisTarget
from tests.support.server import FeedClient
from tests.support.waiting import wait_until

pg_server = pg_support.pg_server
pg = pg_support.pg
redis_target = redis_support.redis_target

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]

ROOM = "main:public.orders"
BIG = "x" * 2_000_000  # over 1 MiB: published as a reference (`ref`), read from the history
AHEAD = (
    f"the reader new writes cluster format {CLUSTER_FORMAT}, this build reads up to 1:"
    " finish the rolling upgrade"
)


async def metric(node: FeedNode, line_start: str) -> str | None:
    async with aiohttp.ClientSession() as http, http.get(f"{node.url}/metrics") as response:
        text = await response.text()
    return next((line for line in text.splitlines() if line.startswith(line_start)), None)


async def eventually(condition: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll a node's HTTP answers (no event tells a test when /readyz changes) until
    `condition` holds, failing with `what` after `timeout` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while not await condition():  # noqa: ASYNC110 - no event for this state
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


async def main_status(node: FeedNode) -> tuple[int, dict[str, Any], dict[str, Any]]:
    code, body = await node.readyz()
    return code, body["connectors"]["main"], body["cluster"]


@pytest.mark.postgres
async def test_a_node_of_an_older_format_shows_the_connector_down_and_misses_nothing(
    pg: PgDatabase, redis_target: RedisTarget, tmp_path: Path
) -> None:
    await pg.conn.execute("CREATE TABLE public.orders (id int PRIMARY KEY, blob text)")
    prefix = redis_target.prefix.rstrip(":")
    config = write_postgres_config(tmp_path / "feed.toml", pg.url, redis_target.url, prefix)
    new = FeedNode("new", config)
    old = FeedNode("old", config, env={TEST_KNOB: "1"})
    try:
        await new.start()
        await new.wait_ready()
        assert await reading_node([new]) is new
        await old.start()

        # The older node: the connector down with what to do, in /readyz (503), the catalog its
        # clients read, a metric and one log line; not "up" with holes.
        async def old_shows_down() -> bool:
            code, status, _ = await main_status(old)
            return code == 503 and status["state"] == "down" and status["detail"] == AHEAD

        await eventually(old_shows_down, 20, "the older node to show the connector down")
        _, status, cluster = await main_status(old)
        assert (status["reader"], cluster["format"]) == ("new", 1)
        assert cluster["format_behind"] == {"main": AHEAD}
        assert await metric(old, 'feed_cluster_format_behind{connector="main"}') == (
            'feed_cluster_format_behind{connector="main"} 1'
        )
        # The newer one is fine, and its reader says once which node is behind.
        code, status, cluster = await main_status(new)
        assert (code, status["state"], cluster["format"]) == (200, "up", CLUSTER_FORMAT)
        assert "format_behind" not in cluster

        async def reader_knows() -> bool:
            return (await main_status(new))[2].get("older_nodes") == {"old": 1}

        await eventually(reader_knows, 20, "the reader to find the older node")
        assert await metric(new, "feed_cluster_older_nodes ") == "feed_cluster_older_nodes 1"

        client = FeedClient(websocket_extra_options={"max_msg_size": 0})
        await client.connect(old.url)
        try:
            catalog = await client.call("catalog")
            seen = {c["name"]: c["status"] for c in catalog["connectors"]}
            assert (seen["main"]["state"], seen["main"]["detail"]) == ("down", AHEAD)
            assert (await client.subscribe(ROOM))["ok"]
            # A reference it cannot read, between two runs it can: all three, in order, the
            # large one filled from the room's history; no gap.
            await pg.conn.execute("INSERT INTO orders VALUES (1, 'small')")
            await pg.conn.execute("INSERT INTO orders VALUES (2, $1)", BIG)
            await pg.conn.execute("INSERT INTO orders VALUES (3, 'small')")
            await pg.conn.execute("INSERT INTO orders VALUES (4, $1)", BIG)
            got = await client.take(4, 30)
            assert [(c["seq"], c["key"]) for c in got] == [(1, 1), (2, 2), (3, 3), (4, 4)]
            assert [len(c["after"]["blob"]) for c in got] == [5, len(BIG), 5, len(BIG)]
            assert client.gaps.empty(), client.gaps.get_nowait()
        finally:
            await client.close()
        text = "".join(old.log)
        # Once per head it cannot read (the `ref`s here; an `epoch` notice too when the room's
        # numbering began with the subscribe), not once per message.
        assert text.count("a room message this build cannot read (b'ref'") == 1, text[-3000:]
        assert "Traceback" not in text and "bad cluster message" not in text, text[-3000:]
        assert text.count(AHEAD) >= 1
        assert "node old reads cluster format 1, this reader writes" in "".join(new.log)

        # The newer reader gone, the older node reads: the connector up there again.
        await new.stop()

        async def old_reads() -> bool:
            code, status, cluster = await main_status(old)
            return code == 200 and status["state"] == "up" and "format_behind" not in cluster

        await eventually(old_reads, 30, "the older node to read the connector")
    finally:
        await old.stop()
        await new.stop()


async def test_a_room_message_of_an_unknown_head_is_filled_from_the_history(
    redis_target: RedisTarget, caplog: pytest.LogCaptureFixture
) -> None:
    """A head this build does not know (as `ref` was to the builds before it): logged once,
    the room brought up to its seq from the history at once; not a traceback per message and
    the change held back until the room's next one."""
    t = redis_target
    async with AsyncExitStack() as stack:
        reader, other = await reader_and_other(stack, cluster_config(t.url, t.prefix))
        client = await FeedClient().connect(other.url)
        stack.push_async_callback(client.close)
        room = "mem:public.orders"
        await subscribed(client, room)
        memory(reader).write("public.orders", "insert", {"id": 1})
        first = await client.next_change(10)
        engine = reader.engine
        meta, stream = engine.meta_key(room), engine.stream_key(room)
        raw_epoch = await t.admin.hget(meta, "epoch")
        assert isinstance(raw_epoch, bytes)
        epoch = raw_epoch.decode()
        caplog.set_level(logging.INFO, "feed.engine.redis")
        for seq in (2, 3):
            # What a newer reader would do: keep the change, tell the nodes in a new way.
            payload = b'{"room":"%s","op":"insert","key":%d,"after":{"id":%d}}' % (
                room.encode(),
                seq,
                seq,
            )
            await t.admin.xadd(stream, {"d": payload}, f"{seq}-0")
            await t.admin.hset(meta, "seq", seq)
            message = b"future\n%d\n%s\nsomething new" % (seq, epoch.encode())
            await t.admin.publish(engine.channel(room), message)
            got = await client.next_change(10)
            assert (got["seq"], got["key"]) == (seq, seq), (first, got)
        assert client.gaps.empty(), client.gaps.get_nowait()
        lines = [r.getMessage() for r in caplog.records if r.name == "feed.engine.redis"]
        unknown = [line for line in lines if "cannot read" in line]
        assert len(unknown) == 1, lines
        assert not [r for r in caplog.records if r.exc_info and r.levelno >= logging.WARNING]
        # Its history gone, it is a gap at that seq, never a hole.
        await t.admin.hset(meta, "seq", 5)
        await t.admin.publish(engine.channel(room), b"future\n5\n%s" % epoch.encode())
        gap = await client.next_gap(10)
        assert (gap["seq"], gap["room"]) == (5, room), gap
        assert "cannot read" in gap["reason"]


async def test_a_reader_counts_the_nodes_that_announce_no_format(
    redis_target: RedisTarget, caplog: pytest.LogCaptureFixture
) -> None:
    """A node of a build from before the stamp announces nothing, but like every node it
    subscribes to the control channel: the reader counts the subscribers beyond the nodes that
    announce a format, says so once, and forgets them once they are gone."""
    t = redis_target
    caplog.set_level(logging.INFO, "feed.engine.redis")
    async with AsyncExitStack() as stack:
        reader, other = await reader_and_other(stack, cluster_config(t.url, t.prefix))
        engine = reader.engine
        assert engine.describe()["format"] == CLUSTER_FORMAT
        await wait_until(lambda: engine.older_nodes == {}, 10, "a first check")
        old_build = t.admin.pubsub()  # what an older node's listener does, and nothing else
        await old_build.subscribe(engine.control)
        try:
            await wait_until(lambda: engine.silent_nodes == 1, 10, "the reader to count it")
            assert engine.describe()["nodes_without_format"] == 1
            assert other.engine.describe().get("nodes_without_format") is None  # a reader's
        finally:
            await old_build.unsubscribe()
            await old_build.aclose()  # type: ignore[no-untyped-call]
        await wait_until(lambda: engine.silent_nodes == 0, 10, "the reader to forget it")
        assert "nodes_without_format" not in engine.describe()
    lines = [
        r.getMessage() for r in caplog.records if "announce no cluster format" in r.getMessage()
    ]
    assert len(lines) == 1, lines
    assert "1 node(s) on this cluster announce no cluster format" in lines[0]
