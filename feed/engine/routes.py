"""Rooms as the reader routes them: rebuilt on any node from the spec a member's node registered.

The reader is not the node whose clients follow a row or filter room, so each room travels as a
plain spec (`room_spec`) through Redis and comes back as a `Routed` room, indexed per target
(`TargetIndex`) so that routing cost grows with distinct rooms, never with the number of nodes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from feed.access import Shape, ShapedRoom
from feed.change import Change
from feed.filters import RowFilter, parse_filter
from feed.rooms import Room
from feed.routing import FilterIndex


@dataclass(eq=False)
class Routed:
    """A room as the reader routes it: rebuilt from its registry spec on any node."""

    name: str
    key: str | None = None
    filter: RowFilter | None = None
    shape: Shape | None = None


@dataclass
class TargetIndex:
    """The routed rooms of one target at the reader (its cost grows with distinct rooms only)."""

    room: Routed
    by_key: dict[str, dict[str, Routed]] = field(default_factory=dict)
    filtered: FilterIndex[Routed] = field(default_factory=FilterIndex)
    """Filter rooms indexed by their eq/in conditions, as the hub's are (feed.routing)."""

    def add(self, room: Routed) -> None:
        if room.key is not None:
            self.by_key.setdefault(room.key, {})[room.name] = room
        else:
            self.filtered.add(room)

    def discard(self, name: str) -> None:
        self.filtered.discard(name)
        for key, rooms in list(self.by_key.items()):
            if rooms.pop(name, None) is not None and not rooms:
                del self.by_key[key]

    def names(self) -> list[str]:
        return [*self.filtered, *(n for rooms in self.by_key.values() for n in rooms)]

    def matching(self, change: Change) -> list[Routed]:
        rooms = [self.room]
        key = change.row_key
        if key is not None and self.by_key:
            for room in self.by_key.get(key, {}).values():
                if room.filter is None or room.filter.matches(change):
                    rooms.append(room)
        self.filtered.collect(change, rooms)
        return rooms


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
    big = 1 << 20
    row_filter = parse_filter(spec["filter"], max_length=big) if spec.get("filter") else None
    shape = None
    if spec.get("shape"):
        raw = spec["shape"]
        forced = parse_filter(raw["forced"], max_length=big) if raw.get("forced") else None
        shape = Shape(forced, tuple(tuple(p) for p in raw.get("masked", [])))
    return Routed(spec["name"], spec.get("key"), row_filter, shape)
