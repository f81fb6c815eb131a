"""A room's payload as it travels through Redis, and as a node sends it on: spliced, not re-encoded.

The reader writes each payload as JSON whose first member is the room's name: for an unshaped
room the change's own JSON, encoded once however many rooms it goes to (`Change.wire_tail`),
behind `{"room":...,`. A node that receives it only has to put the room's `seq` in: it splices
`"seq":N,` after the room's name and hands the bytes on as a pre-encoded JSON value
(`orjson.Fragment`), which the transport writes as they are. No node decodes and re-encodes
the payloads it relays, and for a room without a shape its clients receive the same text as a
node without [cluster] sends (`{"room":...,"seq":N,...}`, feed.core.rooms.Payload); a shaped
room's payload is the shaped dict encoded by the reader, the same JSON object.

A payload that does not begin with the room's name (one written by an older reader) gets `seq`
in front instead: the same JSON object, its members in another order. Without orjson (a
dependency, but the feed runs without it) the payload is decoded and numbered as a dict.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

from feed.core.change import dumps_json

_fragment: Callable[[bytes], Any] | None
try:
    import orjson

    _fragment = orjson.Fragment
except ImportError:  # pragma: no cover
    _fragment = None


def same_payload(a: Any, b: Any) -> bool:
    """Whether two payloads `numbered` made are the same change under the same seq."""
    if _fragment is None:  # pragma: no cover
        return bool(a == b)
    return bool(orjson.dumps(a) == orjson.dumps(b))


LEFT = b'"left":true,'
"""After the room's name, in a filter room's payload of a change whose row left the filter."""


@functools.lru_cache(maxsize=4096)
def room_head(room: str) -> bytes:
    """`{"room":"<name>",`: the start of every payload the reader writes for the room."""
    return b'{"room":' + dumps_json(room) + b","


def numbered(room: str, seq: int, raw: bytes) -> Any:
    """The payload `raw` of `room` with its `seq`, as JSON to be written as it is."""
    if _fragment is None:  # pragma: no cover
        payload = json.loads(raw)
        payload["seq"] = seq
        return payload
    head = room_head(room)
    if raw.startswith(head):
        return _fragment(b'%b"seq":%d,%b' % (head, seq, raw[len(head) :]))
    return _fragment(b'{"seq":%d,%b' % (seq, raw[1:]))
