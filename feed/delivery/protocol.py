"""Client requests as typed value objects, parsed defensively.

Everything a client sends is untrusted: each parser either returns a well-formed request or raises
ProtocolError with a code the client can act on. Nothing here touches the hub's state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from feed.errors import ProtocolError

SUBSCRIBE_KEYS = {"room", "filter", "since", "snapshot", "epoch"}


@dataclass(frozen=True)
class SubscribeRequest:
    room: str
    filter: str | None = None
    since: int | None = None
    snapshot: bool = False
    epoch: str | None = None

    @classmethod
    def from_payload(cls, data: Any, *, max_room: int, max_filter: int) -> SubscribeRequest:
        if isinstance(data, str):  # `subscribe "main:public.orders"` is a convenience
            data = {"room": data}
        if not isinstance(data, dict):
            raise ProtocolError("bad_request", 'subscribe takes an object like {"room": "..."}')
        unknown = set(data) - SUBSCRIBE_KEYS
        if unknown:
            name = sorted(map(str, unknown))[0][:40]
            raise ProtocolError("bad_request", f"unknown field {name!r} in subscribe")
        room = data.get("room")
        if not isinstance(room, str) or not room:
            raise ProtocolError("bad_request", "room must be a non-empty string")
        if len(room) > max_room:
            raise ProtocolError("bad_request", f"room is longer than {max_room} characters")
        filter_text = data.get("filter")
        if filter_text is not None:
            if not isinstance(filter_text, str):
                raise ProtocolError("bad_filter", "filter must be a string like 'status=eq.paid'")
            if len(filter_text) > max_filter:
                raise ProtocolError("bad_filter", f"filter is longer than {max_filter} characters")
            filter_text = filter_text or None
        since = data.get("since")
        if since is not None and (
            not isinstance(since, int) or isinstance(since, bool) or not 0 <= since < 2**63
        ):
            raise ProtocolError(
                "bad_since", "since must be a whole number >= 0 (the last seq seen)"
            )
        snapshot = data.get("snapshot", False)
        if not isinstance(snapshot, bool):
            raise ProtocolError("bad_request", "snapshot must be true or false")
        epoch = data.get("epoch")
        if epoch is not None and (not isinstance(epoch, str) or len(epoch) > 64):
            raise ProtocolError("bad_request", "epoch must be the string the server sent")
        return cls(room, filter_text, since, snapshot, epoch)


def unsubscribe_room(data: Any, *, max_room: int) -> str:
    room: Any
    if isinstance(data, str):
        room = data
    elif isinstance(data, dict) and set(data) <= {"room"}:
        room = data.get("room")
    else:
        raise ProtocolError("bad_request", 'unsubscribe takes an object like {"room": "..."}')
    if not isinstance(room, str) or not room or len(room) > max_room:
        raise ProtocolError("bad_request", "room must be a non-empty string")
    return room


def error_ack(exc: ProtocolError) -> dict[str, Any]:
    return {"ok": False, "error": {"code": exc.code, "message": exc.message}}
