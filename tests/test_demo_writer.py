"""The compose stack's pairing, without Docker: the demo writer's MongoDB changes reach the feed.

`feed demo` covers the writer's Postgres and Redis side (tests/test_demo.py); the compose stack
adds MongoDB, whose writer step runs here against the MongoDB test server (the wire server, or a
real replica set with FEED_TEST_MONGODB_URL) with the feed's MongoDB connector watching.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from feed.core.change import Change
from feed.demo.demo_writer import KEEP_ROWS, DemoWriter
from tests.support.mongodb import MongoSource, db, make, mongodb, take  # noqa: F401

pytestmark = pytest.mark.mongodb


async def test_writer_documents_arrive_as_inserts_updates_and_deletes(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    namespace = f"{db}.orders"
    writer = DemoWriter(mongodb_url=mongodb.url, mongodb_namespace=namespace, seed=7)
    connector = make(mongodb, namespace, resume_store="none")
    async with connector:
        stream = connector.changes()
        try:
            # Past KEEP_ROWS documents the writer starts deleting shipped ones.
            for _ in range(KEEP_ROWS + 3):
                await asyncio.wait_for(writer.tick(), 15)
            assert not writer._failing, "a MongoDB write failed"
            items = await take(stream, 2 * (KEEP_ROWS + 3) + 1)
        finally:
            await writer.close()
    ops = Counter(item.op for item in items if isinstance(item, Change))
    assert ops["insert"] >= KEEP_ROWS and ops["update"] >= KEEP_ROWS and ops["delete"] >= 1, ops
    assert {item.target for item in items if isinstance(item, Change)} == {namespace}
