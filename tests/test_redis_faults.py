"""Loss, outages and refusals, each on a Redis server of the test's own.

These tests restart Redis, shrink its output buffers, stop it with SIGSTOP or turn keyspace events
off, so they never run against a shared server even when FEED_TEST_REDIS_URL is set.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest

from connectors.redis import RedisConnector
from feed.core.change import Change, Gap
from feed.errors import SourceMisconfigured, SourceUnavailable
from feed.options import Options
from tests.support import redis as redis_support
from tests.support.redis import RedisServer, RedisTarget, free_port, open_private_redis
from tests.test_redis import take, take_until

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


private_redis = redis_support.private_redis


def connector(target: RedisTarget, **extra: Any) -> RedisConnector:
    return RedisConnector("cache", Options(target.config(**extra), "connectors[0]"))


async def keyspace_events(t: RedisTarget) -> str:
    """The server's notify-keyspace-events flags (CONFIG GET replies with text)."""
    flags = (await t.admin.config_get("notify-keyspace-events"))["notify-keyspace-events"]
    assert flags is not None, "CONFIG GET notify-keyspace-events gave no value"
    return flags


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text and "Traceback" not in text
    return text


async def test_server_restart_gives_a_gap_then_events_flow(private_redis: RedisTarget) -> None:
    t = private_redis
    assert t.server is not None
    async with connector(t) as source:
        stream = aiter(source.changes())
        await t.admin.set(t.key("a"), "1")
        await take(stream, 1)
        await t.restart_server()
        # The restarted server forgot notify-keyspace-events; configure = true sets it again.
        gap = (await take(stream, 1, timeout=15))[0]
        await t.admin.set(t.key("b"), "2")
        after = await take(stream, 1)
    assert isinstance(gap, Gap) and gap.reason.startswith("redis restarted")
    assert after[0].key == t.key("b")


async def test_full_output_buffer_is_announced(private_redis: RedisTarget) -> None:
    t, r = private_redis, private_redis.admin
    await r.config_set("client-output-buffer-limit", "pubsub 2kb 1kb 1")
    async with connector(t) as source:
        stream = aiter(source.changes())
        pipe = r.pipeline(transaction=False)
        for i in range(2000):  # one burst, far past 2 KiB of pending notifications
            pipe.set(t.key(f"k{i}"), "x")
        await pipe.execute()
        items = await take_until(stream, lambda item: isinstance(item, Gap), timeout=15)
        info = await r.info("stats")
        await r.set(t.key("after"), "1")
        later = await take_until(
            stream, lambda item: isinstance(item, Change) and item.key == t.key("after")
        )
    gap = items[-1]
    assert "dropped" in gap.reason
    assert len(items) - 1 < 2000  # events were really lost, and the loss was announced
    if "client_output_buffer_limit_disconnections" in info:  # Redis >= 7
        assert info["client_output_buffer_limit_disconnections"] >= 1
    assert all(isinstance(item, Change) for item in later)


async def test_silent_connection_is_found_by_health_check(private_redis: RedisTarget) -> None:
    t = private_redis
    assert t.server is not None and t.server.proc is not None
    proc = t.server.proc
    source = connector(t, health_check_interval=0.2, reconnect_timeout=30.0)
    down = asyncio.Event()
    source.on_status(lambda status: down.set() if status.state.value == "down" else None)
    async with source:
        stream = aiter(source.changes())
        proc.send_signal(signal.SIGSTOP)  # TCP stays open, nothing answers
        try:
            await asyncio.wait_for(down.wait(), timeout=5)
            assert "PING" in source.status.detail
        finally:
            proc.send_signal(signal.SIGCONT)
        gap = (await take(stream, 1, timeout=20))[0]
        await t.admin.set(t.key("a"), "1")
        after = await take(stream, 1, timeout=10)
    assert isinstance(gap, Gap)
    assert after[0].key == t.key("a")


async def test_outage_longer_than_reconnect_timeout_raises_then_restart_gaps(
    private_redis: RedisTarget,
) -> None:
    t = private_redis
    assert t.server is not None
    source = connector(t, reconnect_timeout=0.5)
    async with source:
        stream = aiter(source.changes())
        await asyncio.to_thread(t.server.stop)
        with pytest.raises(SourceUnavailable) as info:
            await take(stream, 1, timeout=10)
    assert "unreachable" in one_line(info.value)
    assert source.status.state.value == "stopped"
    await asyncio.to_thread(t.server.start)
    await t.admin.connection_pool.disconnect()
    async with source:  # what the hub does after its backoff
        gap = (await take(aiter(source.changes()), 1))[0]
    assert isinstance(gap, Gap) and "restarted" in gap.reason


async def test_keyspace_events_off_names_the_config_set(private_redis: RedisTarget) -> None:
    t = private_redis
    await t.admin.config_set("notify-keyspace-events", "Ex")
    current = await keyspace_events(t)
    with pytest.raises(SourceMisconfigured) as info:
        async with connector(t, configure=False):
            pass
    line = one_line(info.value)
    command = f"CONFIG SET notify-keyspace-events '{current}Kg$lshzet'"
    assert command in line
    # Pasted into a shell after redis-cli, the flags arrive as printed (no `$` expansion).
    shell = await asyncio.create_subprocess_exec(
        "sh", "-c", f"printf '%s\\n' {command}", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(shell.communicate(), 10)
    assert out.decode().split() == [
        "CONFIG",
        "SET",
        "notify-keyspace-events",
        f"{current}Kg$lshzet",
    ]
    assert "configure = true" in line

    async with connector(t, configure=True) as source:
        flags = await keyspace_events(t)
        stream = aiter(source.changes())
        await t.admin.set(t.key("a"), "1")
        assert (await take(stream, 1))[0].op == "set"
    assert set("Ex") <= set(flags)  # flags set by someone else are kept


async def test_refused_config_gets_one_line(private_redis: RedisTarget) -> None:
    server = RedisServer("--rename-command", "CONFIG", "")
    server.start()
    try:
        t = RedisTarget(url=server.url(), prefix="p:", admin=private_redis.admin, server=server)
        with pytest.raises(SourceMisconfigured) as info:
            async with connector(t, configure=True):
                pass
        assert "refuses CONFIG" in one_line(info.value)
        # Without configure the feed cannot check; it trusts the provider and starts.
        async with connector(t, configure=False) as source:
            assert source.status.state.value == "up"
    finally:
        server.close()


async def test_auth_failure_and_unreachable_get_one_line(private_redis: RedisTarget) -> None:
    server = RedisServer("--requirepass", "right")
    server.start()
    try:
        for url in (f"redis://:wrong@127.0.0.1:{server.port}/0", server.url()):
            t = RedisTarget(url=url, prefix="p:", admin=private_redis.admin)
            with pytest.raises(SourceMisconfigured) as info:
                async with connector(t):
                    pass
            text = one_line(info.value)
            assert "authentication failed" in text and "wrong" not in text.split("(")[0]
        good = RedisTarget(
            url=f"redis://:right@127.0.0.1:{server.port}/0", prefix="p:", admin=private_redis.admin
        )
        async with connector(good) as source:
            assert source.status.state.value == "up"
    finally:
        server.close()
    closed = RedisTarget(
        url=f"redis://127.0.0.1:{free_port()}/0", prefix="p:", admin=private_redis.admin
    )
    with pytest.raises(SourceUnavailable) as unreachable:
        async with connector(closed):
            pass
    assert "unreachable" in one_line(unreachable.value)


async def test_evictions_arrive_as_evicted(private_redis: RedisTarget) -> None:
    t, r = private_redis, private_redis.admin
    await r.config_set("maxmemory-policy", "allkeys-random")
    async with connector(t) as source:
        stream = aiter(source.changes())
        used = (await r.info("memory"))["used_memory"]
        await r.config_set("maxmemory", used + 200_000)
        pipe = r.pipeline(transaction=False)
        for i in range(400):
            pipe.set(t.key(f"k{i}"), "x" * 2000)
        await pipe.execute()
        items = await take_until(stream, lambda item: getattr(item, "op", "") == "evicted")
    assert items[-1].key.startswith(t.prefix)


async def test_slow_consumer_is_bounded_and_its_loss_announced(private_redis: RedisTarget) -> None:
    """The hub not pulling: the connector stops reading past max_pending, Redis buffers, cuts
    the subscriber at its output-buffer limit, and the loss arrives as a gap once pulled again."""
    t, r = private_redis, private_redis.admin
    await r.config_set("client-output-buffer-limit", "pubsub 64kb 32kb 1")
    async with connector(t, max_pending=10) as source:
        stream = aiter(source.changes())
        # ~20 MB of notifications (long keys), more than the kernel's socket buffers can hide.
        pad = "x" * 500
        for _ in range(20):
            pipe = r.pipeline(transaction=False)
            for i in range(1000):
                pipe.set(t.key(f"{pad}{i}"), "x")
            await pipe.execute()
        assert source._keyspace is not None
        assert source._keyspace._pending <= 10 + 200  # at most one socket read past the bound
        items = await take_until(stream, lambda item: isinstance(item, Gap), timeout=30)
        await r.set(t.key("after"), "1")
        later = await take_until(
            stream, lambda item: isinstance(item, Change) and item.key == t.key("after")
        )
    assert len(items) - 1 < 20000
    assert all(isinstance(item, Change) for item in later)


async def test_unreadable_values_still_deliver_the_event() -> None:
    async with (
        open_private_redis("--rename-command", "EVALSHA", "", "--rename-command", "EVAL", "") as t,
        connector(t, fetch_values=True) as source,
    ):
        stream = aiter(source.changes())
        await t.admin.set(t.key("a"), "1")
        change, gap = await take(stream, 2)
    assert change.op == "set" and change.after is None
    assert "unknown command" in change.meta["value_error"].lower()
    # Then a gap for the rooms the change reached: a client keeping rows cannot apply it.
    assert (
        isinstance(gap, Gap) and gap.target == change.target and gap.keys == frozenset([change.key])
    )
    assert source.capture_faults == {"value_read": 1}


async def test_a_lone_cluster_node_is_answered_in_one_line() -> None:
    """A cluster node whose cluster serves no slots yet: a database other than 0 is a config
    mistake; either mode waits (retryably) for a primary to serve slots."""
    async with open_private_redis("--cluster-enabled", "yes") as t:
        with pytest.raises(SourceMisconfigured) as info:
            async with connector(t, url=t.url.rsplit("/", 1)[0] + "/3"):
                pass
        assert "a cluster has only database 0" in one_line(info.value)
        for mode in ("keyspace", "streams"):
            with pytest.raises(SourceUnavailable) as unavailable:
                async with connector(t, mode=mode, patterns=[t.prefix + "s"]):
                    pass
            assert "has no primary serving slots yet" in one_line(unavailable.value)


async def test_backlog_is_reported_as_lagging(private_redis: RedisTarget) -> None:
    t, r = private_redis, private_redis.admin
    source = connector(t, max_pending=100)
    states: list[str] = []
    source.on_status(lambda status: states.append(status.state.value))
    async with source:
        stream = aiter(source.changes())
        pipe = r.pipeline(transaction=False)
        for i in range(300):
            pipe.set(t.key(f"k{i}"), "x")
        await pipe.execute()
        await take(stream, 300)
        await r.set(t.key("last"), "x")
        await take(stream, 1)
    assert states[:3] == ["up", "lagging", "up"]
