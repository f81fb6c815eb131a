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
  subscribe is refused (`server_busy`).

Target rooms (one per connector target) are not counted: their number is fixed by the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RoomBudget:
    per_identity: int
    total: int
    owners: dict[str, str] = field(default_factory=dict)
    """Room name -> the identity it is charged to."""
    counts: dict[str, int] = field(default_factory=dict)
    """Identity -> rooms charged to it."""

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

    def release(self, room: str) -> None:
        """The room is gone."""
        owner = self.owners.pop(room, None)
        if owner is not None:
            self._uncount(owner)

    def _uncount(self, owner: str) -> None:
        left = self.counts.get(owner, 0) - 1
        if left > 0:
            self.counts[owner] = left
        else:
            self.counts.pop(owner, None)
