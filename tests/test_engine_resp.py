"""The engine's own Redis connections (feed.engine.resp) against a real redis-server: the
script caller's reload and its overdue-reply cut-off; the subscriber's messages. The cluster
tests (tests/test_cluster*.py) use both through real nodes."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from feed.engine.resp import Caller, ReplyError, Subscriber
from tests.support.redis import open_private_redis

pytestmark = pytest.mark.redis

SCRIPT = "return {tonumber(ARGV[1]) + 1, KEYS[1]}"


async def test_a_script_runs_again_after_redis_forgot_it() -> None:
    async with open_private_redis() as target:
        caller = await Caller.open(target.url, answer=2.0)
        try:
            assert await caller.script(SCRIPT, ["k"], [41]) == [42, b"k"]
            await target.admin.script_flush()
            assert await caller.script(SCRIPT, ["k"], [1]) == [2, b"k"]
            with pytest.raises(ReplyError, match="STALE"):
                await caller.script("return redis.error_reply('STALE token')", [], [])
        finally:
            caller.close()


async def test_scripts_run_in_the_urls_database() -> None:
    async with open_private_redis() as target:
        caller = await Caller.open(target.url.rpartition("/")[0] + "/3", answer=2.0)
        try:
            await caller.script("return redis.call('SET', KEYS[1], ARGV[1])", ["here"], ["x"])
        finally:
            caller.close()
        assert await target.admin.get("here") is None  # not in database 0
        third = Redis.from_url(target.url.rpartition("/")[0] + "/3")
        try:
            assert await third.get("here") == b"x"
        finally:
            await third.aclose()


async def test_a_reply_that_does_not_come_ends_the_connection() -> None:
    async with open_private_redis() as target:
        assert target.server is not None and target.server.proc is not None
        caller = await Caller.open(target.url, answer=1.0)
        target.server.proc.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(ConnectionError, match="no answer"):
                await asyncio.wait_for(caller.script(SCRIPT, ["k"], [1]), 5)
            assert time.monotonic() - started < 3
            assert caller.lost
        finally:
            target.server.proc.send_signal(signal.SIGCONT)


async def test_the_subscriber_reads_what_is_published_in_order() -> None:
    async with open_private_redis() as target:
        subscriber = await Subscriber.open(target.url, answer=2.0)
        try:
            subscriber.subscribe(b"room")
            assert await asyncio.wait_for(subscriber.read(), 5) == [[b"subscribe", b"room", 1]]
            for n in range(50):
                await target.admin.publish("room", str(n))
            got: list[bytes] = []
            async with asyncio.timeout(5):
                while len(got) < 50:
                    got += [m[2] for m in await subscriber.read() if m[0] == b"message"]
            assert got == [str(n).encode() for n in range(50)]
            await target.admin.client_kill_filter(_type="pubsub")
            with pytest.raises(ConnectionError):
                async with asyncio.timeout(5):
                    while True:
                        await subscriber.read()
        finally:
            subscriber.close()


async def test_messages_taken_in_the_read_callback_never_pass_those_left_to_read() -> None:
    """`direct` takes what it can as it arrives (read never returns those), but only while
    nothing waits to be read and the reader is not busy handling what it read: whichever way
    each message goes, they are handled in the order they were published."""
    async with open_private_redis() as target:
        subscriber = await Subscriber.open(target.url, answer=2.0)
        handled: list[bytes] = []
        took = asyncio.Event()

        def direct(message: list[Any]) -> bool:
            if message[0] == b"message" and message[2].startswith(b"d"):
                handled.append(message[2])
                return True
            return False

        subscriber.direct, subscriber.direct_done = direct, took.set
        try:
            subscriber.subscribe(b"room")
            assert await asyncio.wait_for(subscriber.read(), 5) == [[b"subscribe", b"room", 1]]
            for n in range(3):  # nothing waits: taken at once
                await target.admin.publish("room", f"d{n}")
            async with asyncio.timeout(5):
                while len(handled) < 3:
                    took.clear()
                    await took.wait()
            assert handled == [b"d0", b"d1", b"d2"]

            subscriber.busy = True  # the reader is handling what it read: nothing passes it
            await target.admin.publish("room", "d3")
            assert [m[2] for m in await asyncio.wait_for(subscriber.read(), 5)] == [b"d3"]
            handled.append(b"d3")

            # A stream of both kinds, read as the cluster listener reads: busy from the moment
            # read returns until what it returned is handled (which may await).
            bodies = [f"{'q' if n % 3 == 1 else 'd'}{n}".encode() for n in range(4, 64)]

            async def publish() -> None:
                for at in range(0, len(bodies), 3):  # a q and two d's in one read, mostly
                    async with target.admin.pipeline(transaction=False) as pipe:
                        for body in bodies[at : at + 3]:
                            pipe.publish("room", body)
                        await pipe.execute()

            publishing = asyncio.create_task(publish())
            async with asyncio.timeout(10):
                while len(handled) < 4 + len(bodies):
                    subscriber.busy = False
                    messages = await subscriber.read()
                    subscriber.busy = True
                    for message in messages:
                        if message[0] == b"message":
                            await asyncio.sleep(0)  # a handler that awaits
                            handled.append(message[2])
                await publishing
            assert handled == [b"d0", b"d1", b"d2", b"d3", *bodies]
        finally:
            subscriber.close()


def test_commands_are_packed_alike_with_and_without_hiredis_packer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both packers write the same RESP, whatever the argument types a publishing call has."""
    from feed.engine import resp

    parts: list[bytes | str | int] = [b"EVALSHA", "sha", 2, -7, 2**40, "é ü", b"", b"a\r\nb", ""]
    packed = resp.pack(parts)
    monkeypatch.setattr(resp, "_pack_command", None)
    assert resp.pack(parts) == packed
    assert packed.startswith(b"*9\r\n$7\r\nEVALSHA\r\n$3\r\nsha\r\n$1\r\n2\r\n$2\r\n-7\r\n")
