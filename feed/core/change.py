"""The one change event every connector produces, and its JSON form.

A `Change` is immutable so that the same object can sit in several rooms' replay buffers and be
sent to many clients without anyone altering it underneath the others.
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
import ipaddress
import json
import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Generic, TypeVar, overload

JSON = Any
"""A value made only of dict, list, str, int, float, bool and None."""


def _stdlib_dumps(value: Any) -> bytes:
    """Compact JSON as UTF-8 bytes, as orjson's `dumps` gives it."""
    return json.dumps(value, separators=(",", ":")).encode()


dumps_json: Callable[[Any], bytes] = _stdlib_dumps
"""JSON text as bytes: orjson where installed (it raises TypeError for ints past 64 bits)."""
_dumps_utc: Callable[..., bytes] | None = None
"""orjson's `dumps`, for a UTC time as `"...Z"` (OPT_UTC_Z); None without orjson."""
_UTC_Z = 0
try:  # a dependency, but the feed still works without it (the standard library is slower)
    import orjson

    dumps_json = orjson.dumps
    _dumps_utc, _UTC_Z = orjson.dumps, orjson.OPT_UTC_Z
except ImportError:  # pragma: no cover
    pass

T = TypeVar("T")


class computed_once(Generic[T]):
    """`functools.cached_property` without its lock.

    On Python 3.11 cached_property takes one class-wide RLock for every first access, and every
    change computes `wire` and `row_key` once: under a burst that lock was a measurable share of
    the server's CPU. A Change is built and read on the event loop, so there is nothing to guard.
    """

    def __init__(self, compute: Callable[[Any], T]) -> None:
        self.compute = compute
        self.name = compute.__name__
        self.__doc__ = compute.__doc__

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> computed_once[T]: ...

    @overload
    def __get__(self, instance: object, owner: type | None = None) -> T: ...

    def __get__(self, instance: object | None, owner: type | None = None) -> T | computed_once[T]:
        if instance is None:
            return self
        # A non-data descriptor: once the value is an instance attribute, it wins lookups.
        value = self.compute(instance)
        object.__setattr__(instance, self.name, value)
        return value


_set = object.__setattr__


GONE_OPS = frozenset(
    {"delete", "del", "expired", "evicted", "unlink", "rename_from", "move_from", "getdel"}
)
"""Ops after which the row's key no longer exists, whatever the images say: the protocol's
removals, which the client libraries drop rows on (a Redis key renamed or moved away too)."""


@dataclass(frozen=True, init=False)
class Change:
    """One committed change at a source.

    `id` is stable for a source position: the same change read twice (after a restart, say) carries
    the same id, so clients can drop duplicates. `key` identifies the row, document or Redis key; a
    composite primary key is a mapping of column to value. `before` and `after` are the images the
    source has (None where it has none). `ts` is the source's commit time. `meta` carries
    source-specific extras (for example MongoDB's updateDescription or Redis's truncation flag).
    `position` is the connector's own marker for this change (never sent); snapshots use it to
    tell which changes they already contain.
    """

    id: str
    connector: str
    source: str
    target: str
    op: str
    key: Any = None
    before: Mapping[str, Any] | None = None
    after: Mapping[str, Any] | None = None
    ts: dt.datetime | None = None
    meta: Mapping[str, Any] | None = None
    position: Any = field(default=None, compare=False, repr=False)

    def __init__(
        self,
        id: str,
        connector: str,
        source: str,
        target: str,
        op: str,
        key: Any = None,
        before: Mapping[str, Any] | None = None,
        after: Mapping[str, Any] | None = None,
        ts: dt.datetime | None = None,
        meta: Mapping[str, Any] | None = None,
        position: Any = None,
    ) -> None:
        # dataclass's own frozen __init__ sets each field with `object.__setattr__`, eleven
        # calls per change (4.2 µs on Python 3.11, 1.0 with them held in a global); the fields
        # go in as one dict instead, built by the interpreter without a call (0.5 µs). A change
        # is built per source event. The signature is checked against the fields by
        # tests/test_change.py.
        _set(
            self,
            "__dict__",
            {
                "id": id,
                "connector": connector,
                "source": source,
                "target": target,
                "op": op,
                "key": key,
                "before": before,
                "after": after,
                "ts": ts,
                "meta": meta,
                "position": position,
            },
        )

    @computed_once
    def row_key(self) -> str | None:
        """The key as it appears in a row room name (`main:public.orders:<row_key>`)."""
        return room_key(self.key)

    @computed_once
    def moved_from(self) -> str | None:
        """The row room key the row had before this change, when the change moved it to another
        key (an update of a Postgres primary key: `meta["old_key"]`), else None.

        The row room of that old key must hear of it: for its followers the row is gone, and
        without the change they would keep showing a row that no longer exists."""
        meta = self.meta
        if not meta or "old_key" not in meta:
            return None
        old = room_key(meta["old_key"])
        return None if old == self.row_key else old

    @computed_once
    def wire(self) -> dict[str, JSON]:
        """The JSON body shared by every room this change goes to (room and seq are added later).

        Its JSON text (`wire_tail`) is made with it: whatever asks for the body (a room's
        payload, the cluster's publisher) sends it, and one computation costs one lookup of
        this descriptor per change rather than two."""
        key, before = self.key, self.before
        body: dict[str, JSON] = {
            "id": self.id,
            "connector": self.connector,
            "source": self.source,
            "target": self.target,
            "op": self.op,
            # A str or int key and a missing image, the common cases, without a call.
            "key": key if type(key) is str or type(key) is int else to_json(key),
            "before": None if before is None else to_json(before),
            "after": to_json(self.after),
            "ts": format_ts(self.ts),
        }
        if self.meta:
            body["meta"] = to_json(self.meta)
        try:
            tail: bytes | None = dumps_json(body)[1:]
        except (TypeError, ValueError):
            tail = None
        _set(self, "wire_tail", tail)
        return body

    @computed_once
    def wire_tail(self) -> bytes | None:
        """`wire` as JSON text without its opening brace, encoded once however many rooms the
        change goes to (each room's `room` and `seq` are spliced in front of it); None when
        orjson refuses it (integers past 64 bits): the transport then encodes payloads whole."""
        self.wire  # noqa: B018 (computes both)
        tail: bytes | None = self.__dict__["wire_tail"]
        return tail

    def kept(self) -> tuple[Any, ...]:
        """The change's fields, as a replay buffer keeps them (`Change.thawed(kept)` is the
        change again); made once per change, however many rooms it goes to (`Hub._send`).

        A tuple, not the change: a buffer keeps what it holds for as long as `replay_buffer`
        changes have not come after it, at many rooms most of the process's long-lived
        objects, and the garbage collector's full passes walk every tracked object. Every
        instance of a Python class is tracked, with its computed wire dict (it holds the
        images) beside it; a tuple whose items are strings, numbers and times is not, once the
        collector has seen it. A dict among its items would keep it tracked whatever the dict
        holds, so each image and `meta` is kept as a tuple of its keys and one of its values,
        side by side in this tuple (`thawed` makes dicts of them again). Side by side, not as
        a pair: the collector can only let go of a tuple after every tuple in it, and it looks
        at the survivors of a pass in no set order, so a nested pair let most kept changes
        reach the old generation still tracked, where every one of them brought the next full
        pass nearer (docs/benchmarks.md, "Replay buffers and the garbage collector"). The
        change itself, its wire dict and its JSON go when its payloads have been written."""
        before, after, meta = self.before, self.after, self.meta
        return (
            self.id,
            self.connector,
            self.source,
            self.target,
            self.op,
            self.key,
            self.ts,
            self.position,
            None if before is None else tuple(before),
            None if before is None else tuple(before.values()),
            None if after is None else tuple(after),
            None if after is None else tuple(after.values()),
            None if meta is None else tuple(meta),
            None if meta is None else tuple(meta.values()),
        )

    @classmethod
    def thawed(cls, kept: tuple[Any, ...]) -> Change:
        """The change again from what `kept` gave."""
        ident, connector, source, target, op, key, ts, position = kept[:8]
        before_keys, before, after_keys, after, meta_keys, meta = kept[8:]
        return cls(
            ident,
            connector,
            source,
            target,
            op,
            key,
            None if before_keys is None else dict(zip(before_keys, before, strict=True)),
            None if after_keys is None else dict(zip(after_keys, after, strict=True)),
            ts,
            None if meta_keys is None else dict(zip(meta_keys, meta, strict=True)),
            position,
        )


@dataclass(frozen=True)
class Gap:
    """The source may have lost events (`target` None means every target of the connector).

    Clients that receive a `gap` should reload what they show: the feed cannot replay what the
    source never told it.

    `keys`, with a `target`, narrows it to some rows: the gap then reaches the target room, its
    filter rooms (either may hold those rows) and the row rooms of those keys (as `room_key`
    renders them), not the row rooms of every other key. A Redis value that could not be read
    after its event is such a gap: one key's row is unknown, the rest are right.
    """

    connector: str
    reason: str
    target: str | None = None
    ts: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    keys: frozenset[str] | None = None

    def reaches_key(self, key: str | None) -> bool:
        """Whether a room of the gap's target with this row key (None: not a row room) gets it."""
        return key is None or self.keys is None or key in self.keys


def room_key(key: Any) -> str | None:
    """Render a change key for a row room name (None: the change has no key).

    The text is a function of the key's JSON form (`to_json`), so that a client, which sees
    only the JSON `key` of a change, renders the same text (clients/python dbfeed_client
    `key_text`, clients/js `keyText`; docs/protocol.md, "Row keys as text"): scalars as their
    JSON text without quotes (`42`, `abc`), a composite key's values in column order joined by
    commas (`7,2026-01-01`), an ObjectId or Decimal128 as its own text. Before, the server
    rendered a value JSON has no type for by Python's `str` of its extended JSON
    (`{'$numberDecimal': '9.90'}`) where the clients wrote `9.90`, and a whole float `2.0`
    where a JavaScript client can only see `2`: the two named one row differently.
    """
    if key is None:
        return None
    if type(key) is str:  # most keys (every Redis key): skip the conversions below
        return key
    if type(key) is int:  # most of the rest (serial ids)
        return str(key)
    return key_text(to_json(key))


def key_text(key: JSON) -> str | None:
    """The row key text of a key already in its JSON form (`room_key` after `to_json`).

    The one rule, kept in step with the client libraries: null is no key; text is itself; an
    array, or an object (a composite key, a MongoDB `_id` that is a document), is its values'
    texts joined by commas, except that an object standing for one BSON value (`{"$oid": ..}`,
    `{"$numberDecimal": ..}`) is that value's text.
    """
    if key is None:
        return None
    if isinstance(key, str):
        return key
    if isinstance(key, list):
        return ",".join(_scalar_text(v) for v in key)
    if isinstance(key, dict):
        wrapped = _wrapped_text(key)
        if wrapped is not None:
            return wrapped
        return ",".join(_scalar_text(v) for v in key.values())
    return _scalar_text(key)


_WRAPPERS = ("$oid", "$numberDecimal")
"""Extended JSON objects that are one value with a text of its own: an ObjectId's hex, a
Decimal128's digits."""


def _wrapped_text(value: dict[str, Any]) -> str | None:
    if len(value) == 1:
        for name in _WRAPPERS:
            text = value.get(name)
            if isinstance(text, str):
                return text
    return None


def _scalar_text(value: JSON) -> str:
    """One value of a key in its JSON form, as JavaScript's `String` and `JSON.stringify`
    write it (a browser renders the same key as this server)."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return number_text(value)
    if isinstance(value, dict):
        wrapped = _wrapped_text(value)
        if wrapped is not None:
            return wrapped
    return compact_json(value)


def number_text(value: float) -> str:
    """A float as JavaScript's `String(number)` writes it: a whole one as an integer (`2`,
    JSON does not tell 2.0 from 2, so a JavaScript client cannot), others in the shortest
    text that reads back, plain from 1e-6 to 1e21 (`0.00001`, where Python's repr says
    `1e-05`), in exponent form outside (`1e-7`, `1e+21`)."""
    if value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    sign = "-" if value < 0 else ""
    text = repr(abs(value))
    mantissa, e, exponent = text.partition("e")
    if not e:  # Python writes plain text from 1e-4 on: the same digits as JavaScript
        return sign + text
    digits = mantissa.replace(".", "")
    point = int(exponent) + 1  # the value is 0.<digits> x 10**point
    if -6 < point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    rest = f".{digits[1:]}" if len(digits) > 1 else ""
    return f"{sign}{digits[0]}{rest}e{'-' if point - 1 < 0 else '+'}{abs(point - 1)}"


def compact_json(value: JSON) -> str:
    """JSON text as JavaScript's `JSON.stringify` writes it: no spaces, numbers as `String`
    writes them, non-ASCII as it is."""
    if isinstance(value, dict):
        members = (
            f"{json.dumps(str(k), ensure_ascii=False)}:{compact_json(v)}" for k, v in value.items()
        )
        return "{" + ",".join(members) + "}"
    if isinstance(value, list):
        return "[" + ",".join(compact_json(v) for v in value) + "]"
    if isinstance(value, float):
        return number_text(value)
    return json.dumps(value, ensure_ascii=False)


def format_ts(ts: dt.datetime | None) -> str | None:
    """ISO 8601 in UTC with microseconds and a `Z`, the form JavaScript's Date parses."""
    global _last_ts
    if ts is None:
        return None
    last, text = _last_ts
    if ts is last:  # the changes of one read (Redis) or one transaction share their ts object
        return text
    # This runs once per change. orjson writes a UTC time five times faster than isoformat
    # (itself several times faster than strftime), but leaves out a fraction of zero.
    if ts.tzinfo is dt.UTC and ts.microsecond and type(ts) is dt.datetime and _dumps_utc:
        text = _dumps_utc(ts, option=_UTC_Z)[1:-1].decode()
    elif ts.tzinfo is dt.UTC:  # what the sources give: no conversion ("+00:00" becomes "Z")
        text = ts.isoformat(timespec="microseconds")[:-6] + "Z"
    elif ts.tzinfo is None:
        text = ts.isoformat(timespec="microseconds") + "Z"
    else:
        text = ts.astimezone(dt.UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
    _last_ts = (ts, text)
    return text


_last_ts: tuple[dt.datetime | None, str] = (None, "")


_PLAIN = frozenset({str, int, bool, type(None)})
"""Types `to_json` gives back as they are (and finite floats)."""


def to_json(value: Any) -> JSON:
    """Map every type the sources produce onto JSON (the table is in docs/protocol.md).

    Decimal becomes a string so no precision is lost; bytes become base64; non-finite floats become
    the strings "NaN", "Infinity", "-Infinity"; BSON types become relaxed extended JSON.
    """
    kind = type(value)  # exact types first: this runs for every value of every image
    if kind is str or kind is int or value is None or kind is bool:
        return value
    if kind is dict:
        for k, v in value.items():
            plain = type(v) in _PLAIN or (type(v) is float and math.isfinite(v))
            if not plain or type(k) is not str:
                return {k if type(k) is str else str(k): to_json(v) for k, v in value.items()}
        # Already JSON, as most images are: shared, not copied (an image is never changed in
        # place, and one object fewer per change for the garbage collector to keep visiting).
        return value
    if kind is float and math.isfinite(value):
        return value
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_json(v) for v in value]
    if type(value).__module__.startswith("bson"):  # before bytes: bson.Binary is a bytes
        return _bson_to_json(value)
    if isinstance(value, Decimal):
        # Positional, as Postgres prints numeric: `str` writes 0.00000001 as "1E-8".
        return format(value, "f")
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            return value.isoformat()
        return format_ts(value)
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, enum.Enum):
        return to_json(value.value)
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return str(value)
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    return str(value)


def _bson_to_json(value: Any) -> JSON:
    """Relaxed extended JSON for one BSON value (imported lazily: only MongoDB users have bson)."""
    from bson import json_util

    return json.loads(json_util.dumps(value, json_options=json_util.RELAXED_JSON_OPTIONS))
