"""Rooms as the reader routes them: rebuilt on any node from the spec a member's node registered.

The reader is not the node whose clients follow a row or filter room, so each room travels as a
plain spec (`room_spec`) through Redis and comes back as a `Routed` room, indexed per target
(feed.core.targets, shared with the hub) so that routing cost grows with distinct rooms, never
with the number of nodes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from feed.core.filters import RowFilter, parse_filter
from feed.core.rooms import Room
from feed.security.access import Shape, ShapedRoom


@dataclass(eq=False)
class Routed:
    """A room as the reader routes it: rebuilt from its registry spec on any node."""

    name: str
    key: str | None = None
    filter: RowFilter | None = None
    shape: Shape | None = None


def room_spec(room: Room) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": room.name,
        "connector": room.connector,
        "target": room.target,
        "key": room.key,
        "filter": room.filter.canonical if room.filter is not None else None,
    }
    if isinstance(room, ShapedRoom):
        shape = room.shape
        spec["shape"] = {
            "forced": shape.forced.canonical if shape.forced is not None else None,
            "masked": [list(path) for path in shape.masked],
        }
    return spec


def routed_from_spec(spec: Mapping[str, Any]) -> Routed:
    big = 1 << 20  # a room's own filter, not a client's: no client limit applies

    def parse(text: str) -> RowFilter:
        return parse_filter(text, max_length=big, max_conditions=big)

    row_filter = parse(spec["filter"]) if spec.get("filter") else None
    shape = None
    if spec.get("shape"):
        raw = spec["shape"]
        forced = parse(raw["forced"]) if raw.get("forced") else None
        shape = Shape(forced, tuple(tuple(p) for p in raw.get("masked", [])))
    return Routed(spec["name"], spec.get("key"), row_filter, shape)
