"""Engines: where room numbers, history and live fan-out between nodes live.

Without a `[cluster]` table there is no engine object at all: the hub numbers, buffers and sends
in its own process, exactly as a single node always did (feed/routing/hub.py, feed/core/rooms.py).
With one, `feed.engine.redis.RedisEngine` keeps every room's sequence, epoch and history in Redis
and moves changes between nodes over Redis pub/sub (Centrifugo's Redis engine is the model: a
history stream and a publish in one Lua script, so the two cannot disagree). The engine is imported
lazily, so the redis package is only needed by clusters and by the Redis connector.

May import: the shared modules at the top of feed/, feed.core, connectors/, feed.security,
feed.delivery and feed.routing (the engine drives the hub). Not the application shell or the demo.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

from feed.options import HOUR, MONTH, Options, redis_url_db_problem, redis_url_problem

PUBLISH_INTERVAL = 0.005
"""The default `publish_interval` (Kafka's producer has waited as long since 4.0): at 1,000
changes/s with 3 nodes, a fifth less CPU than 2 ms, and within the 5 ms the cluster may add at
p99; changes further apart never wait (docs/benchmarks.md, "The reader's publish interval")."""

PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


@dataclass(frozen=True)
class ClusterConfig:
    """The `[cluster]` table: one Redis shared by every node that runs the same config."""

    url: str
    prefix: str = "dbfeed"
    lease: float = 10.0
    """Seconds a dead reader keeps a connector before another node takes it over."""
    history: int = 1000
    """Changes kept per room for resume (trimmed by Redis, XADD MAXLEN)."""
    node: str = ""
    """This node's name in status, /readyz and the catalog (default: host name and process id)."""
    room_ttl: float = 86400.0
    """Seconds a room's numbers and history outlive its last change and its last member."""
    publish_interval: float = PUBLISH_INTERVAL
    """Seconds at least between a reader's two publish calls for one connector: a change after
    a quiet spell goes at once, one sooner waits at most this long (feed.engine.batch)."""


def default_node_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def parse_cluster(top: Options, replay_buffer: int) -> ClusterConfig | None:
    """Read `[cluster]`, or None when the table is absent (the single-process default)."""
    if "cluster" not in top.raw:
        top._used.add("cluster")
        return None
    opts = top.table("cluster")
    url = opts.str("url", required=True, spaces="none")
    if not url.startswith(("redis://", "rediss://", "unix://", "valkey://", "valkeys://")):
        # Not the URL itself: a password in it must not reach the terminal or the logs.
        scheme = url.partition("://")[0] + "://" if "://" in url else "no scheme"
        opts.fail("url", f"is not a Redis URL ({scheme}); write redis://host:6379/0")
    from redis.asyncio.connection import parse_url

    try:
        as_redis = url.replace("valkey", "redis", 1) if url.startswith("valkey") else url
        problem = redis_url_db_problem(as_redis) or redis_url_problem(parse_url(as_redis))
    except ValueError as exc:
        problem = f"is not a Redis URL ({exc}); write redis://host:6379/0"
    if problem is not None:
        opts.fail("url", problem)
    prefix = opts.str("prefix", "dbfeed", spaces="inside")
    if not PREFIX_PATTERN.fullmatch(prefix):
        opts.fail("prefix", f"{prefix!r} must be 1-64 letters, digits or _ . : -")
    lease = opts.float("lease", 10.0, minimum=0.5, maximum=HOUR)
    history = opts.int("history", replay_buffer, minimum=1, maximum=1_000_000)
    node = opts.str("node", "", spaces="inside") or default_node_name()
    room_ttl = opts.float("room_ttl", 86400.0, minimum=1.0, maximum=MONTH)
    publish_interval = opts.float("publish_interval", PUBLISH_INTERVAL, minimum=0.0, maximum=1.0)
    opts.finish()
    url = "redis://" + url.removeprefix("valkey://") if url.startswith("valkey://") else url
    url = "rediss://" + url.removeprefix("valkeys://") if url.startswith("valkeys://") else url
    return ClusterConfig(
        url=url,
        prefix=prefix,
        lease=lease,
        history=history,
        node=node,
        room_ttl=room_ttl,
        publish_interval=publish_interval,
    )
