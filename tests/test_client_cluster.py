"""dbfeed_client on a cluster: when its node goes away it resumes on another, `recovered`.

Two nodes of one feed on one Redis (tests/support/cluster.py's nodes in this process); the client
is given both URLs and reaches the first through a proxy the test cuts. The room's numbers and
history live in Redis, so the other node replays what was missed: nothing missing, nothing twice,
and no reload.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import pytest
from dbfeed_client import ConnectError, FeedClient

from tests.support import redis as redis_support
from tests.support.cluster import (
    cluster_config,
    confirmed_reader,
    memory,
    reader_and_other,
    reader_of,
    start_nodes,
)
from tests.support.proxy import Blackhole, CuttableProxy
from tests.support.redis import RedisTarget, open_private_redis
from tests.support.server import free_port
from tests.support.waiting import wait_until
from tests.test_client_python import Log, assert_once_in_order

pytestmark = pytest.mark.redis

ROOM = "mem:public.orders"


redis_target = redis_support.redis_target


async def test_the_client_resumes_on_another_node_with_nothing_missing_or_twice(
    redis_target: RedisTarget,
) -> None:
    config = cluster_config(redis_target.url, redis_target.prefix, history=1000)
    async with AsyncExitStack() as stack:
        nodes = await start_nodes(stack, config, 2)
        reader = await reader_of(nodes)
        first, second = nodes
        proxy = CuttableProxy(int(first.url.rsplit(":", 1)[1]))
        await proxy.start()
        stack.push_async_callback(proxy.close)
        feed = FeedClient(
            [f"http://127.0.0.1:{proxy.port}", second.url],
            reconnection_delay=0.1,
            reconnection_delay_max=1.0,
        )
        await stack.enter_async_context(feed)
        sub = await stack.enter_async_context(feed.subscribe(ROOM, snapshot=True))
        log = Log(sub)
        for i in range(1, 11):
            memory(reader).write("public.orders", "insert", {"id": i, "status": "new"})
        await log.until(lambda: len(log.changes) == 10, "10 changes on the first node")

        proxy.cut()  # the first node is gone for this client
        await log.until(lambda: sub.state == "pending", "the drop")
        for i in range(11, 21):
            memory(reader).write("public.orders", "insert", {"id": i, "status": "new"})
        memory(reader).write("public.orders", "update", {"id": 3, "status": "paid"})
        await log.until(lambda: len(log.changes) == 21, "the changes made while away")

        assert feed.url == second.url
        assert_once_in_order(log.changes, 1, 21)
        assert ("recovered", {"replayed": 11}) in log.states, log.states
        assert "reload" not in log.names
        assert sub.rows is not None and len(sub.rows) == 20
        assert sub.rows["3"]["status"] == "paid"
        memory(reader).write("public.orders", "delete", {"id": 4})
        await log.until(lambda: "4" not in (sub.rows or {}), "live on the second node")


async def test_after_redis_lost_the_history_the_client_follows_the_new_numbering() -> None:
    """Redis restarted without persistence: the room's numbering begins again in a new epoch,
    and the node says so with a `gap`. A subscription without a snapshot goes on in the new
    numbering: the changes after the gap arrive (they were taken for repeats of the old seq 1
    to 5 and dropped), and a resume names the new epoch."""
    async with open_private_redis() as target, AsyncExitStack() as stack:
        reader, other = await reader_and_other(stack, cluster_config(target.url, "renumbered"))
        nodes = [reader, other]
        # One source, read by whichever node holds it: one id space (the clients drop an id
        # seen before, whatever the epoch), though each node's memory connector has its rows.
        memory(other)._positions = memory(reader)._positions
        feed = await stack.enter_async_context(FeedClient(other.url))
        sub = await stack.enter_async_context(feed.subscribe(ROOM))
        log = Log(sub)
        for i in range(1, 6):
            memory(reader).write("public.orders", "insert", {"id": i})
        await log.until(lambda: len(log.changes) == 5, "5 changes")
        old_epoch = sub.epoch
        assert target.server is not None
        await asyncio.to_thread(target.server.stop)
        await asyncio.to_thread(target.server.start)
        await log.until(lambda: "reload" in log.names, "the gap for the lost history")
        reader = await confirmed_reader(nodes, target.admin)
        memory(reader).write("public.orders", "insert", {"id": 6})
        await log.until(lambda: len(log.changes) == 6, "the change after the gap")
        assert (log.changes[-1]["key"], log.changes[-1]["seq"]) == (6, 1)
        assert sub.epoch is not None and sub.epoch != old_epoch
        assert (sub.seq, sub.state) == (1, "live")


async def test_a_subscribe_refused_while_redis_is_away_goes_live_once_it_is_back() -> None:
    """`cluster_unavailable` says "retry shortly": the library does, with backoff, instead of
    failing the subscription for good (a page loaded, or a client reconnected, during a Redis
    restart used to end in the `error` state and receive nothing once Redis was back)."""
    async with open_private_redis() as target, AsyncExitStack() as stack:
        reader, other = await reader_and_other(stack, cluster_config(target.url, "away"))
        nodes = [reader, other]
        feed = await stack.enter_async_context(FeedClient(other.url))
        assert target.server is not None
        await asyncio.to_thread(target.server.stop)
        refused = await feed._call("subscribe", {"room": ROOM})
        assert refused["error"]["code"] == "cluster_unavailable", refused
        sub = feed.subscribe(ROOM)
        log = Log(sub)
        # The library's retries are its own business: no event tells of one.
        await wait_until(lambda: sub._retries > 0 or "error" in log.names, 30, "a refusal")
        assert "error" not in log.names, log.states
        await asyncio.to_thread(target.server.start)
        await asyncio.wait_for(sub.ready(), 30)
        assert sub.state == "live", log.states
        reader = await confirmed_reader(nodes, target.admin)
        memory(reader).write("public.orders", "insert", {"id": 1})
        await log.until(lambda: len(log.changes) == 1, "a change once Redis is back", 30)


async def test_a_client_cut_off_by_a_blackhole_moves_to_another_node_and_recovers(
    redis_target: RedisTarget,
) -> None:
    """A half-open websocket: the network between the client and its node drops every packet
    and closes nothing. The node drops the client after its ping timeout; the client notices
    the silence too and resumes on the next node, `recovered`. Its reconnect to the cut-off node
    used to wait forever (python-engineio bounds neither the websocket handshake nor the wait
    for its OPEN packet), never reaching the other node while the partition lasted."""
    config = cluster_config(redis_target.url, redis_target.prefix, history=1000).replace(
        "[server]\n", "[server]\nping_interval = 1\nping_timeout = 1\n"
    )
    async with AsyncExitStack() as stack:
        nodes = await start_nodes(stack, config, 2)
        reader = await reader_of(nodes)
        first, second = nodes
        hole = await stack.enter_async_context(Blackhole(int(first.url.rsplit(":", 1)[1])))
        feed = FeedClient(
            [f"http://127.0.0.1:{hole.port}", second.url],
            reconnection_delay=0.1,
            reconnection_delay_max=1.0,
            timeout=2.0,
        )
        await stack.enter_async_context(feed)
        sub = await stack.enter_async_context(feed.subscribe(ROOM, snapshot=True))
        log = Log(sub)
        for i in range(1, 6):
            memory(reader).write("public.orders", "insert", {"id": i, "status": "new"})
        await log.until(lambda: len(log.changes) == 5, "5 changes on the first node")
        assert len(first.app.sio.eio.sockets) == 1

        hole.blackhole()
        for i in range(6, 11):
            memory(reader).write("public.orders", "insert", {"id": i, "status": "new"})
        # ping_interval + ping_timeout for each side to notice, then the next node
        await log.until(lambda: len(log.changes) == 10, "the changes made while cut off", 15)
        assert feed.url == second.url
        assert_once_in_order(log.changes, 1, 10)
        assert ("recovered", {"replayed": 5}) in log.states, log.states
        assert "reload" not in log.names
        await wait_until(lambda: not first.app.sio.eio.sockets, 10, "the first node to drop it")
        await hole.heal()


async def test_after_losing_its_node_the_client_tries_the_other_nodes_before_that_one(
    redis_target: RedisTarget,
) -> None:
    """Nodes [A, B]: A's host goes down (the client's connection is reset, new connections to
    A are never answered). The next attempt goes to B, not to A again: the client used to wait
    out a whole `timeout` on A before it tried B."""
    config = cluster_config(redis_target.url, redis_target.prefix, history=1000)
    async with AsyncExitStack() as stack:
        nodes = await start_nodes(stack, config, 2)
        reader = await reader_of(nodes)
        first, second = nodes
        hole = await stack.enter_async_context(Blackhole(int(first.url.rsplit(":", 1)[1])))
        feed = FeedClient(
            [f"http://127.0.0.1:{hole.port}", second.url],
            reconnection_delay=0.1,
            reconnection_delay_max=1.0,
            timeout=8.0,
        )
        await stack.enter_async_context(feed)
        sub = await stack.enter_async_context(feed.subscribe(ROOM))
        log = Log(sub)
        for i in range(1, 6):
            memory(reader).write("public.orders", "insert", {"id": i, "status": "new"})
        await log.until(lambda: len(log.changes) == 5, "5 changes on the first node")

        hole.blackhole()
        hole.drop()
        await log.until(lambda: sub.state == "pending", "the drop")
        lost_at = asyncio.get_running_loop().time()
        for i in range(6, 11):
            memory(reader).write("public.orders", "insert", {"id": i, "status": "new"})
        await log.until(lambda: len(log.changes) == 10, "the changes made while away", 15)
        took = asyncio.get_running_loop().time() - lost_at
        assert not hole.links, "the client tried the lost node again first"
        # Well within the 8 s an attempt on A waits for its answer.
        assert took < 4.0, f"live again on B {took:.1f} s after the loss"
        assert feed.url == second.url
        assert_once_in_order(log.changes, 1, 10)
        assert ("recovered", {"replayed": 5}) in log.states, log.states


async def test_the_backoff_waits_after_a_round_of_every_node_not_after_each_one(
    redis_target: RedisTarget,
) -> None:
    """Nodes [down, down, up]: the client goes straight on to the next node after each
    refusal, and only a whole round of failures waits out `reconnection_delay` (doubling per
    round). It used to wait after each node: 2 s, then 4 s, before the third was tried."""
    config = cluster_config(redis_target.url, redis_target.prefix)
    async with AsyncExitStack() as stack:
        (node,) = await start_nodes(stack, config, 1)
        down = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
        feed = FeedClient([*down, node.url], reconnection_delay=2.0, reconnection_delay_max=8.0)
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(stack.enter_async_context(feed), 10)
        took = asyncio.get_running_loop().time() - started
        assert feed.url == node.url
        assert took < 1.0, f"connected after {took:.1f} s"


async def test_a_first_connect_moves_past_a_silent_node_to_the_next_one(
    redis_target: RedisTarget,
) -> None:
    """Nodes [blackholed, good]: the first attempt gets no answer and is given up after
    `timeout`, and the next node is tried, as at a reconnect (and as the JavaScript library's
    first connect does: clients/js/test/partition.test.mjs). `timeout` used to bound the first connect as a whole: the silent node
    used it all up, and `connect()` raised `unreachable` with the good node never tried."""
    config = cluster_config(redis_target.url, redis_target.prefix, history=1000)
    async with AsyncExitStack() as stack:
        nodes = await start_nodes(stack, config, 2)
        reader = await reader_of(nodes)
        first, second = nodes
        hole = await stack.enter_async_context(Blackhole(int(first.url.rsplit(":", 1)[1])))
        hole.blackhole()
        feed = FeedClient([f"http://127.0.0.1:{hole.port}", second.url], timeout=2.0)
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(stack.enter_async_context(feed), 10)
        took = asyncio.get_running_loop().time() - started
        assert feed.url == second.url
        assert len(hole.links) == 1, "the silent node was tried first"
        # One attempt's `timeout` on the silent node, then at once the good one.
        assert 1.9 < took < 3.5, f"connected after {took:.1f} s"
        sub = await stack.enter_async_context(feed.subscribe(ROOM))
        log = Log(sub)
        memory(reader).write("public.orders", "insert", {"id": 1, "status": "new"})
        await log.until(lambda: len(log.changes) == 1, "a change, live on the good node")


async def test_a_first_connect_to_silent_nodes_raises_unreachable_once_each_was_tried(
    redis_target: RedisTarget,
) -> None:
    """Nodes [blackholed, blackholed]: each attempt is given up after `timeout`, and `connect()`
    raises `unreachable` once `timeout` has passed and every node was tried (here after two
    attempts, 2 x `timeout`), naming them all; the client keeps nothing open."""
    config = cluster_config(redis_target.url, redis_target.prefix)
    async with AsyncExitStack() as stack:
        nodes = await start_nodes(stack, config, 2)
        holes = [
            await stack.enter_async_context(Blackhole(int(node.url.rsplit(":", 1)[1])))
            for node in nodes
        ]
        for hole in holes:
            hole.blackhole()
        urls = [f"http://127.0.0.1:{hole.port}" for hole in holes]
        feed = FeedClient(urls, timeout=1.0, reconnection_delay=0.1)
        started = asyncio.get_running_loop().time()
        with pytest.raises(ConnectError) as failed:
            await asyncio.wait_for(feed.connect(), 10)
        took = asyncio.get_running_loop().time() - started
        assert failed.value.code == "unreachable"
        assert all(url in str(failed.value) for url in urls), str(failed.value)
        assert [len(hole.links) for hole in holes] == [1, 1], "each node tried once"
        assert 1.9 < took < 3.5, f"raised after {took:.1f} s"
        assert not feed.connected
