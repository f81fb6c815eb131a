"""A resume answered while the room's numbering begins again, on nodes of the real app and Redis.

A resume with `since` and `epoch` is checked against the room's history in Redis (an await);
the node's listener may meanwhile take the room into a new epoch (Redis lost its meta and the
reader numbered its next change from 1 again). The answer must then not be `recovered: true`
with the new epoch: the client would take the old epoch's seq for the new one's, and drop the
new epoch's changes up to it as repeats (or be replayed the new epoch's changes as if they
followed its `since`).
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import pytest

from tests.support import redis as redis_support
from tests.support.cluster import cluster_config, memory, reader_and_other, subscribed
from tests.support.redis import RedisTarget
from tests.support.server import feed_client
from tests.support.waiting import wait_until

redis_target = redis_support.redis_target

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

ROOM = "mem:public.orders"
CHANGES = 300
"""More than a node's ring (feed.engine.mirror.RING): a resume from early on reads Redis."""


async def test_a_resume_checked_while_the_room_changes_epoch_is_not_recovered_in_the_new_one(
    redis_target: RedisTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = cluster_config(redis_target.url, redis_target.prefix, history=1000)
    meta = f"{redis_target.prefix.rstrip(':')}:room:{ROOM}:meta"
    async with AsyncExitStack() as stack:
        reader, other = await reader_and_other(stack, config)
        async with feed_client(other.url) as first:
            ack = await subscribed(first, ROOM)
            old = ack["epoch"]
            for i in range(1, CHANGES + 1):
                memory(reader).write("public.orders", "insert", {"id": i})
            await wait_until(lambda: other.hub.rooms[ROOM].seq == CHANGES, 15)
            engine = other.engine
            mirror = engine._mirrors[ROOM]
            history_read = engine._history_read
            calls: list[Any] = []

            async def read_then_new_epoch(*args: Any, **kwargs: Any) -> Any:
                """The resume's read finds the old epoch; before its answer is used, Redis
                loses the room's meta, the reader numbers its next change in a new epoch, and
                this node's listener follows it."""
                found = await history_read(*args, **kwargs)
                if kwargs.get("count") == 1 and not calls:
                    calls.append(found)
                    await redis_target.admin.delete(meta)
                    memory(reader).write("public.orders", "insert", {"id": CHANGES + 1})
                    await wait_until(lambda: mirror.epoch != old, 15, "the node in a new epoch")
                return found

            monkeypatch.setattr(engine, "_history_read", read_then_new_epoch)
            async with feed_client(other.url) as second:
                resumed = await subscribed(second, ROOM, since=10, epoch=old)
                monkeypatch.undo()
                assert calls and calls[0].epoch == old, calls  # the race took place as described
                new = mirror.epoch
                assert new != old
                # Recovered only in the epoch it asked for; in the new one, its own numbers:
                # the next change follows the answer's seq (it was 300, the old epoch's, and the
                # new epoch's changes up to 300 looked like repeats to a client).
                assert resumed["recovered"] is False, resumed
                assert resumed["epoch"] == new, resumed
                memory(reader).write("public.orders", "insert", {"id": CHANGES + 2})
                change = await second.next_change()
                assert change["seq"] == resumed["seq"] + 1, (change, resumed)
