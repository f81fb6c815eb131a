"""How many row and filter rooms may exist: per identity and in total.

Each distinct filter (or row, or shape) is a room with its own replay buffer, and a room outlives
its last member by `filter_room_grace` so that a reconnecting client can resume in it. Without a
bound, a few connections sending fresh filters made tens of thousands of rooms in seconds, and
kept them after they left (issue 18: 30,000 rooms with no client, 121 MB). The per-identity
connection limit does not bound that; this does:

- every ephemeral room is charged to one identity: the one that created it, then the last one to
  join it, so a room kept only by its grace still counts against whoever left it there;
- an identity at `rooms_per_identity` that asks for a new room first loses its own oldest idle
  room (one nobody follows, kept only by grace): rooms expire sooner under pressure, and a client
  that churns through filters recycles its own rooms instead of the server's memory. Only when
  all its rooms are followed is the subscribe refused (`too_many_rooms`);
- at `max_rooms` in all, the oldest idle room of anyone makes way; when none is idle the
  subscribe is refused (`server_busy`);
- an identity keeps at most `idle_per_identity` idle rooms: when one more goes idle (its last
  member left or disconnected), its oldest idle room goes at once. An idle room still numbers
  and buffers every change it matches; filters that match every change (`amount=neq.<n>`), left
  idle by the thousand, cost 15 to 20 ms of routing per change on one node at 5,000, and on a
  cluster an XADD each in Redis (1.1 GB in 40 s, the other clients' latency at 13 s).

Target rooms (one per connector target) are not counted: their number is fixed by the config.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class RoomBudget:
    per_identity: int
    total: int
    idle_per_identity: int = 500
    owners: dict[str, str] = field(default_factory=dict)
    """Room name -> the identity it is charged to."""
    counts: dict[str, int] = field(default_factory=dict)
    """Identity -> rooms charged to it."""
    idle: dict[str, dict[str, None]] = field(default_factory=dict, repr=False)
    """Identity -> its idle rooms, the longest idle first."""
    idle_rooms: dict[str, str] = field(default_factory=dict, repr=False)
    """Every idle room, the longest idle first -> the identity it is charged to."""

    def __len__(self) -> int:
        return len(self.owners)

    def charged(self, owner: str) -> int:
        return self.counts.get(owner, 0)

    def over_identity(self, owner: str) -> bool:
        return bool(self.per_identity) and self.charged(owner) >= self.per_identity

    def over_total(self) -> bool:
        return bool(self.total) and len(self.owners) >= self.total

    def charge(self, room: str, owner: str) -> None:
        """Charge `room` to `owner` (a new room, or an existing one it joins)."""
        previous = self.owners.get(room)
        if previous == owner:
            return
        if previous is not None:
            self._uncount(previous)
        self.owners[room] = owner
        self.counts[owner] = self.counts.get(owner, 0) + 1
        if room in self.idle_rooms:  # charged to whoever joins it: its idle place moves too
            self.went_busy(room)
            self.went_idle(room)

    def release(self, room: str) -> None:
        """The room is gone."""
        self.went_busy(room)
        owner = self.owners.pop(room, None)
        if owner is not None:
            self._uncount(owner)

    def went_idle(self, room: str) -> str | None:
        """The room's last member left; returns the identity charged, if it is over its idle
        allowance now (the caller drops its `oldest_idle`)."""
        owner = self.owners.get(room)
        if owner is None:
            return None
        self.went_busy(room)
        self.idle_rooms[room] = owner
        rooms = self.idle.setdefault(owner, {})
        rooms[room] = None
        if self.idle_per_identity and len(rooms) > self.idle_per_identity:
            return owner
        return None

    def went_busy(self, room: str) -> None:
        """The room has a member again (or is gone)."""
        owner = self.idle_rooms.pop(room, None)
        if owner is None:
            return
        rooms = self.idle[owner]
        del rooms[room]
        if not rooms:
            del self.idle[owner]

    def idle_of(self, owner: str | None) -> Iterator[str]:
        """The idle rooms of `owner` or (None) of anyone, the longest idle first."""
        yield from self.idle_rooms if owner is None else self.idle.get(owner, {})

    def _uncount(self, owner: str) -> None:
        left = self.counts.get(owner, 0) - 1
        if left > 0:
            self.counts[owner] = left
        else:
            self.counts.pop(owner, None)
