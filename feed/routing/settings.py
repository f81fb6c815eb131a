"""The `[server]` table's settings as the hub and the application shell read them.

They live beside the hub, not in feed.app.config, because the hub (and the cluster engine through
it) reads replay, snapshot and filter-room settings: the routing layer must not import the
application shell that loads the file. feed.app.config parses the table into this value.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    replay_buffer: int = 1000
    filter_room_grace: float = 30.0
    max_subscriptions: int = 100
    max_room_length: int = 512
    max_filter_length: int = 1024
    snapshot_limit: int = 1000
    snapshot_chunk_bytes: int = 256 * 1024
    """JSON bytes of rows per snapshot frame: larger snapshots go out in several
    (feed.core.snapshots)."""
    cors_allowed_origins: list[str] = field(default_factory=list)
    allowed_hosts: list[str] | None = None
    """Host names requests may name (feed.security.hosts); None: the default for the auth mode."""
    max_message_bytes: int = 64 * 1024
    dashboard: bool = True
    log_level: str = "info"
    access_log: bool = False
    """A line per HTTP request and per websocket opened or closed (uvicorn's access log): off by
    default, since a long-polling client makes a request per batch of changes (feed.app.logs)."""
    ping_interval: int = 25
    ping_timeout: int = 20
