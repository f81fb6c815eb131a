"""The Redis engine: several `feed serve` nodes share room numbers, history and fan-out.

Shape (modelled on Centrifugo's Redis engine and python-socketio's pub/sub manager):

- One reader per connector across the cluster: a lease (`SET NX PX`, renewed) with a fencing
  token (a count of readings and a random tag). Only the holder runs the connector; every
  publication carries the token and the publish script refuses a stale one, so a paused old
  reader cannot write after a takeover.
  The source-side guards (Postgres's advisory lock) stay as they are.
- The reader routes each change to the rooms that exist anywhere in the cluster: target rooms
  always, row and filter rooms from a registry in Redis (a hash of room specs, a sorted set of
  expiry times refreshed by every node that has members). It learns new rooms from a control
  channel at once and re-reads the registry periodically, so a lost message costs only a delay.
- For the matched rooms, one Lua script numbers the changes of a batch (what the connector had
  ready at once, feed.engine.batch), appends each to the room's stream (`XADD ... MAXLEN ~
  history`, the stream ID being the seq) and `PUBLISH`es the room's run of the batch to the
  room's channel in one message. A room whose meta is gone (Redis restarted without persistence, `FLUSHALL`)
  gets a new epoch: a resume against the old one answers `recovered: false`, never a hole.
- Each node subscribes only to the channels of rooms its own clients follow, mirrors their seq
  and a short ring of recent payloads, and delivers to its local members. A hole in the seqs it
  receives (a dropped pub/sub connection, a reconnect) is filled from the stream, or announced
  with a `gap` when Redis no longer holds it.
- Snapshots are taken by the reader (the only node whose connector runs), on request over Redis
  pub/sub: it adds the room to its routing first, takes the snapshot, and answers which of the
  room's seqs the rows do not already reflect, so the subscriber's node replays exactly those.

Each concern is its own module, one class each, stacked so that each only calls what the ones
below it define (no import cycle, no forward stub): feed.engine.core (state, keys, scripts),
.registry (the room registry and expiry), .publisher (the reader's batches, with .batch), .lease
(lease, fencing, shared status), .snapshots, .history (ring and stream reads), .delivery (the
listen loop and delivery to local members), .resume (subscribe and catch-up); this module adds
the lifecycle. The redis package is imported only when an engine starts or `feed check` runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from feed.engine import ClusterConfig
from feed.engine.core import log
from feed.engine.format import CLUSTER_FORMAT
from feed.engine.resp import Caller, refusal
from feed.engine.resume import Resume
from feed.engine.wire import one_line, shown_url
from feed.errors import ClusterError
from feed.routing.hub import cancel_and_wait
from feed.tls import REDIS, tls_hint

POOL_CONNECTIONS = 32
"""Connections a node opens for its occasional commands (registrations, leases, history reads),
besides its pub/sub connection and the reader's publishing one; a burst waits for one."""
POOL_WAIT = 30.0
"""Seconds a command waits for a free connection: each holder's own wait is bounded by the
answer timeout, so a long wait here means a burst of work, not an unreachable Redis."""


class RedisEngine(Resume):
    """Room numbering, history and fan-out in Redis, for one node of a cluster."""

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        import redis.asyncio as aioredis

        from feed.engine import scripts

        # A pool that makes a burst wait for a connection: redis-py's default one refuses the
        # 101st concurrent command (MaxConnectionsError), and 3,000 clients subscribing at once
        # (a reconnect storm) got "cluster_unavailable" answers.
        options = {
            "socket_connect_timeout": 3.0,
            "socket_timeout": self.answer,
            "health_check_interval": 5,
        }
        pool = aioredis.BlockingConnectionPool.from_url(
            self.config.url, max_connections=POOL_CONNECTIONS, timeout=POOL_WAIT, **options
        )
        self.redis = aioredis.Redis.from_pool(pool)
        # The leases have connections of their own: a renewal queued behind a burst of
        # registrations in the shared pool would let the lease lapse under a live reader.
        own = aioredis.BlockingConnectionPool.from_url(
            self.config.url, max_connections=2, timeout=self.answer, **options
        )
        self._lease_redis = aioredis.Redis.from_pool(own)
        # PUBLISH, once per batch, goes over the engine's own connection (`_hot_script`).
        for name in ("REGISTER", "REFRESH", "LIVE", "LAPSE", "GAP", "NAME"):
            self._scripts[name] = self.redis.register_script(getattr(scripts, name))
        for name in ("ACQUIRE", "RENEW", "RELEASE"):
            self._scripts[name] = self._lease_redis.register_script(getattr(scripts, name))
        self._tasks = [
            asyncio.create_task(self._listen(), name="cluster:listen"),
            asyncio.create_task(self._keepalive(), name="cluster:keepalive"),
        ]

    async def stop(self) -> None:
        # Cancelled again while one runs on: redis-py can swallow a cancel that lands as a reply
        # arrives, and the upkeep loop would then go on, holding the server's shutdown forever
        # (a fresh-clone CI run: a node's shutdown outlived its test's 10 s).
        lapse = [self._lapse_task] if self._lapse_task is not None else []
        await cancel_and_wait([*self._tasks, *lapse], grace=1.0)
        self._tasks.clear()
        if self.up and self.name_taken is None:  # a restart under the same name needs no wait
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.answer):
                    await self._forget_name()
        if self._caller is not None:
            self._caller.close()
        for client in (self.redis, self._lease_redis):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()

    def describe(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "redis": "up" if self.up else "down",
            "detail": self.name_taken or self.detail,
            "readers": dict(self.readers),
            "reading": sorted(self._leases),
            **({"config_differs": dict(self.differing)} if self.differing else {}),
            "format": self.format,
            **({"format_behind": dict(self.format_behind)} if self.format_behind else {}),
            **({"older_nodes": dict(self.older_nodes)} if self.older_nodes else {}),
            **({"nodes_without_format": self.silent_nodes} if self.silent_nodes else {}),
        }

    # -- upkeep --------------------------------------------------------------------------------

    async def _keepalive(self) -> None:
        """Keep this node's followed rooms registered; at the reader, re-read the registry."""
        while True:
            await asyncio.sleep(self.refresh)
            if not self.up:
                continue
            try:
                await self._claim_name()
                await self._refresh_rooms()
                for name in list(self._leases):
                    await self._load_index(name)
                    await self._share_status(name)
                if self._leases:
                    await self._check_formats()
                else:  # a reader's concern only
                    self.older_nodes, self.silent_nodes = {}, 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("cluster keepalive failed: %s", exc)


async def formats(client: Any, prefix: str) -> str:
    """For `feed check`: the cluster format this build writes, and the one each running node
    announces it reads (feed.engine.format), so that a roll's progress is seen before it ends."""
    entries = sorted((await client.hgetall(f"{prefix}:nodes")).items())
    nodes = [  # a few nodes: one EXISTS each is fine for a one-off check
        f"{node.decode()} {raw.decode()}"
        for node, raw in entries
        if await client.exists(f"{prefix}:name:{node.decode()}")
    ]
    text = f"cluster format {CLUSTER_FORMAT}"
    return f"{text}, nodes read: {', '.join(nodes)}" if nodes else text


async def check(config: ClusterConfig, connectors: list[str]) -> str:
    """For `feed check`: reach the cluster's Redis, check its version, say who reads what."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(config.url, socket_connect_timeout=3.0, socket_timeout=5.0)
    try:
        info = await client.info("server")
        version = str(info.get("redis_version", "?"))
        parts = [int(p) if p.isdigit() else 0 for p in [*version.split("."), "0", "0"][:2]]
        if tuple(parts) < (6, 2):
            raise ClusterError(f"Redis {version} is too old: the cluster needs Redis 6.2+")
        readers = []
        for name in connectors:
            holder = await client.get(f"{config.prefix}:lease:{name}")
            text = holder.decode() if isinstance(holder, bytes) else str(holder or "")
            reader = text.rsplit("|", 1)[0] if text else "nobody"
            readers.append(f"{name}: {reader}")
        # The engine's own connection (pub/sub, the publishing script) too, as `serve` opens it.
        caller = await Caller.open(config.url, answer=5.0)
        try:
            await caller.call(["PING"])
        finally:
            caller.close()
        where = f"Redis {version}, prefix {config.prefix!r}"
        where += f"; {await formats(client, config.prefix)}"
        return f"{where}; readers: {', '.join(readers)}" if readers else where
    except aioredis.AuthenticationError as exc:
        where = shown_url(config.url)
        raise ClusterError(f"cannot sign in to {where}: {refusal(str(exc))}") from None
    except (OSError, aioredis.RedisError) as exc:
        tls, certificate = config.url.startswith("rediss"), "ssl_certfile=" in config.url
        detail = one_line(exc) + tls_hint(str(exc), REDIS, tls=tls, client=certificate)
        raise ClusterError(f"cannot reach {shown_url(config.url)}: {detail}") from None
    finally:
        await client.aclose()
