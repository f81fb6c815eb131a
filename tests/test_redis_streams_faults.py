"""Streams mode against a Redis of the test's own that loses its data, refuses the saves or goes
away: every loss is a gap, every failure one line."""

from __future__ import annotations

from typing import Any

import pytest

from connectors.redis import RedisConnector
from feed.core.change import Change, Gap
from feed.errors import ConnectorError, SourceMisconfigured, SourceUnavailable
from feed.options import Options
from tests.connector_contract import generator
from tests.support import redis as redis_support
from tests.support.redis import RedisTarget
from tests.test_redis import take

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

private_redis = redis_support.private_redis


def connector(t: RedisTarget, url: str | None = None, **extra: Any) -> RedisConnector:
    table = t.config(mode="streams", patterns=[t.key("orders")], offsets_key=t.key("offsets"))
    table.pop("configure")
    table.update(url=url or t.url, reconnect_timeout=0.2, **extra)
    return RedisConnector("cache", Options(table, "connectors[0]"))


async def test_a_redis_restarted_without_its_data_is_a_gap_not_a_first_start(
    private_redis: RedisTarget,
) -> None:
    """The private server keeps nothing (`--save ""`, no AOF): its restart takes the stream and
    the saved positions with it. The hub restarts the connector (the same object) afterwards:
    what was written since Redis came back must arrive, after a gap for the rows that are gone,
    not be skipped as a first start at "latest"."""
    t, r = private_redis, private_redis.admin
    source = connector(t)
    async with source:
        stream = generator(source.changes())
        await r.xadd(t.key("orders"), {"n": "1"})
        await r.xadd(t.key("orders"), {"n": "1b"})
        # Asked for the second: the first is routed, and its position saved at stop.
        first, _ = await take(stream, 2)
        assert isinstance(first, Change)
        await stream.aclose()
    await t.restart_server()
    assert await r.exists(t.key("offsets"), t.key("orders")) == 0  # the data is gone
    await r.xadd(t.key("orders"), {"n": "2"})
    await r.xadd(t.key("orders"), {"n": "3"})
    async with source:
        stream = generator(source.changes())
        gap, *entries = await take(stream, 3)
        await stream.aclose()
    assert isinstance(gap, Gap) and gap.target == t.key("orders")
    assert "offsets_key" in gap.reason and "lost its position" in gap.reason
    assert [c.after["n"] for c in entries] == ["2", "3"]


async def test_a_save_refused_is_one_line(private_redis: RedisTarget) -> None:
    """A user without HSET on offsets_key, or a read-only replica as url: the connector stops
    with one line naming offsets_key, not redis-py's exception (logged by the hub as a crash,
    with a traceback, at every retry)."""
    t, r = private_redis, private_redis.admin
    await r.acl_setuser(
        "nosave", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
        commands=["+@all", "-hset"],
    )  # fmt: skip
    url = t.url.replace("redis://", "redis://nosave:pw@")
    with pytest.raises(SourceMisconfigured) as refused:
        async with connector(t, url=url):
            pass
    line = str(refused.value)
    assert line.startswith(
        f"redis at {t.url.removeprefix('redis://')}: cannot save positions in offsets_key "
        f"'{t.key('offsets')}': permission denied (this user has no permissions to run the 'hset'"
    )
    assert "\n" not in line

    async with redis_support.open_private_redis() as primary:
        await r.replicaof("127.0.0.1", primary.server.port)  # type: ignore[union-attr]
        with pytest.raises(SourceMisconfigured, match=r"is a read-only replica: .*offsets_key"):
            async with connector(t):
                pass
        await r.replicaof("NO", "ONE")


async def test_redis_gone_while_positions_are_saved_is_one_line(
    private_redis: RedisTarget,
) -> None:
    """Redis stops right after entries were delivered: the save that follows fails. That used to
    end the stream with redis-py's ConnectionError (a crash with a traceback in the hub's log);
    now the readers report the outage, as a ConnectorError, after `reconnect_timeout`."""
    t, r = private_redis, private_redis.admin
    async with connector(t) as source:
        stream = aiter(source.changes())
        await r.xadd(t.key("orders"), {"n": "1"})
        await take(stream, 1)
        assert t.server is not None
        t.server.stop()
        with pytest.raises(ConnectorError) as failed:
            await take(stream, 1, timeout=15)
        assert isinstance(failed.value, SourceUnavailable)
        assert "is unreachable" in str(failed.value)


async def test_check_finds_a_user_refused_the_reads(private_redis: RedisTarget) -> None:
    """`feed check` said ok for a user refused XREAD (start makes no XREAD), and `serve`
    stopped at its first read."""
    t, r = private_redis, private_redis.admin
    await r.acl_setuser(
        "noread", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
        commands=["+@all", "-xread"],
    )  # fmt: skip
    source = connector(t, url=t.url.replace("redis://", "redis://noread:pw@"))
    with pytest.raises(SourceMisconfigured) as refused:
        await source.check()
    assert "permission denied (this user has no permissions to run the 'xread'" in str(
        refused.value
    )
    assert "streams mode" in await connector(t).check()
