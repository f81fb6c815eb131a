"""MongoDB with several nodes on one Redis (`[cluster]`), in one test process.

Each node is the real app on its own port; the MongoDB connector reads the wire-protocol
server (or FEED_TEST_MONGODB_URL). The node holding the lease runs the connector; the others
serve their own clients from Redis.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest

from tests.support import redis as redis_support
from tests.support.cluster import reader_of, subscribed
from tests.support.mongodb import MongoSource, db, mongodb, shop_connector  # noqa: F401
from tests.support.redis import RedisTarget
from tests.support.server import feed_client, running_feed
from tests.support.waiting import wait_until

redis_target = redis_support.redis_target

pytestmark = [pytest.mark.mongodb, pytest.mark.redis]


def config(source: MongoSource, redis: RedisTarget, node: str, watch: str, extra: str = "") -> str:
    return f"""
[cluster]
url = "{redis.url}"
prefix = "{redis.prefix.rstrip(":")}"
lease = 10
node = "{node}"
{shop_connector(source, watch)}{extra}
"""


async def test_a_takeover_without_a_token_store_announces_a_gap(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
    redis_target: RedisTarget,
) -> None:
    """With `resume_store = "none"` the node taking the connector over starts from now: what
    was written while no node read it is gone, and its clients must be told. Before, they
    were not: after a kill -9 of the reader under a steady writer, the other nodes' clients
    missed every change of the takeover's window, with contiguous seqs and no gap."""
    extra = 'resume_store = "none"'
    async with AsyncExitStack() as outer:
        inner = AsyncExitStack()
        a = await inner.enter_async_context(
            running_feed(config(mongodb, redis_target, "a", f"{db}.orders", extra))
        )
        assert await reader_of([a], "shop") is a
        b = await outer.enter_async_context(
            running_feed(config(mongodb, redis_target, "b", f"{db}.orders", extra))
        )
        client = await outer.enter_async_context(feed_client(b.url))
        room = f"shop:{db}.orders"
        await subscribed(client, room)
        await mongodb.client[db]["orders"].insert_one({"_id": 1})
        assert (await client.next_change())["seq"] == 1
        await inner.aclose()  # a goes away; b takes over with no saved position
        assert await reader_of([b], "shop") is b
        gap = await client.next_gap(15)
        assert gap["room"] == room and "another node" in gap["reason"]
        await mongodb.client[db]["orders"].insert_one({"_id": 2})
        assert (await client.next_change())["key"] == 2  # and it goes on from there


async def test_a_watched_databases_collections_are_not_taken_for_another_config(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
    redis_target: RedisTarget,
) -> None:
    """The reader finds the collections of a database watched whole as it runs; a node that
    does not read knows only the config's `watch`. Every node compared the reader's targets
    with its own, and warned, with the same config everywhere, "run every node with the same
    config". Nodes compare the targets their configs give."""
    await mongodb.client[db]["people"].insert_one({"_id": 1})
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(running_feed(config(mongodb, redis_target, "a", db)))
        assert await reader_of([a], "shop") is a
        assert f"{db}.people" in a.hub.connectors["shop"].targets()  # found while reading
        b = await stack.enter_async_context(running_feed(config(mongodb, redis_target, "b", db)))
        await wait_until(
            lambda: b.hub.connectors["shop"].status.state.value == "up", 15, "the reader's status"
        )
        assert b.engine is not None
        assert b.engine.differing == {}
