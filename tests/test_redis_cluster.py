"""Redis Cluster: keyspace events from every primary, values and snapshots across slots, and
topology changes (a lost pub/sub connection, a failover) announced as gaps.

Against a real cluster of redis-server processes the suite starts (tests/support/redis_cluster.py);
a cluster is never shared, so these tests ignore FEED_TEST_REDIS_URL.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar

import pytest
from redis.asyncio import Redis

from connectors.redis import RedisConnector
from connectors.redis_cluster import ClusterNode, serving_primaries
from feed.core.change import Change, Gap
from feed.errors import SourceUnavailable
from feed.options import Options
from tests.connector_contract import ConnectorContract
from tests.support.redis_cluster import RedisCluster, redis_cluster
from tests.support.server import feed_client, running_feed
from tests.test_redis import take, take_until

pytestmark = [pytest.mark.redis, pytest.mark.timeout(90)]
PATTERN = "c:*"


def connector(cluster: RedisCluster, **extra: Any) -> RedisConnector:
    table: dict[str, Any] = {
        "url": cluster.url,
        "patterns": [PATTERN],
        "configure": True,
        "health_check_interval": 0.5,
        "reconnect_timeout": 2.0,
        "cluster_refresh_interval": 0.2,
        **extra,
    }
    return RedisConnector("cache", Options(table, "connectors[0]"))


def feed_config(cluster: RedisCluster, reconnect_timeout: float) -> str:
    """The whole product's config for the same connector as `connector` builds."""
    return f"""
[[connectors]]
name = "cache"
type = "redis"
url = "{cluster.url}"
patterns = ["{PATTERN}"]
configure = true
health_check_interval = 0.5
reconnect_timeout = {reconnect_timeout}
cluster_refresh_interval = 0.2
"""


def node_client(node: Any) -> Redis:
    return Redis(host="127.0.0.1", port=node.port, protocol=2)


@pytest.fixture(scope="module")
async def cluster() -> AsyncIterator[RedisCluster]:
    async with redis_cluster(primaries=3) as running:
        yield running


async def set_on_every_primary(cluster: RedisCluster, tag: str) -> list[str]:
    """SET one key on each primary, through that primary itself (no cluster client involved)."""
    keys = []
    for node in cluster.primaries:
        key = cluster.key_on(node, f"c:{tag}:")
        client = node_client(node)
        try:
            await client.set(key, f"v-{key}")
        finally:
            await client.aclose()
        keys.append(key)
    return keys


async def test_events_from_every_primary_arrive(cluster: RedisCluster) -> None:
    async with connector(cluster, fetch_values=True) as source:
        stream = aiter(source.changes())
        keys = await set_on_every_primary(cluster, "every")
        changes: list[Change] = await take(stream, len(keys))
    assert sorted(c.key for c in changes) == sorted(keys)
    assert {c.op for c in changes} == {"set"} and {c.target for c in changes} == {PATTERN}
    assert len({c.id for c in changes}) == len(keys)  # ids stay unique across primaries
    # Values were read from each key's own node, one script call per hash slot.
    assert all(c.after == {"key": c.key, "type": "string", "value": f"v-{c.key}"} for c in changes)


async def test_snapshot_scans_every_primary(cluster: RedisCluster) -> None:
    keys = await set_on_every_primary(cluster, "snap")
    async with connector(cluster, fetch_values=True) as source:
        address = source.resolve("c:*")
        assert address is not None
        snapshot = await source.snapshot(address, lambda row: row["key"].startswith("c:snap:"), 100)
    rows = {row["key"]: row for row in snapshot.rows}
    assert sorted(rows) == sorted(keys)
    assert all(rows[k]["value"] == f"v-{k}" for k in keys)


async def test_a_filtered_snapshot_counts_only_the_rows_it_keeps(cluster: RedisCluster) -> None:
    """`snapshot_limit` counts the rows the filter keeps, not the pattern's keys: 5 kept among
    3,000 on three primaries, with a limit of 10, are all there and not truncated."""
    kept: list[str] = []
    for node in cluster.primaries:
        client = node_client(node)
        try:
            pipe = client.pipeline(transaction=False)
            for n, key in zip(range(1000), cluster.keys_on(node, "c:many:"), strict=False):
                keep = n in (3, 997) or (node is cluster.primaries[0] and n == 500)
                pipe.set(key, "pro" if keep else "free")
                if keep:
                    kept.append(key)
            await pipe.execute()
        finally:
            await client.aclose()
    async with connector(cluster, fetch_values=True) as source:
        address = source.resolve("c:*")
        assert address is not None
        whole = await source.snapshot(address, lambda row: row["value"] == "pro", 10)
        cut = await source.snapshot(address, lambda row: row["value"] == "pro", 4)
    assert sorted(row["key"] for row in whole.rows) == sorted(kept)
    assert whole.truncated is False
    assert len(cut.rows) == 4 and cut.truncated is True


async def test_a_primary_dropping_the_subscriber_is_a_gap_then_its_events_flow(
    cluster: RedisCluster,
) -> None:
    victim = cluster.primaries[1]
    async with connector(cluster) as source:
        stream = aiter(source.changes())
        await set_on_every_primary(cluster, "before")
        await take(stream, len(cluster.primaries))
        admin = node_client(victim)
        try:
            assert await admin.client_kill_filter(_type="pubsub") >= 1
        finally:
            await admin.aclose()
        [gap] = await take(stream, 1, timeout=15)
        assert isinstance(gap, Gap) and f"127.0.0.1:{victim.port}" in gap.reason
        keys = await set_on_every_primary(cluster, "after")
        changes = await take(stream, len(keys))
    assert sorted(c.key for c in changes) == sorted(keys)


async def test_failover_ends_in_a_gap_and_the_new_primary_is_followed() -> None:
    """Through the whole product: the hub restarts the connector on the topology change, clients
    get a gap, then the events of the slots that moved to the promoted replica."""
    async with redis_cluster(primaries=3, replicas=1) as cluster:
        replica = cluster.replicas[0]
        config = feed_config(cluster, reconnect_timeout=2.0)
        async with running_feed(config) as feed, feed_client(feed.url) as client:
            await wait_up(feed)
            assert (await client.subscribe(f"cache:{PATTERN}"))["ok"]
            moved = cluster.key_on(cluster.primaries[0], "c:moved:")
            await cluster_set(cluster, moved, "1")
            [before] = await client.take(1)
            assert before["key"] == moved
            await cluster.failover(replica)
            gap = await client.next_gap(timeout=20)
            assert "restarted" in gap["reason"] or "topology" in gap["reason"]
            await wait_up(feed)
            await cluster_set(cluster, moved, "2")
            [after] = await client.take(1, timeout=20)
    assert after["key"] == moved and after["seq"] > before["seq"]


async def test_a_topology_change_stops_the_stream_for_a_restart() -> None:
    async with redis_cluster(primaries=3, replicas=1) as cluster, connector(cluster) as source:
        stream = aiter(source.changes())
        await cluster.failover(cluster.replicas[0])
        with pytest.raises(SourceUnavailable, match="topology changed"):
            await take_until(stream, lambda item: False, timeout=20)


async def cluster_set(cluster: RedisCluster, key: str, value: str) -> None:
    from redis.asyncio.cluster import RedisCluster as Client

    client = Client.from_url(cluster.url, protocol=2)
    try:
        await client.set(key, value)
    finally:
        await client.aclose()


async def wait_up(feed: Any) -> None:
    async with asyncio.timeout(20):
        while feed.hub.connectors["cache"].status.state.value != "up":  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def test_a_new_shard_is_subscribed_after_a_gap() -> None:
    """Slots moved to a new primary: the connector restarts, announces the gap and then reads
    the new primary's events too."""
    async with redis_cluster(primaries=2) as cluster:
        source = connector(cluster)
        async with source:
            stream = aiter(source.changes())
            newcomer = await cluster.add_primary()
            with pytest.raises(SourceUnavailable, match=f"new primary 127.0.0.1:{newcomer.port}"):
                await take_until(stream, lambda item: False, timeout=20)
        async with source:  # what the hub does after the failure
            stream = aiter(source.changes())
            [gap] = await take(stream, 1)
            assert isinstance(gap, Gap) and "restarted" in gap.reason
            keys = await set_on_every_primary(cluster, "grown")
            changes = await take(stream, len(keys))
    assert len(cluster.primaries) == 3
    assert sorted(c.key for c in changes) == sorted(keys)


def test_cluster_nodes_lines_are_parsed_as_redis_prints_them() -> None:
    text = "\n".join(
        [
            # myself before meeting anyone: no address of its own yet
            "a1 :7000@17000 myself,master - 0 0 1 connected 0-5460",
            # a hostname after the bus port, and a slot being migrated away
            "b2 10.0.0.2:7001@17001,node-b master - 0 1 2 connected 5461-10922 [10922->-c3]",
            "c3 [::1]:7002@17002 master,fail? - 0 1 3 connected 10923-16383",
            "d4 10.0.0.4:7003@17003 master,fail - 0 1 4 disconnected 100",
            "e5 10.0.0.5:7004@17004 slave a1 0 1 1 connected",
            "f6 10.0.0.6:7005@17005 master - 0 1 5 connected",  # an empty primary
            "garbage",
        ]
    )
    primaries = serving_primaries(text, "seed.example")
    assert [p.address for p in primaries] == ["10.0.0.2:7001", "[::1]:7002", "seed.example:7000"]
    assert [p.slot_ranges for p in primaries] == [1, 1, 1]
    assert ClusterNode.from_line("garbage", "x") is None


async def test_values_survive_a_script_flush(cluster: RedisCluster) -> None:
    """A primary without the value script (a SCRIPT FLUSH, a promoted replica) gets it loaded."""
    async with connector(cluster, fetch_values=True) as source:
        stream = aiter(source.changes())
        await set_on_every_primary(cluster, "flush1")
        await take(stream, len(cluster.primaries))
        for node in cluster.primaries:
            client = node_client(node)
            try:
                await client.script_flush()
            finally:
                await client.aclose()
        keys = await set_on_every_primary(cluster, "flush2")
        changes: list[Change] = await take(stream, len(keys))
    assert all(c.after == {"key": c.key, "type": "string", "value": f"v-{c.key}"} for c in changes)
    assert not any(c.meta and "value_error" in c.meta for c in changes)


class ClusterHarness:
    """Rows are hashes under a per-test prefix, spread over every primary by their hash slots."""

    def __init__(self, cluster: RedisCluster, client: Any) -> None:
        self.cluster = cluster
        self.client = client
        self.prefix = f"cc{uuid.uuid4().hex[:6]}:"
        self.target = self.prefix + "*"

    def make_connector(self) -> RedisConnector:
        return connector(cluster=self.cluster, patterns=[self.target], fetch_values=True)

    def row_key(self, key: str) -> str:
        return self.prefix + key

    async def create(self, key: str, fields: Mapping[str, Any]) -> None:
        await self.client.hset(self.row_key(key), mapping={k: str(v) for k, v in fields.items()})

    async def modify(self, key: str, fields: Mapping[str, Any]) -> None:
        await self.create(key, fields)

    async def remove(self, key: str) -> None:
        await self.client.delete(self.row_key(key))


class TestRedisClusterConnector(ConnectorContract):
    """The contract on a cluster: as the standalone keyspace mode (not durable, snapshots not
    exact, values read after the event), and without an order across rows of different
    primaries."""

    ops: ClassVar[dict[str, str]] = {"create": "hset", "modify": "hset", "remove": "del"}
    durable = False
    exact_snapshots = False
    images = False
    ordered_across_rows = False

    @pytest.fixture
    async def harness(self, cluster: RedisCluster) -> AsyncIterator[ClusterHarness]:
        from redis.asyncio.cluster import RedisCluster as Client

        client = Client.from_url(cluster.url, protocol=2)
        try:
            yield ClusterHarness(cluster, client)
        finally:
            await client.aclose()


async def subscribed_on(node: Any, client_name: str) -> bool:
    """Whether `node` has a pub/sub client of that name: what an operator would check."""
    admin = node_client(node)
    try:
        clients = await admin.client_list(_type="pubsub")
    finally:
        await admin.aclose()
    return any(c.get("name") == client_name for c in clients)


async def test_the_url_node_dying_does_not_strand_the_feed() -> None:
    """The node the url names dies and its replica takes over: the feed rediscovers the cluster
    through the primaries it knew, announces the gap and follows the promoted replica."""
    async with redis_cluster(primaries=3, replicas=1) as cluster:
        seed, replica = cluster.primaries[0], cluster.replicas[0]
        config = feed_config(cluster, reconnect_timeout=1.0)
        async with running_feed(config) as feed, feed_client(feed.url) as client:
            await wait_up(feed)
            assert (await client.subscribe(f"cache:{PATTERN}"))["ok"]
            key = cluster.key_on(seed, "c:seed:")
            await cluster_set(cluster, key, "1")
            [before] = await client.take(1)
            await asyncio.to_thread(seed.stop)
            await cluster.refresh(timeout=30)  # the replica promoted itself
            gap = await client.next_gap(timeout=30)
            async with asyncio.timeout(30):
                # Redis has no event for a new subscriber: poll CLIENT LIST, with a deadline.
                while not await subscribed_on(replica, "feed:cache:events"):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            await cluster_set(cluster, key, "2")
            [after] = await client.take(1, timeout=20)
    assert before["key"] == after["key"] == key and after["seq"] > before["seq"]
    assert gap["reason"]


# -- streams mode ------------------------------------------------------------------------------


def streams_on_every_primary(cluster: RedisCluster, tag: str) -> list[str]:
    return [cluster.key_on(node, f"s:{tag}:") for node in cluster.primaries]


def streams_connector(cluster: RedisCluster, streams: list[str], tag: str) -> RedisConnector:
    table: dict[str, Any] = {
        "url": cluster.url,
        "mode": "streams",
        "patterns": streams,
        "start": "earliest",
        "offsets_key": f"offsets:{tag}",
        "health_check_interval": 0.5,
        "reconnect_timeout": 2.0,
    }
    return RedisConnector("events", Options(table, "connectors[0]"))


async def xadd_each(client: Any, streams: list[str], n: int) -> None:
    for stream in streams:
        await client.xadd(stream, {"n": str(n)})


def n_of(change: Change) -> object:
    """The `n` that xadd_each wrote into the entry this change reports."""
    assert change.after is not None, f"{change.id} carries no entry fields"
    return change.after["n"]


async def test_streams_on_every_primary_resume_without_loss_or_duplicates(
    cluster: RedisCluster,
) -> None:
    from redis.asyncio.cluster import RedisCluster as Client

    tag = uuid.uuid4().hex[:6]
    streams = streams_on_every_primary(cluster, tag)
    client = Client.from_url(cluster.url, protocol=2)
    try:
        await xadd_each(client, streams, 1)
        async with streams_connector(cluster, streams, tag) as source:
            stream = aiter(source.changes())
            first: list[Change] = await take(stream, len(streams))
        await xadd_each(client, streams, 2)  # while the connector is stopped
        async with streams_connector(cluster, streams, tag) as source:
            stream = aiter(source.changes())
            await xadd_each(client, streams, 3)
            rest: list[Change] = []
            async with asyncio.timeout(10):
                while sum(1 for c in rest if n_of(c) != "1") < 2 * len(streams):
                    item = await anext(stream)
                    assert isinstance(item, Change), f"a resume from saved offsets, yet {item}"
                    rest.append(item)
    finally:
        await client.aclose()
    assert sorted(c.target for c in first) == sorted(streams)
    # At least once at the boundary: the entry being handed over at the stop may come again,
    # with the same id; nothing else from the first run does.
    again = [c for c in rest if n_of(c) == "1"]
    assert len(again) <= 1 and {c.id for c in again} <= {c.id for c in first}
    for name in streams:  # each stream in its own order, nothing lost, nothing twice
        assert [n_of(c) for c in rest if c.target == name and c not in again] == ["2", "3"]


async def test_streams_survive_a_failover_without_loss() -> None:
    from redis.asyncio.cluster import RedisCluster as Client

    async with redis_cluster(primaries=3, replicas=1) as cluster:
        streams = streams_on_every_primary(cluster, "fo")
        client = Client.from_url(cluster.url, protocol=2)
        try:
            async with streams_connector(cluster, streams, "fo") as source:
                stream = aiter(source.changes())
                await xadd_each(client, streams, 1)
                before: list[Change] = await take(stream, len(streams))
                await cluster.failover(cluster.replicas[0])
                await xadd_each(client, streams, 2)
                after: list[Change] = await take(stream, len(streams), timeout=20)
        finally:
            await client.aclose()
    assert sorted(c.target for c in before) == sorted(c.target for c in after) == sorted(streams)
    assert {n_of(c) for c in after} == {"2"}


class ClusterStreamHarness:
    """Streams mode on a cluster with `key_field = "id"`, as the standalone StreamHarness."""

    def __init__(self, cluster: RedisCluster, client: Any) -> None:
        self.cluster = cluster
        self.client = client
        tag = uuid.uuid4().hex[:6]
        self.target = f"orders:{tag}"
        self.offsets = f"offsets:{tag}"

    def make_connector(self) -> RedisConnector:
        table: dict[str, Any] = {
            "url": self.cluster.url,
            "mode": "streams",
            "patterns": [self.target],
            "key_field": "id",
            "offsets_key": self.offsets,
            "health_check_interval": 0.5,
        }
        return RedisConnector("events", Options(table, "connectors[0]"))

    def row_key(self, key: str) -> str:
        return key

    async def create(self, key: str, fields: Mapping[str, Any]) -> None:
        await self.client.xadd(self.target, {"id": key, **{k: str(v) for k, v in fields.items()}})

    async def modify(self, key: str, fields: Mapping[str, Any]) -> None:
        await self.create(key, fields)

    async def remove(self, key: str) -> None:
        await self.client.xadd(self.target, {"id": key, "deleted": "1"})


class TestRedisClusterStreamsConnector(ConnectorContract):
    """Streams mode on a cluster keeps the durable half of the contract."""

    ops: ClassVar[dict[str, str]] = {"create": "xadd", "modify": "xadd", "remove": "xadd"}

    @pytest.fixture
    async def harness(self, cluster: RedisCluster) -> AsyncIterator[ClusterStreamHarness]:
        from redis.asyncio.cluster import RedisCluster as Client

        client = Client.from_url(cluster.url, protocol=2)
        try:
            yield ClusterStreamHarness(cluster, client)
        finally:
            await client.aclose()


async def test_a_primary_without_keyspace_events_is_named_in_one_line(
    cluster: RedisCluster,
) -> None:
    """Without `configure`, each primary is checked; the one that lacks the flags is named, and
    the primaries already subscribed are left again."""
    from feed.errors import SourceMisconfigured

    *ready, missing = cluster.primaries
    for node, flags in [*((n, "KEA") for n in ready), (missing, "")]:
        admin = node_client(node)
        try:
            await admin.config_set("notify-keyspace-events", flags)
        finally:
            await admin.aclose()
    with pytest.raises(SourceMisconfigured) as info:
        async with connector(cluster, configure=False):
            pass
    message = str(info.value)
    assert "\n" not in message and f"127.0.0.1:{missing.port}" in message
    assert "CONFIG SET notify-keyspace-events" in message
    for node in ready:
        assert not await subscribed_on(node, "feed:cache:events")


async def test_streams_check_reads_each_slot_group(cluster: RedisCluster) -> None:
    """`feed check` tries the reads of every stream (one XREAD per hash slot, as `serve`)."""
    streams = streams_on_every_primary(cluster, "check")
    text = await streams_connector(cluster, streams, "check").check()
    assert "a cluster of 3 primaries, streams mode" in text
