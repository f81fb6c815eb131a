"""A node's copy of one room it has members in: the numbers and recent payloads it delivers from.

Shared by the listener (which advances it), the history reads (which fill it) and the resume path
(which reads it), so it lives apart from all three.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from feed.core.rooms import Room

RING = 256
"""Recent payloads each node keeps per followed room, so most catch-ups need no Redis read."""


@dataclass(eq=False)
class Mirror:
    """This node's view of one room it has members in: seq, epoch and recent payloads."""

    room: Room
    channel: bytes
    epoch: str | None = None
    seq: int | None = None
    gap: int = 0
    ready: bool = False
    ring: deque[tuple[int, Any]] = field(default_factory=lambda: deque(maxlen=RING))
    """Recent payloads, each a dict (read from the history) or the relayed JSON as it was sent
    (feed.engine.relay): either is written to a client as it is."""
    advanced: asyncio.Event | None = None
    """Set (and dropped) when the room's seq moves on: made only when a catch-up waits."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held while the room is being subscribed and registered."""
    order: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held while changes are applied, so a resync and the listener never interleave."""
