"""The filter rooms of one target, found for a change without checking every filter.

The common use of filter rooms is one per user or tenant (`user_id=eq.<id>`, or a forced row filter
from a claim): thousands of rooms on one target, of which a change matches one or two. Checking
every filter per change made routing cost grow with the number of rooms (59 ms per change at
10,000), so the rooms are indexed by the equality part of their filter:

- a filter with an `eq` or `in` condition is filed under that condition's field and the
  equality keys of its literals (feed.core.filters: `Literal.equality_keys`); a change looks up the
  key of its before and after values of each such field, and only those candidates have their
  whole filter checked. The cost per change grows with the number of distinct indexed fields,
  not with the number of rooms;
- a filter with no equality part (only `neq`, `lt`, `lte`, `gt`, `gte`) is checked on every
  change, but each image field is read once per change however many filters name it;
- a room without a filter (a shaped room that masks fields only) receives every change.

A key match is only a candidate: the room's whole filter is checked on both images, exactly as
`RowFilter.matches` does, so the index can only make routing faster, never change its answer.

Some sources send no before image (Redis keyspace events, MongoDB without pre-images): "the old
image matched, the new one does not" cannot be seen in the change, and a row that left a filter
room, or was deleted, went unannounced, its clients keeping it forever. For such a target the
index `track`s which rows each filter room was last sent matching (or was given in a snapshot,
`hold`), and a change of such a row without a before image reaches those rooms too. While a
filter room's snapshot is read, the rows it will hold are not known yet: a `ChangeLog` notes
the last change of every row meanwhile, so that a row of the snapshot that left before the rows
were held still reaches the room (`SnapshotWatch.leavers`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar

from feed.core.change import GONE_OPS, Change
from feed.core.filters import Condition, RowFilter, lookup, value_key


class Routable(Protocol):
    """What the index needs of a room: the hub's `Room`, or the cluster reader's `Routed`."""

    name: str
    filter: RowFilter | None


Room = TypeVar("Room", bound=Routable)

_MISSING: Any = object()


class FieldReader:
    """One image's field values, each looked up once however many conditions read it."""

    __slots__ = ("image", "values")

    def __init__(self, image: Mapping[str, Any]) -> None:
        self.image = image
        self.values: dict[str, Any] = {}

    def get(self, field: str) -> Any:
        """The field's value, or `_MISSING` when the image does not have it."""
        value = self.values.get(field, _MISSING)
        if value is _MISSING and field not in self.values:
            found, value = lookup(self.image, field)
            if not found:
                value = _MISSING
            self.values[field] = value
        return value

    def satisfies(self, conditions: tuple[Condition, ...]) -> bool:
        for condition in conditions:
            value = self.get(condition.field)
            if value is _MISSING or not condition.test(value):
                return False
        return True


def anchor_of(row_filter: RowFilter) -> Condition | None:
    """The condition a filter is indexed by: its equality condition with the fewest values."""
    best: Condition | None = None
    for condition in row_filter.conditions:
        if condition.equality and (best is None or len(condition.values) < len(best.values)):
            best = condition
    return best


WATCH_LIMIT = 100_000
"""Rows a change log notes at most; past it, which rows left cannot be told (a gap)."""

UNSURE = "too many rows changed while the snapshot was read to tell which left"
"""The reason of the gap a subscriber gets after its snapshot when `SnapshotWatch.leavers`
cannot tell (a node's hub and a cluster's reader say it alike)."""


class ChangeLog:
    """The last change of each row of a tracked target, and the rooms it reached, while any
    filter room's snapshot is read: one log for all of them, so that a change costs one note
    however many snapshots are under way (a storm of subscribes after a restart)."""

    __slots__ = ("count", "last", "overflowed")

    def __init__(self) -> None:
        self.count = 0
        self.last: dict[str, tuple[int, Change, set[str]]] = {}
        """Row key -> (when, its last change, the names of the filter rooms that reached)."""
        self.overflowed = False

    def note(self, key: str, change: Change, reached: set[str]) -> None:
        if key in self.last or len(self.last) < WATCH_LIMIT:
            self.count += 1
            self.last[key] = (self.count, change, reached)
        else:
            self.overflowed = True


class SnapshotWatch:
    """One filter room's snapshot read over a tracked target (`FilterIndex.watch`).

    Without before images, a row leaves a filter room only through the rows the room holds, and
    a snapshot's rows are held once it returns. A row of the snapshot whose change after the
    snapshot's point (not `covers`) made it leave before then reached no one: the new
    subscriber kept it for good. `leavers` finds those changes in the target's log."""

    __slots__ = ("active", "log", "name", "start")

    def __init__(self, name: str, log: ChangeLog | None) -> None:
        self.name = name
        self.log = log
        self.start = log.count if log is not None else 0
        self.active = log is not None

    def leavers(
        self, keys: Sequence[str | None] | None, covers: Callable[[Change], bool]
    ) -> list[Change] | None:
        """Of the snapshot's rows (`keys`), the last changes the room must still get, in the
        order they happened; None when that cannot be told (too many rows changed meanwhile,
        or the connector gave no keys)."""
        log = self.log
        if log is None or log.count == self.start:
            return []
        if log.overflowed or keys is None:
            return None
        late = []
        for key in set(keys):
            entry = log.last.get(key) if key is not None else None
            if entry is not None:
                when, change, reached = entry
                if when > self.start and self.name not in reached and not covers(change):
                    late.append((when, change))
        return [change for _, change in sorted(late, key=lambda entry: entry[0])]


class FilterIndex(Generic[Room]):
    """The filter rooms (and unfiltered shaped rooms) of one target, indexed for routing.

    Rooms are known by name: `name in index` and iterating give names.
    """

    def __init__(self, track: bool = False) -> None:
        self.track = track
        """Follow which rows each filter room holds (a source without before images)."""
        self._held: dict[str, dict[str, Room]] = {}
        """Row key -> the filter rooms last sent a matching image of it (with `track`)."""
        self._holds: dict[str, set[str]] = {}
        """Room name -> the row keys it holds, to forget them with the room."""
        self._by_value: dict[str, dict[Hashable, dict[str, Room]]] = {}
        """field -> equality key -> rooms whose anchor condition has that key."""
        self._anchors: dict[str, tuple[Room, str, tuple[Hashable, ...]]] = {}
        self._scanned: dict[str, Room] = {}
        """Rooms with no equality condition, checked on every change."""
        self._unfiltered: dict[str, Room] = {}
        self._log: ChangeLog | None = None
        """The rows' last changes while filter rooms' snapshots are read (with `track`)."""
        self._watching = 0

    def __len__(self) -> int:
        return len(self._anchors) + len(self._scanned) + len(self._unfiltered)

    def __contains__(self, name: object) -> bool:
        return name in self._anchors or name in self._scanned or name in self._unfiltered

    def __iter__(self) -> Iterator[str]:
        return (room.name for room in self.rooms())

    def rooms(self) -> Iterator[Room]:
        yield from self._unfiltered.values()
        for room, _, _ in self._anchors.values():
            yield room
        yield from self._scanned.values()

    def add(self, room: Room) -> None:
        if room.name in self:
            return
        for row in self._holds.get(room.name, ()):  # kept by `discard(forget=False)`
            self._held[row][room.name] = room
        if room.filter is None:
            self._unfiltered[room.name] = room
            return
        anchor = anchor_of(room.filter)
        if anchor is None:
            self._scanned[room.name] = room
            return
        keys = tuple(
            dict.fromkeys(k for literal in anchor.literals for k in literal.equality_keys())
        )
        by_key = self._by_value.setdefault(anchor.field, {})
        for key in keys:
            by_key.setdefault(key, {})[room.name] = room
        self._anchors[room.name] = (room, anchor.field, keys)

    def discard(self, name: str, forget: bool = True) -> None:
        """Drop a room; `forget=False` keeps the rows it holds, for the same room added again
        (the cluster reader rebuilds a room from its spec each time a node registers it)."""
        for row in self._holds.pop(name, ()) if forget else ():
            holders = self._held.get(row)
            if holders is not None:
                holders.pop(name, None)
                if not holders:
                    del self._held[row]
        self._unfiltered.pop(name, None)
        self._scanned.pop(name, None)
        anchored = self._anchors.pop(name, None)
        if anchored is None:
            return
        _, field, keys = anchored
        by_key = self._by_value[field]
        for key in keys:
            rooms = by_key[key]
            rooms.pop(name, None)
            if not rooms:
                del by_key[key]
        if not by_key:
            del self._by_value[field]

    def index_size(self) -> int:
        """(field, key) entries in the equality index: it must shrink back as rooms go."""
        return sum(len(by_key) for by_key in self._by_value.values())

    def held(self) -> int:
        """(room, row) pairs followed for a source without before images."""
        return sum(len(keys) for keys in self._holds.values())

    def forget_held(self) -> None:
        """After a gap: what the rooms hold is unknown now (their clients reload, and a new
        snapshot is held again)."""
        self._held.clear()
        self._holds.clear()

    def watch(self, name: str) -> SnapshotWatch:
        """Note every row's last change until `unwatch`: filter room `name`'s snapshot is read."""
        if not self.track or name not in self or name in self._unfiltered:
            return SnapshotWatch(name, None)
        if self._log is None:
            self._log = ChangeLog()
        self._watching += 1
        return SnapshotWatch(name, self._log)

    def unwatch(self, watch: SnapshotWatch) -> None:
        """The snapshot returned (or failed); its `leavers` still read the log it had."""
        if watch.active:
            watch.active = False
            if watch.log is self._log:
                self._watching -= 1
                if not self._watching:
                    self._log = None

    def settle(
        self,
        watch: SnapshotWatch,
        keys: Sequence[str | None] | None,
        covers: Callable[[Change], bool],
    ) -> list[Change] | None:
        """After `unwatch`: hold the snapshot's rows (`keys`) for its room, but those that left
        it while it was read, and return the changes that made them leave (`leavers`: None
        when that cannot be told, and every row is held)."""
        leavers = watch.leavers(keys, covers)
        gone = {change.row_key for change in leavers or ()}
        self.hold(watch.name, [k for k in keys or () if k not in gone] if gone else keys)
        return leavers

    def hold(self, name: str, keys: Iterable[str | None] | None) -> None:
        """With `track`: filter room `name` holds these rows (a snapshot gave them to it; None:
        the connector did not say its rows' keys)."""
        if not self.track or keys is None:
            return
        if name in self._anchors:
            room = self._anchors[name][0]
        elif name in self._scanned:
            room = self._scanned[name]
        else:
            return  # not a filter room (a target, row or masks-only room follows no rows)
        for key in keys:
            if key is not None:
                self._held.setdefault(key, {})[name] = room
                self._holds.setdefault(name, set()).add(key)

    def follow(self, change: Change, out: list[Room], start: int) -> None:
        """With `track`, after `collect` appended `out[start:]`: of those rooms, the ones the
        after image matches hold the change's row now; without a before image, rooms that held
        it and are not among them are appended too (the row left them, or is gone). A change
        with a before image was routed by it. Apart from `collect`, so that a target that does
        not track pays nothing for it."""
        if not self._held and len(out) == start and self._log is None:
            return
        key = change.row_key
        if key is None:
            return
        after = change.after
        routed = out[start:]
        if change.before is None:
            now = {room.name: room for room in routed if room.filter is not None}
        elif after is None:
            now = {}
        else:
            now = {
                room.name: room
                for room in routed
                if room.filter is not None and room.filter.matches_image(after)
            }
        if change.before is None and after is None and change.op not in GONE_OPS:
            # Neither image, and the row is not gone: a Redis write whose value was read after
            # the key had vanished, a MongoDB update without its document. Whether it still
            # matches is unknown, so the rooms holding it hear of it and go on holding it: the
            # removal that follows (or the next image) must reach them too.
            out.extend(self._held.get(key, {}).values())  # no filter matched: `now` is empty
        else:
            holders = self._held.pop(key, None)
            if holders:
                for name, room in holders.items():
                    if name not in now:
                        if change.before is None:
                            out.append(room)
                        self._holds[name].discard(key)
        if now and after is not None:
            self._held[key] = now
            for name in now:
                self._holds.setdefault(name, set()).add(key)
        if self._log is not None:
            self._log.note(key, change, {room.name for room in out[start:]})

    def collect(self, change: Change, out: list[Room]) -> None:
        """Append to `out` every room whose filter the change's before or after image matches
        (see `follow` for a source without before images)."""
        if self._unfiltered:
            out.extend(self._unfiltered.values())
        if not self._by_value and not self._scanned:
            return
        before = FieldReader(change.before) if change.before is not None else None
        after = FieldReader(change.after) if change.after is not None else None
        if self._by_value:
            candidates: dict[str, Room] = {}
            for field, by_key in self._by_value.items():
                for reader in (before, after):
                    if reader is None:
                        continue
                    value = reader.get(field)
                    if value is _MISSING:
                        continue
                    rooms = by_key.get(value_key(value))
                    if rooms:
                        candidates.update(rooms)
            for room in candidates.values():
                if _matches(room, before, after):
                    out.append(room)
        for room in self._scanned.values():
            if _matches(room, before, after):
                out.append(room)


def _matches(room: Routable, before: FieldReader | None, after: FieldReader | None) -> bool:
    assert room.filter is not None
    conditions = room.filter.conditions
    return (before is not None and before.satisfies(conditions)) or (
        after is not None and after.satisfies(conditions)
    )
