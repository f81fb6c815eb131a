"""A room: its sequence numbers and its bounded replay buffer.

Numbers are per room because a client follows rooms, not sources: `seq` increasing by one lets a
client see at a glance that it has everything, and `since` names a point in one room's history.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Self

from feed.core.change import Change, dumps_json
from feed.core.filters import RowFilter


class Payload(dict[str, Any]):
    """A room's copy of a change's wire body, `room` and `seq` added, that keeps its change.

    The transport then writes it as the change's JSON (encoded once, `Change.wire_json`) with
    this room's `room` and `seq` spliced in, instead of encoding the whole body once per room.
    Any change to the copy (a shaped room masking fields, say) drops the change, so what is
    written is always what the dict holds.
    """

    __slots__ = ("change", "head")
    change: Change | None
    head: bytes
    """`{"room":<the room's name>,"seq":` as JSON, made once per room (`Room.head`); unset in a
    payload made elsewhere, which encodes its `room` instead."""

    def json_body(self) -> bytes | None:
        """The payload as JSON by splicing (None: encode the dict itself)."""
        change = self.change
        tail = change.wire_tail if change is not None else None
        if tail is None:
            return None
        left = b'"left":true,' if "left" in self else b""
        try:
            head = self.head
        except AttributeError:  # not made by a room
            head = b'{"room":%b,"seq":' % dumps_json(self["room"])
        return b"%b%d,%b%b" % (head, self["seq"], left, tail)

    def _edited(self) -> None:
        self.change = None

    def __setitem__(self, key: str, value: Any) -> None:
        self._edited()
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self._edited()
        super().__delitem__(key)

    def __ior__(self, other: Any) -> Self:  # type: ignore[override,misc]
        self._edited()
        return super().__ior__(other)

    def pop(self, *args: Any) -> Any:
        self._edited()
        return super().pop(*args)

    def popitem(self) -> tuple[str, Any]:
        self._edited()
        return super().popitem()

    def clear(self) -> None:
        self._edited()
        super().clear()

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._edited()
        super().update(*args, **kwargs)

    def setdefault(self, key: str, default: Any = None) -> Any:
        self._edited()
        return super().setdefault(key, default)


def leaves(key: str | None, row_filter: RowFilter | None, change: Change) -> bool:
    """Whether `change` goes to a room for its before image only: the row has just left it,
    by no longer matching the room's filter, or by moving to another key than the row room's
    (`Change.moved_from`). Clients drop such a row (`"left": true`). One rule for a node's own
    rooms (`Room.record`) and for the cluster's reader (feed.engine.publisher)."""
    after = change.after
    if after is None:
        return False
    if row_filter is not None and not row_filter.matches_image(after):
        return True
    return key is not None and change.meta is not None and key == change.moved_from


@dataclass(eq=False)
class Room:
    name: str
    connector: str
    target: str
    key: str | None = None
    filter: RowFilter | None = None
    capacity: int = 1000
    seq: int = 0
    gap_seq: int | None = None
    """The seq at the last announced gap: a resume from it or before cannot be trusted, since
    whatever the source lost came after that number and never got one of its own."""
    members: set[str] = field(default_factory=set)
    pending: set[str] = field(default_factory=set)
    """Members still being caught up (replay or snapshot): live sends skip them meanwhile."""
    empty_since: float | None = field(default_factory=time.monotonic)
    evicted: int = 0
    _buffer: deque[tuple[Any, ...]] = field(default_factory=deque)
    """The last changes numbered here, oldest first, each as its fields (`Change.kept`, shared
    by every room it went to) rather than this room's payload dict, which is rebuilt for a
    replay. Their numbers are consecutive and end at `seq` (`record` is the only writer), so
    no number is stored with them: at many rooms the buffered entries are most of the feed's
    long-lived objects, and every tracked object kept costs the garbage collector's full
    passes time (docs/benchmarks.md, "Replay buffers and the garbage collector")."""
    gaps: int = 0
    """Gaps announced here so far: a member's catch-up tells it of one announced since it
    joined, which it may have heard before its subscribe's answer, with no room to go to."""
    gap_reason: str = ""
    _left: set[int] = field(default_factory=set)
    """The numbers of buffered changes that left this room's filter (sent for `before` only)."""
    head: bytes = field(init=False, repr=False, default=b"")
    """The start of every payload's JSON up to its number (`Payload.head`): the name is
    encoded once per room rather than once per change."""

    def __post_init__(self) -> None:
        self.head = b'{"room":%b,"seq":' % dumps_json(self.name)

    @property
    def ephemeral(self) -> bool:
        """Row and filter rooms live only while followed; target rooms live as long as the feed."""
        return self.key is not None or self.filter is not None

    def record(self, change: Change, kept: tuple[Any, ...] | None = None) -> dict[str, Any]:
        """Number the change for this room, keep it for replay (`kept`: `change.kept()`, made
        once for all its rooms), and return its wire payload."""
        seq = self.seq = self.seq + 1
        # A target room (neither key nor filter) never has a row leave it: no call per change.
        left = (self.key is not None or self.filter is not None) and leaves(
            self.key, self.filter, change
        )
        buffer = self._buffer
        buffer.append(change.kept() if kept is None else kept)
        if left:
            self._left.add(seq)
        if len(buffer) > self.capacity:
            buffer.popleft()
            self.evicted += 1
            if self._left:
                self._left.discard(seq - len(buffer))
        return self.payload(seq, change, left)

    def payload(self, seq: int, change: Change, left: bool) -> dict[str, Any]:
        """The change as this room sends it with number `seq`: the same for the live send and
        for every replay of it (a shaped room overrides this to apply its shape)."""
        # Built by dict's own init, without Python frames: this runs per room per change.
        if left:
            payload = Payload(change.wire, room=self.name, seq=seq, left=True)
        else:
            payload = Payload(change.wire, room=self.name, seq=seq)
        payload.change = change
        payload.head = self.head
        return payload

    def source_gap(self, reason: str) -> str:
        """How this room tells a gap in its source's words (`reason`): as they are here; a
        shaped room replaces them (feed.security.access.ShapedRoom)."""
        return reason

    def mark_gap(self, reason: str = "") -> None:
        self.gap_seq = self.seq
        self.gaps += 1
        self.gap_reason = reason

    def holds_after(self, since: int) -> bool:
        """Whether every change after `since` is still here (so a resume loses nothing)."""
        if self.gap_seq is not None and since <= self.gap_seq:
            return False
        return self.buffered_after(since)

    def buffered_after(self, since: int) -> bool:
        """Whether every change numbered after `since` is still in the buffer, gaps aside: for
        a member's catch-up, which started after any gap before it (its snapshot or its
        `recovered: false` covers that one) and heard of any gap since live, as members do."""
        if since > self.seq:
            return False
        if since == self.seq:
            return True
        return bool(self._buffer) and self.seq - len(self._buffer) + 1 <= since + 1

    def after(self, since: int) -> Iterator[tuple[int, Change, dict[str, Any]]]:
        """The buffered changes numbered after `since`, each with its payload, rebuilt exactly
        as it was first sent."""
        buffer = self._buffer
        first = self.seq - len(buffer) + 1
        skip = max(0, since + 1 - first)
        for offset, kept in enumerate(itertools.islice(buffer, skip, None), start=skip):
            seq = first + offset
            change = Change.thawed(kept)
            yield seq, change, self.payload(seq, change, seq in self._left)

    def join(self, sid: str) -> None:
        self.members.add(sid)
        self.empty_since = None

    def leave(self, sid: str) -> None:
        self.members.discard(sid)
        self.pending.discard(sid)
        if not self.members and self.empty_since is None:
            self.empty_since = time.monotonic()

    def expired(self, now: float, grace: float) -> bool:
        return self.ephemeral and self.empty_since is not None and now - self.empty_since >= grace
