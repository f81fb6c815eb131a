"""Keyspace notifications as typed values, and the notify-keyspace-events flags they need.

Shaped like redis-py's `redis.keyspace_notifications.KeyNotification.from_message`, but working on
bytes throughout: redis-py decodes channel names with `errors="replace"`, which would turn two
different non-UTF-8 keys into the same string. Here the key stays bytes until the connector decides
how to show it (text, or base64 with a flag).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

# K: keyspace channels (`__keyspace@<db>__:<key>`, one subscription per pattern, matched by Redis).
# g$lshzxet: generic, string, list, set, hash, zset, expired, evicted, stream events.
NEEDED_FLAGS = "Kg$lshzxet"
# `A` is Redis's alias for every event class (it also covers `d`, module types, in Redis 7).
_ALIAS_A = "g$lshzxetd"

# Which event family each op belongs to (documentation, tests and the catalog use it; unknown
# events from newer Redis versions are passed through with family "other").
FAMILIES: Mapping[str, str] = {
    **dict.fromkeys(
        (
            "del",
            "unlink",
            "rename_from",
            "rename_to",
            "copy_to",
            "move_from",
            "move_to",
            "restore",
            "expire",
            "persist",
            "new",
            "sortstore",
        ),
        "generic",
    ),
    **dict.fromkeys(
        ("set", "setrange", "incrby", "incrbyfloat", "append", "getex", "getdel"), "string"
    ),
    **dict.fromkeys(
        ("lpush", "rpush", "lpop", "rpop", "linsert", "lset", "ltrim", "lrem", "lmove"), "list"
    ),
    **dict.fromkeys(("sadd", "srem", "spop", "sinterstore", "sunionstore", "sdiffstore"), "set"),
    **dict.fromkeys(
        ("hset", "hdel", "hincrby", "hincrbyfloat", "hexpire", "hpersist", "hexpired"), "hash"
    ),
    **dict.fromkeys(
        (
            "zadd",
            "zincr",
            "zrem",
            "zremrangebyscore",
            "zremrangebyrank",
            "zremrangebylex",
            "zinterstore",
            "zunionstore",
            "zdiffstore",
            "zrangestore",
            "zpopmin",
            "zpopmax",
        ),
        "zset",
    ),
    **dict.fromkeys(
        (
            "xadd",
            "xtrim",
            "xdel",
            "xsetid",
            "xgroup-create",
            "xgroup-createconsumer",
            "xgroup-delconsumer",
            "xgroup-destroy",
            "xgroup-setid",
        ),
        "stream",
    ),
    "expired": "expired",
    "evicted": "evicted",
}

# Not changes: `keymiss` (the `m` flag, which the feed never asks for but another user of the
# server may have set) is published when a command reads a key that does not exist. Passed on, it
# gave clients keeping rows a `{"key"}` stub for a key that is not there, and with `fetch_values`
# the feed's own read of that key (TYPE in the value script) is itself a miss: one GET of a
# missing key set off a keymiss, read, keymiss, ... loop that never ended.
NOT_CHANGES = frozenset(("keymiss",))

# After these the key is gone (or moved away): there is no value to read.
GONE_OPS = frozenset(("del", "unlink", "expired", "evicted", "rename_from", "move_from", "getdel"))


def family(op: str) -> str:
    return FAMILIES.get(op, "other")


def missing_flags(current: str) -> str:
    """The flags of NEEDED_FLAGS that `current` (CONFIG GET's value) does not enable."""
    have = set(current.replace("A", _ALIAS_A))
    return "".join(flag for flag in NEEDED_FLAGS if flag not in have)


def merged_flags(current: str) -> str:
    """`current` plus what the feed needs: flags someone else enabled are never removed."""
    return current + missing_flags(current)


class KeyspaceEvent(NamedTuple):
    """One keyspace notification: `op` happened to `key` in database `db`.

    `pattern` is the channel pattern (as subscribed) that delivered it; Redis sends one message per
    matching pattern, so the connector maps it straight to a configured key pattern. A NamedTuple
    rather than a frozen dataclass: just as immutable and typed, and several times cheaper to
    build, which matters at one per event.
    """

    key: bytes
    op: str
    db: int
    pattern: bytes

    @classmethod
    def from_message(cls, message: Sequence[Any] | None) -> KeyspaceEvent | None:
        """Parse a raw RESP pmessage `[b"pmessage", pattern, channel, event]`; None if not one."""
        if message is None or len(message) != 4 or message[0] != b"pmessage":
            return None
        _, pattern, channel, data = message
        return cls.try_parse(channel, data, pattern)

    @classmethod
    def try_parse(cls, channel: bytes, data: bytes, pattern: bytes = b"") -> KeyspaceEvent | None:
        """Parse `__keyspace@<db>__:<key>` with the event name as data; None for other channels."""
        if not channel.startswith(b"__keyspace@"):
            return None
        end = channel.find(b"__:", 11)
        if end < 0:
            return None
        try:
            db = int(channel[11:end])
            op = data.decode("ascii")
        except (ValueError, UnicodeDecodeError):
            return None
        return cls(channel[end + 3 :], op, db, pattern)

    @property
    def family(self) -> str:
        return family(self.op)


def text_or_base64(raw: bytes) -> tuple[str, bool]:
    """Text when `raw` is UTF-8, else base64; the flag says which (never a crash)."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return base64.b64encode(raw).decode("ascii"), True


class _Incomplete(Exception):
    """The buffer ends inside a reply; wait for more bytes."""


class RespStream:
    """Incremental RESP2 parser for the pub/sub socket.

    redis-py parses one reply per awaited call, which caps a subscriber near 8,000 events a second
    on these machines; parsing every complete reply of a 64 KiB read in one synchronous pass keeps
    up with Redis itself. Errors come back as `ResponseLine` values rather than exceptions.
    """

    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0

    def feed(self, data: bytes) -> list[Any]:
        buf = self._buf[self._pos :] + data if self._pos < len(self._buf) else data
        self._buf = buf
        pos = 0
        size = len(buf)
        out: list[Any] = []
        append = out.append
        find = buf.find
        parse = _parse
        try:
            while pos < size:
                if buf.startswith(_PMESSAGE, pos):
                    # Fast path for the one frame that matters: three bulk strings in a row.
                    start = pos + 18  # len(_PMESSAGE)
                    parts = [b"pmessage"]
                    for _ in range(3):
                        end = find(b"\r\n", start)
                        if end < 0:
                            raise _Incomplete
                        stop = end + 2 + int(buf[start + 1 : end])
                        if stop + 2 > size:
                            raise _Incomplete
                        parts.append(buf[end + 2 : stop])
                        start = stop + 2
                    append(parts)
                    pos = start
                else:
                    value, pos = parse(buf, pos)
                    append(value)
        except _Incomplete:
            pass
        self._pos = pos
        return out

    def feed_events(self, data: bytes) -> list[Any]:
        """Like `feed`, but keyspace pmessages come back as `KeyspaceEvent`s, parsed in one step.

        One regular-expression match per notification, its three length prefixes checked against
        what it captured; anything else (another reply, a key holding CRLF, a frame cut by the
        read) goes through the exact length-driven parser. Parsing was the largest share of the
        server's CPU under a SET burst (about 8 µs an event in Python; this is about 2).
        """
        buf = self._buf[self._pos :] + data if self._pos < len(self._buf) else data
        self._buf = buf
        pos = 0
        size = len(buf)
        out: list[Any] = []
        append = out.append
        match = _KEYSPACE_PMESSAGE.match
        make = KeyspaceEvent
        try:
            while pos < size:
                m = match(buf, pos)
                if m is not None:
                    plen, pattern, clen, db, key, elen, op = m.groups()
                    if (
                        len(pattern) == int(plen)
                        and int(clen) == 14 + len(db) + len(key)  # __keyspace@ db __: key
                        and len(op) == int(elen)
                    ):
                        append(make(key, op.decode("ascii"), int(db), pattern))
                        pos = m.end()
                        continue
                value, pos = _parse(buf, pos)
                if type(value) is list:
                    value = KeyspaceEvent.from_message(value) or value
                append(value)
        except _Incomplete:
            pass
        self._pos = pos
        return out


_PMESSAGE = b"*4\r\n$8\r\npmessage\r\n"
_KEYSPACE_PMESSAGE = re.compile(
    rb"\*4\r\n\$8\r\npmessage\r\n"
    rb"\$(\d+)\r\n(.*?)\r\n"  # the pattern that matched
    rb"\$(\d+)\r\n__keyspace@(\d+)__:(.*?)\r\n"  # the channel: database and key
    rb"\$(\d+)\r\n([!-~]*)\r\n",  # the event name
    re.DOTALL,
)


@dataclass(frozen=True, slots=True)
class ResponseLine:
    """A RESP simple string (`+OK`) or error (`-ERR ...`)."""

    text: str
    error: bool


def _parse(buf: bytes, pos: int) -> tuple[Any, int]:
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind = buf[pos]
    if kind == 42:  # '*' array
        count = int(buf[pos + 1 : end])
        pos = end + 2
        if count < 0:
            return None, pos
        items = []
        for _ in range(count):
            value, pos = _parse(buf, pos)
            items.append(value)
        return items, pos
    if kind == 36:  # '$' bulk string
        size = int(buf[pos + 1 : end])
        if size < 0:
            return None, end + 2
        start = end + 2
        stop = start + size
        if len(buf) < stop + 2:
            raise _Incomplete
        return buf[start:stop], stop + 2
    if kind == 58:  # ':' integer
        return int(buf[pos + 1 : end]), end + 2
    if kind in (43, 45):  # '+' simple string, '-' error
        return ResponseLine(buf[pos + 1 : end].decode("utf-8", "replace"), kind == 45), end + 2
    raise ValueError(f"not a RESP2 reply: {buf[pos : pos + 20]!r}")
