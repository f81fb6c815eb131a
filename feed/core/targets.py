"""The rooms of one connector target, as both the hub and the cluster reader route a change.

A single node's hub routes to its own `Room`s; a cluster's reader routes to the `Routed` rooms
that any node registered (feed.engine.routes). The rule is the same on both sides, so it is one
piece: the target room always, row rooms by the change's key, filter rooms through the index of
their equality conditions (feed.core.filter_index), and every room on a truncate. Kept here, in
the core layer below both, so that the reader needs nothing from the hub's module and the hub
nothing from the engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from feed.core.change import Change
from feed.core.filter_index import FilterIndex
from feed.core.filters import RowFilter


class Targeted(Protocol):
    """What routing needs of a room: its name, row key and filter
    (feed.core.filter_index.Routable)."""

    name: str
    key: str | None
    filter: RowFilter | None


R = TypeVar("R", bound=Targeted)


@dataclass
class TargetRooms(Generic[R]):
    """The target room and the followed subrooms of one target.

    A change costs the same with ten per-user rooms as with a hundred thousand: row rooms are
    found by key, filter rooms by their eq/in conditions.
    """

    room: R
    by_key: dict[str, dict[str, R]] = field(default_factory=dict)
    filtered: FilterIndex[R] = field(default_factory=FilterIndex)
    bare: bool = field(default=True, init=False, repr=False)
    """No subroom is followed."""
    alone: bool = field(default=True, init=False, repr=False)
    """No subroom is followed and no parent: a change goes to the target room only. Checked
    first, so that such a change (every change, at many target rooms) reads neither index."""
    track: bool = False
    """The source may send changes without a before image (`Connector.before_images`): filter
    rooms follow the rows they hold (feed.core.filter_index), and a row room with a filter
    gets every change of its row, since whether its row left cannot be told from it."""
    parent: TargetRooms[R] | None = None
    """The rooms of a wider target that also receive every change of this one
    (`Connector.parent_target`: a MongoDB database watched whole, for its collections)."""

    def __post_init__(self) -> None:
        self.filtered.track = self.track
        self.alone = self.parent is None

    def add(self, room: R) -> None:
        if room.key is not None:
            self.by_key.setdefault(room.key, {})[room.name] = room
        else:  # a filter room, or a shaped room that sees the whole target
            self.filtered.add(room)
        self.bare = self.alone = False

    def discard(self, room: R, forget: bool = True) -> None:
        if room.key is not None:
            rooms = self.by_key.get(room.key, {})
            rooms.pop(room.name, None)
            if not rooms:
                self.by_key.pop(room.key, None)
        else:
            self.filtered.discard(room.name, forget)
        self.bare = not self.by_key and not len(self.filtered)
        self.alone = self.bare and self.parent is None

    def names(self) -> Iterator[str]:
        """The subrooms' names (the target room's is `room.name`)."""
        yield from self.filtered
        for rooms in self.by_key.values():
            yield from rooms

    def matching(self, change: Change) -> list[R]:
        rooms = self._own(change)
        if self.parent is not None:
            rooms += self.parent.matching(change)
        return rooms

    def _own(self, change: Change) -> list[R]:
        rooms = [self.room]
        if self.bare:
            return rooms
        if change.key is None and change.before is None and change.after is None:
            # A truncate (or a dropped collection) empties every row and filter room too.
            for by_name in self.by_key.values():
                rooms.extend(by_name.values())
            rooms.extend(self.filtered.rooms())
            return rooms
        if self.by_key:  # the row key only when some row room is followed
            key = change.row_key
            if key is not None:
                blind = self.track and change.before is None
                for room in self.by_key.get(key, {}).values():
                    if room.filter is None or blind or room.filter.matches(change):
                        rooms.append(room)
            moved = change.moved_from if change.meta else None
            if moved is not None:  # the row left its old key's room (leaves() marks it)
                for room in self.by_key.get(moved, {}).values():
                    if room.filter is None or room.filter.matches_image(change.before):
                        rooms.append(room)
        if self.track:
            start = len(rooms)
            self.filtered.collect(change, rooms)
            self.filtered.follow(change, rooms, start)
            return rooms
        self.filtered.collect(change, rooms)
        return rooms
