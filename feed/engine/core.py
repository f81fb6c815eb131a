"""What every part of the Redis engine shares: its state, its key names and its scripts.

The engine is split by concern into a chain of small classes (registry, publisher, lease,
snapshots, history, delivery, resume; feed.engine.redis puts them together). Each link only
calls what the links below it define, so there is no import cycle and no forward stub; this base
holds the state they all read (tests and the hub look at `_leases`, `_index`, `_mirrors`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from connectors.base import Connector, State
from feed.core.change import Change
from feed.core.targets import TargetRooms
from feed.engine import ClusterConfig
from feed.engine.batch import Batcher
from feed.engine.format import HEADS, cluster_format
from feed.engine.mirror import Mirror
from feed.engine.resp import Caller, Subscriber
from feed.engine.routes import Routed
from feed.metrics import Labels

if TYPE_CHECKING:
    from feed.routing.hub import Hub

log = logging.getLogger("feed.engine.redis")

UNREACHABLE = "cluster Redis unreachable"


class EngineCore:
    """The state and key names of one node's engine (see feed.engine.redis.RedisEngine)."""

    def __init__(self, config: ClusterConfig, hub: Hub) -> None:
        self.config = config
        self.hub = hub
        self.node = config.node
        p = config.prefix
        self._p = p
        self.control = f"{p}:control".encode()
        self.inbox = f"{p}:node:{self.node}".encode()
        self.redis: Any = None
        self._lease_redis: Any = None
        self.up = False
        self.detail = "connecting"
        self.instance = secrets.token_hex(6)
        """Tells this process from another that was given the same `node` name."""
        self._schemas: dict[str, str] = {}
        """Per connector, the digest of the filter schema last shared (at the reader) or adopted
        (elsewhere): feed.engine.lease `_share_status` and `_apply_status`."""
        self.differing: dict[str, str] = {}
        """Connectors whose reader's config gives them other targets than this node's, with
        what differs (feed.engine.lease `_compare_targets`; in /readyz)."""
        self.format = cluster_format()
        """The cluster format this node reads and announces (feed.engine.format)."""
        self._heads = HEADS[self.format]
        self.format_behind: dict[str, str] = {}
        """Connectors whose reader writes a newer cluster format than this node reads, with
        what to do (feed.engine.lease `_apply_status`; in /readyz, the connector shown down)."""
        self.older_nodes: dict[str, int] = {}
        """At a reader: the nodes that announce an older cluster format than this node writes,
        with it (feed.engine.lease `_check_formats`)."""
        self.silent_nodes = 0
        """At a reader: subscribers of the control channel that announce no format (nodes of a
        build from before the format stamp, which read format 1)."""
        self._silent_last = 0
        self._unknown_heads: set[bytes] = set()
        """Heads of room messages this build cannot read, each logged once."""
        self.name_taken: str | None = None
        """Why this node waits (another process holds its name), or None."""
        self.readers: dict[str, str | None] = {name: None for name in hub.connectors}
        self._leases: dict[str, str] = {}
        self._lease_wakes: dict[str, asyncio.Event] = {}
        """Per connector, set to end this node's wait for its lease (feed.engine.lease)."""
        self._batchers: dict[str, Batcher] = {}
        self._index: dict[str, dict[str, TargetRooms[Routed]]] = {}
        self._bad_specs: set[str] = set()
        """Rooms whose registry spec could not be read, each logged once (it comes back with
        every refresh)."""
        self._routed: dict[str, dict[bytes, tuple[str, Routed, int]]] = {}
        """At the reader, per connector: each routed row or filter room by its name (as Redis
        spells it) with its target and when it was routed (`_route_count`), so that a re-read of
        the registry adds and drops only what changed."""
        self._route_count = 0
        self._last_seq: dict[str, int] = {}
        self._published = 0
        """Changes this node published (numbers the ids remembered in the `seen` set)."""
        self._acked: dict[str, int] = {}
        """Per connector, the number of the last change Redis numbered for this node."""
        self._watching: dict[str, list[tuple[int, Change]]] = {}
        self._mirrors: dict[str, Mirror] = {}
        self._by_channel: dict[bytes, Mirror] = {}
        self._lapsing: dict[str, set[str]] = {}
        """Per connector, the rooms this node dropped whose registration is to be shortened
        (feed.engine.delivery: `_lapse`)."""
        self._lapse_task: asyncio.Task[None] | None = None
        self._pubsub: Subscriber | None = None
        self._caller: Caller | None = None
        self._caller_lock = asyncio.Lock()
        self._confirm: dict[bytes, asyncio.Future[None]] = {}
        self._replies: dict[str, asyncio.Future[dict[str, Any] | None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._scripts: dict[str, Any] = {}
        self._connected = asyncio.Event()
        self.ttl_ms = int(config.room_ttl * 1000)
        hub.metrics.describe(
            "feed_cluster_duplicates_dropped_total",
            "counter",
            "Changes read again after a takeover and not published twice",
        )
        hub.metrics.describe(
            "feed_cluster_redis_up", "gauge", "1 while the cluster's Redis answers"
        )
        hub.metrics.describe(
            "feed_cluster_reading", "gauge", "1 for each connector this node reads"
        )
        hub.metrics.describe(
            "feed_cluster_config_differs", "gauge", "1 where the reader's targets differ from ours"
        )
        hub.metrics.describe(
            "feed_cluster_format_behind",
            "gauge",
            "1 where the reader writes a newer cluster format than this node reads",
        )
        hub.metrics.describe(
            "feed_cluster_older_nodes",
            "gauge",
            "Nodes this reader finds on an older cluster format (a rolling upgrade not finished)",
        )
        hub.metrics.gauges(self._gauge_values)
        self.answer = max(2.0, config.lease / 2)
        """Seconds a reply from Redis may take before its connection is given up."""
        self.refresh = max(0.2, min(5.0, config.lease / 4))
        """Seconds between registry refreshes (members' rooms) and re-reads (at the reader)."""

    def _gauge_values(self) -> Iterable[tuple[str, Labels, float]]:
        """Read at scrape time: what an alert on a cluster needs beyond /readyz."""
        yield "feed_cluster_redis_up", (), 1.0 if self.up and self.name_taken is None else 0.0
        yield "feed_cluster_older_nodes", (), float(len(self.older_nodes) + self.silent_nodes)
        for name in self.hub.connectors:
            labels = (("connector", name),)
            yield "feed_cluster_reading", labels, 1.0 if name in self._leases else 0.0
            yield "feed_cluster_config_differs", labels, 1.0 if name in self.differing else 0.0
            behind = 1.0 if name in self.format_behind else 0.0
            yield "feed_cluster_format_behind", labels, behind

    # -- keys ----------------------------------------------------------------------------------

    def meta_key(self, room: str) -> str:
        return f"{self._p}:room:{room}:meta"

    def stream_key(self, room: str) -> str:
        return f"{self._p}:room:{room}:history"

    def channel(self, room: str) -> str:
        return f"{self._p}:room:{room}:live"

    def lease_key(self, connector: str) -> str:
        return f"{self._p}:lease:{connector}"

    def fence_key(self, connector: str) -> str:
        return f"{self._p}:fence:{connector}"

    def seen_key(self, connector: str) -> str:
        return f"{self._p}:seen:{connector}"

    def registry_key(self, connector: str) -> str:
        return f"{self._p}:rooms:{connector}"

    def live_key(self, connector: str) -> str:
        return f"{self._p}:live:{connector}"

    def name_key(self, node: str | None = None) -> str:
        return f"{self._p}:name:{node or self.node}"

    @property
    def schema_key(self) -> str:
        return f"{self._p}:schema"

    @property
    def status_key(self) -> str:
        return f"{self._p}:status"

    @property
    def nodes_key(self) -> str:
        return f"{self._p}:nodes"

    def _show_unreachable(self, connector: Connector, detail: str, hold: bool = False) -> None:
        """Show `connector` down for the cluster's Redis, unless it says so already: the
        listener and the lease loop notice one outage within a millisecond, each in its own
        words (asyncio's and redis-py's), and a user should read it once. `hold`: keep it shown
        until the listener is back (`_recover`), whatever a reading connector says meanwhile."""
        status = connector.status
        shown = status.state is State.DOWN and status.detail.startswith(UNREACHABLE)
        text = status.detail if shown else f"{UNREACHABLE}: {detail}"
        if hold and not (shown and connector.status_held):
            connector.hold_status(State.DOWN, text)
        elif not shown:
            connector.set_status(State.DOWN, text)

    async def _script(self, name: str, keys: list[Any], args: list[Any]) -> Any:
        return await self._scripts[name](keys=keys, args=args)

    async def _hot_script(self, source: str, keys: list[Any], args: list[Any]) -> Any:
        """A script called for every batch (the reader's publishing): over the engine's own
        connection (feed.engine.resp.Caller), opened again after it was lost."""
        caller = self._caller
        if caller is None or caller.lost:
            async with self._caller_lock:
                caller = self._caller
                if caller is None or caller.lost:
                    caller = await Caller.open(self.config.url, answer=self.answer)
                    self._caller = caller
        return await caller.script(source, keys, args)
