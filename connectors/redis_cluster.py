"""Redis Cluster in keyspace mode: one pub/sub reader per primary, one stream of changes.

Every node of a cluster publishes keyspace notifications only for the keys it holds, and
unlike ordinary pub/sub they are not broadcast over the cluster bus. So the capture subscribes
on every primary (found with CLUSTER NODES) and merges their events into one queue. Events for
one key come from the one primary that owns its slot, in that primary's order; events of
different primaries have no common order (Redis has none to give).

Topology changes end in a connector restart, which finds the new primaries and announces a
`gap`, because whatever a new primary published before the feed subscribed to it is lost:
- a primary that dies takes its reader's connection with it; if it is not back within
  `reconnect_timeout`, the reader gives up and the hub restarts the connector;
- a watcher compares the set of primaries every `cluster_refresh_interval` seconds (a failover
  to a replica, a shard added or removed) and restarts the same way when it changed.

Values and snapshots go through redis-py's `RedisCluster`, which routes each command to the
key's node; the value-reading script runs once per hash slot among a batch's keys (a script's
keys must share a slot), all of a batch's calls in one cluster pipeline, and snapshots SCAN
every primary.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.asyncio.connection import ConnectionPool
from redis.crc import key_slot
from redis.exceptions import NoScriptError, RedisError

from connectors.redis_keyspace import LOST, EventSource, KeyspaceCapture
from connectors.redis_values import READ_VALUES, KeyValue, decode_value
from feed.errors import SourceMisconfigured, SourceUnavailable

if TYPE_CHECKING:
    from connectors.redis import RedisConnector

log = logging.getLogger("feed.connectors.redis")


@dataclass(frozen=True)
class ClusterNode:
    """One line of CLUSTER NODES, as much of it as the feed needs."""

    node_id: str
    host: str
    port: int
    flags: frozenset[str]
    slot_ranges: int

    @classmethod
    def from_line(cls, line: str, default_host: str) -> ClusterNode | None:
        """Parse `<id> <ip:port@cport[,hostname]> <flags> <primary> ... <slot> ...`; None if odd.

        A node that has not met the others yet may show its own address as `:port`; it is then
        reached at `default_host`, the host the connector was given.
        """
        parts = line.split()
        if len(parts) < 8:
            return None
        address = parts[1].split(",", 1)[0].split("@", 1)[0]
        host, _, port = address.rpartition(":")
        if not port.isdigit():
            return None
        return cls(
            node_id=parts[0],
            host=host.strip("[]") or default_host,
            port=int(port),
            flags=frozenset(parts[2].split(",")),
            slot_ranges=sum(1 for part in parts[8:] if not part.startswith("[")),
        )

    @property
    def serving_primary(self) -> bool:
        """A primary that holds slots, unless the cluster agrees it has failed (`fail`, not one
        node's passing suspicion `fail?`, which would make the watcher restart for nothing)."""
        return (
            "master" in self.flags
            and not self.flags & {"fail", "handshake", "noaddr"}
            and self.slot_ranges > 0
        )

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def serving_primaries(nodes_text: str, default_host: str) -> list[ClusterNode]:
    """The primaries that hold slots, in address order (a stable numbering for ids)."""
    nodes = (ClusterNode.from_line(line, default_host) for line in nodes_text.splitlines())
    return sorted(
        (n for n in nodes if n is not None and n.serving_primary), key=lambda n: (n.host, n.port)
    )


async def discover(client: Redis, default_host: str) -> list[ClusterNode]:
    reply = await client.execute_command("CLUSTER", "NODES")  # type: ignore[no-untyped-call]
    text = reply.decode() if isinstance(reply, bytes) else str(reply)
    return serving_primaries(text, default_host)


async def discover_at(pool: ConnectionPool, host: str) -> list[ClusterNode] | None:
    """The primaries as the node behind `pool` sees them; None if it does not answer. The pool
    stays open: it is the caller's."""
    client = Redis(connection_pool=pool)
    try:
        return await discover(client, host)
    except (RedisError, *LOST):
        return None
    finally:
        with contextlib.suppress(Exception):
            await client.aclose(close_connection_pool=False)


class ClusterKeyspaceCapture(KeyspaceCapture):
    """KeyspaceCapture with one event source per primary and a watcher for topology changes."""

    def __init__(
        self,
        owner: RedisConnector,
        client: Any,
        primaries: Iterable[ClusterNode],
        pool_for: Callable[[ClusterNode], ConnectionPool],
    ) -> None:
        self.primaries = list(primaries)
        sources = [
            EventSource(pool_for(node), node.address, tag=f".{index}", cluster=True)
            for index, node in enumerate(self.primaries)
        ]
        super().__init__(owner, client, sources)
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await super().start()
        self._watcher = asyncio.create_task(self._watch(), name=f"redis:{self.owner.name}:topology")

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        await super().stop()
        for source in self.sources:
            with contextlib.suppress(Exception):
                await source.pool.disconnect()

    async def _watch(self) -> None:
        """Restart the connector (through the hub) when the set of primaries changes."""
        known = {n.address for n in self.primaries}
        interval = self.owner.cluster_refresh_interval
        while True:
            await asyncio.sleep(interval)
            now = await self._current_primaries()
            if now is None or now == known:
                continue
            added, gone = sorted(now - known), sorted(known - now)
            change = ", ".join(
                [f"new primary {a}" for a in added] + [f"{g} no longer a primary" for g in gone]
            )
            log.warning("redis cluster %s: %s; resubscribing", self.owner.where, change)
            await self._queue.put(
                SourceUnavailable(f"redis cluster topology changed ({change}): resubscribing")
            )
            return

    async def _current_primaries(self) -> set[str] | None:
        """Ask the subscribed primaries in turn; None when none answers (their readers will
        notice the loss themselves)."""
        for source in self.sources:
            nodes = await discover_at(source.pool, self.primaries[0].host)
            if nodes is not None:
                return {n.address for n in nodes}
        return None

    async def read_values(self, keys: list[bytes]) -> dict[bytes, KeyValue]:
        """One script call per hash slot among `keys` (a script's keys must share a slot), all in
        one cluster pipeline: one round trip per primary, whatever the number of slots."""
        by_slot: dict[int, list[bytes]] = {}
        for key in keys:
            by_slot.setdefault(key_slot(key), []).append(key)
        groups = list(by_slot.values())
        replies = await self._evalsha_each(groups)
        values: dict[bytes, KeyValue] = {}
        for group, reply in zip(groups, replies, strict=True):
            for key, row in zip(group, reply, strict=True):
                values[key] = decode_value(row, self.owner.max_value_items)
        return values

    async def _evalsha_each(self, groups: list[list[bytes]]) -> list[Any]:
        """The value script on each group; loaded on every node first if one lacks it (a new
        primary after a failover, a SCRIPT FLUSH)."""
        args = [self.owner.max_value_items, self.owner.max_value_bytes]
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            for group in groups:
                pipe.execute_command("EVALSHA", self.script.sha, len(group), *group, *args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in replies):
                await self.client.script_load(READ_VALUES)
                continue
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            return replies
        raise AssertionError("unreachable")

    async def _scan(self, pattern: str) -> AsyncGenerator[list[bytes] | None, None]:
        """SCAN every primary (redis-py's cluster scan_iter), in batches as the standalone one;
        `snapshot_scan_limit` counts the matching keys here (scan_iter does not show the rest)."""
        batch: list[bytes] = []
        examined = 0
        async with contextlib.aclosing(self.client.scan_iter(match=pattern, count=1000)) as keys:
            async for key in keys:
                examined += 1
                batch.append(key if isinstance(key, bytes) else str(key).encode())
                if examined >= self.owner.snapshot_scan_limit:
                    yield batch
                    yield None
                    return
                if len(batch) >= 1000:
                    yield batch
                    batch = []
        yield batch


def slot_groups(streams: Iterable[str]) -> list[list[str]]:
    """Streams grouped by hash slot, in config order: one XREAD can name only one slot's keys."""
    groups: dict[int, list[str]] = {}
    for stream in streams:
        groups.setdefault(key_slot(stream.encode()), []).append(stream)
    return list(groups.values())


def refuse_unsupported(owner: RedisConnector) -> None:
    """What a cluster cannot do, in one line, before anything is subscribed."""
    if owner.db != 0:
        raise SourceMisconfigured(
            f"redis at {owner.where} is a Redis Cluster node, and a cluster has only database 0: "
            "set db = 0 (or end the url with /0)"
        )
