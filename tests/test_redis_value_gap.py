"""A Redis value that cannot be read after its keyspace event ends in a gap, not a stale row.

With `fetch_values`, the connector reads each changed key's value after its event. When that
read fails (an ACL that refuses the script, a timeout, a dropped data connection while the
pub/sub one lives), the change still goes out with `after: null` and `meta.value_error`. A client
keeping rows cannot apply it: the library kept the key's old value (or a `{"key"}` stub) and
nothing told it so. The feed now follows such changes with a `gap` for the rooms they reached
(the pattern room, its filter rooms, that key's row rooms; not other keys' row rooms), counted
in `feed_capture_faults_total{kind="value_read"}`, and the library reloads to the right rows.

The read is made to fail for real: the server's ACL takes EVALSHA and EVAL from the feed's user
while the keyspace events still arrive, and gives them back as soon as the client sees the
value-less change (before the gap behind it), so the reload's snapshot reads the value.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import redis
from dbfeed_client import FeedClient, Subscription

from tests.support import redis as redis_support
from tests.support.redis import RedisTarget, open_private_redis
from tests.support.server import http_get, running_feed

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]
WAIT = 15.0


def config(t: RedisTarget, shared: RedisTarget | None) -> str:
    cluster = ""
    if shared is not None:  # gaps then go through the cluster engine (feed.engine.publisher)
        cluster = f'[cluster]\nurl = "{shared.url}"\nprefix = "{shared.prefix.rstrip(":")}"\n'
    return f"""{cluster}
[[connectors]]
name = "cache"
type = "redis"
url = "{t.url}"
patterns = ["{t.key("user:*")}"]
configure = true
fetch_values = true
health_check_interval = 0.5
"""


class Watch:
    """What one subscription reports, with a wait on a condition of it (with a deadline)."""

    def __init__(self, sub: Subscription) -> None:
        self.sub = sub
        self.changes: list[dict[str, Any]] = []
        self.states: list[str] = []
        self._event = asyncio.Event()
        sub.on("change", lambda change: self._add(self.changes, change))
        sub.on("state", lambda state, info: self._add(self.states, state))
        sub.on("snapshot", lambda rows, info: self._event.set())

    def _add(self, into: list[Any], item: Any) -> None:
        into.append(item)
        self._event.set()

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        try:
            async with asyncio.timeout(WAIT):
                while not condition():
                    self._event.clear()
                    await self._event.wait()
        except TimeoutError:
            raise AssertionError(f"{what}; rows {self.sub.rows}, states {self.states}") from None

    def value(self, key: str) -> Any:
        row = (self.sub.rows or {}).get(key)
        return None if row is None else row.get("value")


redis_target = redis_support.redis_target


@pytest.mark.parametrize("in_cluster", [False, True], ids=["single", "cluster"])
async def test_unreadable_value_gaps_its_rooms_and_clients_reload(
    in_cluster: bool, redis_target: RedisTarget
) -> None:
    shared = redis_target if in_cluster else None
    async with open_private_redis() as t, running_feed(config(t, shared)) as feed:
        a, b, new = t.key("user:a"), t.key("user:b"), t.key("user:new")
        pattern = f"cache:{t.key('user:*')}"
        await t.admin.set(a, "1")
        await t.admin.set(b, "1")
        admin = redis.Redis.from_url(t.url)  # a blocking one, for the change callback below
        async with FeedClient(feed.url) as client:
            whole = Watch(client.subscribe(pattern, snapshot=True))
            row_a = Watch(client.subscribe(f"{pattern}:{a}", snapshot=True))
            row_b = Watch(client.subscribe(f"{pattern}:{b}", snapshot=True))
            for watch in (whole, row_a, row_b):
                await asyncio.wait_for(watch.sub.ready(), WAIT)
            assert whole.value(a) == "1" and row_a.value(a) == "1" and row_b.value(b) == "1"

            def give_back(change: dict[str, Any]) -> None:
                # Called as the client takes the value-less change, before the gap behind it.
                if "value_error" in (change.get("meta") or {}):
                    give = ("ACL", "SETUSER", "default", "+evalsha", "+eval")
                    admin.execute_command(*give)  # type: ignore[no-untyped-call]

            whole.sub.on("change", give_back)
            take = ("ACL", "SETUSER", "default", "-evalsha", "-eval")
            await t.admin.execute_command(*take)  # type: ignore[no-untyped-call]
            async with t.admin.pipeline(transaction=True) as multi:
                multi.set(a, "2")
                multi.set(new, "x")
                await multi.execute()
            await whole.until(
                lambda: any("value_error" in (c.get("meta") or {}) for c in whole.changes),
                "no value-less change arrived",
            )
            # The change itself still arrives, as documented (a later one may not reach the
            # client's `change` callback: the reload's snapshot already holds it).
            failed = [c for c in whole.changes if "value_error" in (c.get("meta") or {})]
            assert failed[0]["key"] == a and failed[0]["after"] is None
            assert "no permissions" in failed[0]["meta"]["value_error"]

            # Before: the pattern room kept a's old value and a `{"key"}` stub for the new key.
            await whole.until(
                lambda: whole.value(a) == "2" and whole.value(new) == "x",
                "the pattern room's rows stayed stale",
            )
            await row_a.until(lambda: row_a.value(a) == "2", "a's row room stayed stale")
            assert "reload" in whole.states and "reload" in row_a.states

            # Another key's row room is not disturbed: b's next change is its next event.
            await t.admin.set(b, "3")
            await row_b.until(lambda: row_b.value(b) == "3", "b's change did not arrive")
            assert "reload" not in row_b.states
        admin.close()

        assert feed.hub.connectors["cache"].capture_faults.get("value_read", 0) >= 1
        status, body = await http_get(f"{feed.url}/metrics")
        assert status == 200
        assert 'feed_capture_faults_total{connector="cache",kind="value_read"}' in body
