"""Redis: keyspace notifications (default) or Redis Streams, delivered as changes.

This module reads the config, owns the connections and the status, resolves room names, and hands
the capture to `redis_keyspace.KeyspaceCapture` or `redis_streams.StreamCapture`.

Design notes a user should know (also in docs/connectors/redis.md):
- Keyspace mode is best effort with every loss window announced as a `Gap`; streams mode loses
  nothing (it resumes from saved entry ids) except what trimming removed unread (also a `Gap`).
- Keyspace `id` is `<connector>:<epoch>-<n>`: epoch marks the pub/sub connection (it changes on
  every reconnect), n counts messages on it (Redis sends one per matching pattern). Redis gives
  keyspace events no position, so an id is unique but a replayed event can never carry the same
  one. Streams `id` is `<connector>:<stream>:<entry id>`, stable.
- Keyspace `ts` is when the feed received the event (Redis gives no commit time); streams `ts` is
  the entry id's time.
- `after` is `{"value", "type"}` read after the event (with `fetch_values`), the value at read time.
- Redis Cluster: in keyspace mode each node publishes only its own keys' events, so the capture
  subscribes on every primary and follows topology changes (connectors/redis_cluster.py); in
  streams mode the streams are read in hash-slot groups through the cluster client.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

from redis._parsers import _AsyncRESP2Parser
from redis.asyncio import Redis
from redis.asyncio.connection import BlockingConnectionPool, ConnectionPool, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    NoPermissionError,
    RedisError,
)

from connectors.base import Connector, Gauge, RoomAddress, Snapshot, State
from connectors.redis_glob import PatternError, is_glob, matches, validate
from connectors.redis_keyspace import LOST, EventSource, KeyspaceCapture
from connectors.redis_streams import StreamCapture
from feed.core.change import Change, Gap
from feed.core.filters import RowFilter
from feed.errors import ConnectorError, ProtocolError, SourceMisconfigured, SourceUnavailable
from feed.options import HOUR, MIB, Options, redis_url_db_problem, redis_url_problem
from feed.tls import REDIS, tls_hint

if TYPE_CHECKING:
    from connectors.redis_cluster import ClusterNode

log = logging.getLogger("feed.connectors.redis")

DATA_CONNECTIONS = 8
"""Connections for values and snapshots to a standalone server (up to 4 value reads at once)."""


class RedisConnector(Connector):
    kind = "redis"

    # -- configuration -------------------------------------------------------------------------

    def configure(self, options: Options) -> None:
        self.url: str = options.str("url", required=True, spaces="none")
        try:
            url_kwargs: dict[str, Any] = dict(parse_url(self.url))
        except ValueError as exc:
            options.fail("url", f"is not a Redis URL ({exc}); use redis://[:password@]host:6379/0")
        if "path" not in url_kwargs and not url_kwargs.get("host"):
            options.fail("url", "names no host; use redis://[:password@]host:6379/0")
        problem = redis_url_db_problem(self.url) or redis_url_problem(url_kwargs)
        if problem is not None:
            options.fail("url", problem)
        url_db = int(url_kwargs.get("db", 0))
        self.db = options.int("db", url_db, minimum=0, maximum=2**31 - 1)  # Redis's INT_MAX
        if "db" in options.raw and "db" in url_kwargs and self.db != url_db:
            options.fail("db", f"is {self.db} but url selects database {url_db}; keep one")
        self.where = _describe(url_kwargs, self.db)

        self.mode = options.choice("mode", ("keyspace", "streams"), "keyspace")
        self.durable = self.mode == "streams"
        self.before_images = False  # keyspace events say nothing of the value before
        self.patterns = options.str_list("patterns", required=True)
        for pattern in self.patterns:
            try:
                validate(pattern)
            except PatternError as exc:
                options.fail("patterns", str(exc))
            if self.mode == "streams" and is_glob(pattern):
                options.fail(
                    "patterns", f"{pattern!r}: in streams mode list stream keys, not patterns"
                )
        if len(set(self.patterns)) != len(self.patterns):
            options.fail("patterns", "lists the same pattern twice")

        self.auto_configure = options.bool("configure", False)
        self.fetch_values = options.bool("fetch_values", False)
        # A Redis string holds at most 512 MiB (proto-max-bulk-len).
        self.max_value_bytes = options.int("max_value_bytes", 65536, minimum=16, maximum=512 * MIB)
        self.max_value_items = options.int("max_value_items", 1000, minimum=1, maximum=1_000_000)
        self.health_check_interval = options.float(
            "health_check_interval", 5.0, minimum=0.05, maximum=HOUR
        )
        self.capture_check_interval = options.float(
            "capture_check_interval", 5.0, minimum=0.05, maximum=HOUR
        )
        self.reconnect_timeout = options.float("reconnect_timeout", 10.0, minimum=0.0, maximum=HOUR)
        self.max_pending = options.int("max_pending", 100_000, minimum=10, maximum=10_000_000)
        self.snapshot_scan_limit = options.int(
            "snapshot_scan_limit", 100_000, minimum=1, maximum=100_000_000
        )
        self.cluster_refresh_interval = options.float(
            "cluster_refresh_interval", 5.0, minimum=0.05, maximum=HOUR
        )

        # Streams mode only (read here so a typo is still reported in keyspace mode).
        self.stream_start = options.choice("start", ("latest", "earliest"), "latest")
        self.offsets_key = options.str("offsets_key", f"feed:offsets:{self.name}")
        self.stream_batch = options.int("stream_batch", 500, minimum=1, maximum=100_000)
        self.stream_key_field: str | None = options.str("key_field")
        self.stream_op_field: str | None = options.str("op_field")
        if self.stream_op_field is not None and self.stream_key_field is None:
            options.fail("op_field", "needs key_field: only a row named by a field can be deleted")

        self._url_kwargs = url_kwargs
        self._client: Any = None  # Redis, or RedisCluster when the server is a cluster node
        self._pool: ConnectionPool | None = None
        self._events_pool: ConnectionPool | None = None
        self._keyspace: KeyspaceCapture | None = None
        self._streams: StreamCapture | None = None
        self._cluster = False
        self._known_primaries: list[tuple[str, int]] = []
        """A cluster's primaries when last discovered: asked when the url's node is down."""
        # Kept across restarts: a restart after a session means a gap; a new run_id, a restart.
        self._sessions = 0
        self.stream_positions: dict[str, str] = {}
        """Streams mode: the positions this process last saved in `offsets_key`, so a restart
        by the hub notices a Redis that lost them (redis_streams.StreamCapture._recall)."""
        self._run_ids: dict[str, str] = {}
        """Each server's run_id when last subscribed (keyed by host:port): a new one, a restart."""

    def targets(self) -> list[str]:
        return list(self.patterns)

    def check_filter(self, target: str, row_filter: RowFilter) -> None:
        """Without `fetch_values` a keyspace event carries no image (`after` is null), so a
        filter room would never receive a change: refused, saying what to set."""
        if self.mode == "keyspace" and not self.fetch_values:
            raise ProtocolError(
                "bad_filter",
                f"connector {self.name!r} does not read values (fetch_values = false), so its "
                "changes have no image a filter could match; set fetch_values = true in its "
                "config, or follow the pattern or key room",
            )

    def resolve(self, rest: str) -> RoomAddress | None:
        """`session:*` is the pattern's room; `session:abc` is a key room under the first pattern
        (in config order) that matches it, Redis glob rules included.

        The hub's canonical name for that key room is `session:*:session:abc` (target, then key);
        it resolves to the same room, so a client may resubscribe with the name its ack returned.
        """
        if self.mode == "streams":
            return super().resolve(rest)
        if rest in self.patterns:
            return RoomAddress(rest)
        for pattern in self.patterns:
            key = rest[len(pattern) + 1 :]
            if rest.startswith(pattern + ":") and key and matches(pattern, key):
                return RoomAddress(pattern, key)
        for pattern in self.patterns:
            if matches(pattern, rest):
                return RoomAddress(pattern, rest)
        return None

    # -- lifecycle -----------------------------------------------------------------------------

    def _new_pool(self, role: str, **extra: Any) -> ConnectionPool:
        """A pool to the url's server, or (with host and port in `extra`) to a cluster node,
        with the url's credentials either way."""
        options = self._pool_options(role, **extra)
        return ConnectionPool(**options)

    def _data_pool(self) -> ConnectionPool:
        """The pool for values and snapshots: at most DATA_CONNECTIONS, and a call past them
        waits for a free one. A plain pool raised "Too many connections" instead: with clients
        reloading together (after a gap) their snapshots took every connection, and live
        changes went out without their values (`value_error`), leaving clients' rows stale."""
        options = self._pool_options("data")
        options.pop("max_connections", None)  # a url's ?max_connections= (the old pool's was 8)
        return BlockingConnectionPool(
            max_connections=DATA_CONNECTIONS, timeout=options["socket_timeout"], **options
        )

    def _pool_options(self, role: str, **extra: Any) -> dict[str, Any]:
        options: dict[str, Any] = {
            **self._url_kwargs,
            "db": self.db,
            "socket_connect_timeout": 5.0,
            "socket_timeout": max(10.0, 2 * self.health_check_interval),
            "retry": Retry(NoBackoff(), 0),
            # The reader parses RESP2 pub/sub arrays; RESP3 would make them pushes.
            "protocol": 2,
            "client_name": _client_name(self.name, role),
            **extra,
        }
        return options

    async def start(self) -> None:
        self.set_status(State.STARTING)
        self._pool = self._data_pool()
        self._client = Redis(connection_pool=self._pool)
        try:
            cluster = await self._cluster_primaries()
            self._cluster = cluster is not None
            if cluster is not None:
                await self._start_cluster(cluster)
            elif self.mode == "streams":
                self._streams = StreamCapture(self, self._client)
                await self._streams.start()
            else:
                # The pure-Python parser never reads past the reply it parses (see `_pump`).
                self._events_pool = self._new_pool("events", parser_class=_AsyncRESP2Parser)
                source = EventSource(self._events_pool, self.where)
                self._keyspace = KeyspaceCapture(self, self._client, [source])
                await self._keyspace.start()
        except BaseException:
            await self._close()
            raise
        # Streams mode is up with a listed key that is not a stream, but says so (down, naming it).
        self.set_status(*(self._streams.health() if self._streams is not None else (State.UP, "")))

    async def _cluster_primaries(self) -> list[ClusterNode] | None:
        """None for a standalone server; a cluster node's serving primaries otherwise."""
        from connectors.redis_cluster import discover, refuse_unsupported

        assert self._client is not None
        try:
            info = await self._client.info("cluster")
        except Exception as exc:
            if "SELECT is not allowed in cluster mode" in str(exc):  # the url's /N on a cluster
                refuse_unsupported(self)
            if isinstance(exc, LOST) and self._known_primaries:
                return await self._discover_from_known(exc)
            raise self._failure(exc, fresh=True) from None
        if str(info.get("cluster_enabled", "0")) != "1":
            return None
        refuse_unsupported(self)
        try:
            primaries = await discover(self._client, self._url_kwargs.get("host") or "127.0.0.1")
        except Exception as exc:
            raise self._failure(exc) from None
        self._known_primaries = [(n.host, n.port) for n in primaries]
        return primaries

    async def _discover_from_known(self, seed_error: BaseException) -> list[ClusterNode]:
        """The url's node is down (a failed primary, say): ask the primaries known from the
        last discovery, so the connector follows the cluster rather than that one node."""
        from connectors.redis_cluster import discover_at

        for host, port in self._known_primaries:
            pool = self._new_pool("data", host=host, port=port)
            try:
                primaries = await discover_at(pool, host)
            finally:
                await pool.disconnect()
            if primaries:
                log.warning(
                    "redis cluster: %s is unreachable (%s); discovered the primaries through %s:%d",
                    self.where,
                    seed_error,
                    host,
                    port,
                )
                self._known_primaries = [(n.host, n.port) for n in primaries]
                return primaries
        raise self._failure(seed_error) from None

    async def _start_cluster(self, primaries: list[ClusterNode]) -> None:
        from redis.asyncio.cluster import ClusterNode as StartupNode
        from redis.asyncio.cluster import RedisCluster

        from connectors.redis_cluster import ClusterKeyspaceCapture, slot_groups

        if not primaries:
            raise SourceUnavailable(
                f"redis cluster at {self.where} has no primary serving slots yet"
            )
        seed: Redis = self._client
        self._client = RedisCluster.from_url(  # credentials and TLS (rediss://) from the url
            self.url,
            # Besides the url's node, which may be the one that is down.
            startup_nodes=[StartupNode(h, p) for h, p in self._known_primaries],
            protocol=2,
            socket_connect_timeout=5.0,
            socket_timeout=max(10.0, 2 * self.health_check_interval),
            client_name=_client_name(self.name, "data"),
        )
        await seed.aclose()
        if self._pool is not None:
            await self._pool.disconnect()
            self._pool = None

        if self.mode == "streams":
            self._streams = StreamCapture(self, self._client, slot_groups(self.patterns))
            await self._streams.start()
            return

        def pool_for(node: ClusterNode) -> ConnectionPool:
            return self._new_pool(
                "events", host=node.host, port=node.port, parser_class=_AsyncRESP2Parser
            )

        self._keyspace = ClusterKeyspaceCapture(self, self._client, primaries, pool_for)
        await self._keyspace.start()

    async def stop(self) -> None:
        await self._close()
        self.set_status(State.STOPPED)

    async def _close(self) -> None:
        if self._keyspace is not None:
            await self._keyspace.stop()
            self._keyspace = None
        if self._streams is not None:
            await self._streams.stop()
            self._streams = None
        for pool in (self._events_pool, self._pool):
            if pool is not None:
                with contextlib.suppress(Exception):
                    await pool.disconnect()
        self._events_pool = self._pool = None
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()
            self._client = None

    def gauges(self) -> list[Gauge]:
        samples = super().gauges()
        if self._keyspace is not None:
            ok = 0.0 if self._keyspace.flag_faults else 1.0
            samples += [("feed_capture_ok", (), ok), ("feed_redis_keyspace_flags_ok", (), ok)]
        return samples

    def _capture(self) -> KeyspaceCapture | StreamCapture:
        capture = self._streams if self.mode == "streams" else self._keyspace
        if capture is None:
            raise SourceUnavailable(f"redis connector {self.name!r} is not running")
        return capture

    def changes(self) -> AsyncIterator[Change | Gap]:
        # The capture's own iterator, not a generator around it: one fewer hop per change.
        return self._capture().changes()

    async def snapshot(
        self, address: RoomAddress, where: Callable[[Mapping[str, Any]], bool], limit: int
    ) -> Snapshot:
        """Keyspace mode: SCAN, never exact; streams mode: exact (see the two modules)."""
        return await self._capture().snapshot(address, where, limit)

    async def check(self) -> str:
        async with self:
            assert self._client is not None
            info = await self._client.info("server")
            version = info.get("redis_version", "?")
            if self._streams is not None and self._streams.trouble():
                # `serve` reads the other streams meanwhile; `check` is where to fix it first.
                raise SourceMisconfigured(self._streams.trouble())
            if self._streams is not None:
                try:
                    await self._streams.try_reads()
                except (RedisError, OSError) as exc:
                    raise self._failure(exc) from None
            primaries = len(self._known_primaries)  # streams mode has no keyspace sources
            shape = f", a cluster of {primaries} primaries" if self._cluster else ""
            flags = ""
            if self.mode == "keyspace":
                try:
                    value = (await self._client.config_get("notify-keyspace-events")).get(
                        "notify-keyspace-events", ""
                    )
                    text = value.decode() if isinstance(value, bytes) else str(value)
                    flags = f", notify-keyspace-events {text!r}"
                except Exception:  # CONFIG refused (managed services): start() warned already
                    flags = ", notify-keyspace-events unreadable (CONFIG refused)"
            return (
                f"redis {version} at {self.where}{shape}, {self.mode} mode{flags}, "
                f"patterns: {', '.join(self.patterns)}"
            )

    # -- errors --------------------------------------------------------------------------------

    def _failure(self, exc: BaseException, *, fresh: bool = False) -> ConnectorError:
        """One line for what went wrong talking to Redis, classed as retry-soon or fix-first.
        `fresh`: on a new connection's first command (where TLS may explain a closed one)."""
        if isinstance(exc, ConnectorError):
            return exc
        text = str(exc).strip() or type(exc).__name__
        if isinstance(exc, AuthenticationError) or "WRONGPASS" in text or "NOAUTH" in text:
            return SourceMisconfigured(
                f"redis at {self.where}: authentication failed ({text}); "
                "check the user and password in url (redis://user:password@host:6379/0)"
            )
        if isinstance(exc, AuthorizationError | NoPermissionError) or "NOPERM" in text:
            return SourceMisconfigured(f"redis at {self.where}: permission denied ({text})")
        tls, client = self.url.startswith(("rediss", "valkeys")), "ssl_certfile" in self._url_kwargs
        text += tls_hint(text, REDIS, tls=tls, client=client, fresh=fresh)
        if isinstance(exc, LOST):
            return SourceUnavailable(f"redis at {self.where} is unreachable: {text}")
        return SourceUnavailable(f"redis at {self.where}: {text}")


def _client_name(connector: str, role: str) -> str:
    """CLIENT SETNAME value (no spaces allowed), so operators can see who is subscribed."""
    return re.sub(r"[^A-Za-z0-9_.:-]", "_", f"feed:{connector}:{role}")


def _describe(kwargs: Mapping[str, Any], db: int) -> str:
    """host:port/db or the socket path, never the password (it ends up in logs and statuses)."""
    if "path" in kwargs:
        return f"unix:{kwargs['path']}/{db}"
    return f"{kwargs.get('host')}:{kwargs.get('port', 6379)}/{db}"
