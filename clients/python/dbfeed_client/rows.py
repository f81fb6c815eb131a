"""Row keys as in row room names, and how one change moves the current rows.

Kept apart from the connection logic because it is the part that depends on the sources: what a
key looks like (a Postgres composite key, a MongoDB ObjectId, a Redis key) and which operations
remove a row or empty the whole target.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Row = dict[str, Any]
Change = dict[str, Any]
KeySpec = str | Sequence[str] | Callable[[Mapping[str, Any]], Any] | None

REMOVALS = frozenset(
    {"delete", "del", "expired", "evicted", "unlink", "rename_from", "move_from", "getdel"}
)
"""Ops after which the row's key is gone (a Redis key renamed or moved away included)."""
CLEARS = frozenset({"truncate", "drop", "dropDatabase", "rename", "invalidate"})


def key_text(key: Any) -> str | None:
    """The key as in a row room name: `42`, `abc`, `7,2` for a composite key, None for none.

    The server's rule (feed.core.change.room_key; docs/protocol.md, "Row keys as text"), on
    the key's JSON form: text is itself; an array, or an object that is not one BSON value,
    its values joined by commas; `{"$oid": ..}` and `{"$numberDecimal": ..}` their text;
    numbers as JavaScript writes them (`2` for 2.0, which JSON cannot tell apart); a value
    inside a key that is an object or array as compact JSON. The same as the JavaScript
    library, so one row has one key in `rows` whichever library holds it."""
    if key is None:
        return None
    if isinstance(key, str):
        return key
    if isinstance(key, list | tuple):
        return ",".join(_scalar_text(v) for v in key)
    if isinstance(key, Mapping):
        wrapped = _wrapped_text(key)
        if wrapped is not None:
            return wrapped
        return ",".join(_scalar_text(v) for v in key.values())
    return _scalar_text(key)


_WRAPPERS = ("$oid", "$numberDecimal")


def _wrapped_text(value: Mapping[str, Any]) -> str | None:
    """The text of an extended JSON object that is one value (an ObjectId, a Decimal128)."""
    if len(value) == 1:
        for name in _WRAPPERS:
            text = value.get(name)
            if isinstance(text, str):
                return text
    return None


def _scalar_text(value: Any) -> str:
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
        return _number_text(value)
    if isinstance(value, Mapping):
        wrapped = _wrapped_text(value)
        if wrapped is not None:
            return wrapped
    return _compact_json(value)


def _number_text(value: float) -> str:
    """As JavaScript's `String(number)`: whole numbers below 1e21 as integers, others in the
    shortest text that reads back, plain from 1e-6 to 1e21, else in exponent form."""
    if value != value or value in (float("inf"), float("-inf")):
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    if value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    sign = "-" if value < 0 else ""
    text = repr(abs(value))
    mantissa, e, exponent = text.partition("e")
    if not e:
        return sign + text
    digits = mantissa.replace(".", "")
    point = int(exponent) + 1
    if -6 < point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    rest = f".{digits[1:]}" if len(digits) > 1 else ""
    return f"{sign}{digits[0]}{rest}e{'-' if point - 1 < 0 else '+'}{abs(point - 1)}"


def _compact_json(value: Any) -> str:
    """As JavaScript's `JSON.stringify`: no spaces, numbers as `String` writes them."""
    if isinstance(value, Mapping):
        members = (
            f"{json.dumps(str(k), ensure_ascii=False)}:{_compact_json(v)}" for k, v in value.items()
        )
        return "{" + ",".join(members) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_compact_json(v) for v in value) + "]"
    if isinstance(value, float):
        return _number_text(value)
    return json.dumps(value, ensure_ascii=False)


def row_key(spec: KeySpec, row: Mapping[str, Any]) -> str | None:
    """A snapshot row's key: `_id` (MongoDB), else `id`, else `key` (Redis), unless told."""
    if callable(spec):
        return key_text(spec(row))
    if isinstance(spec, str):
        return key_text(row.get(spec))
    if spec is not None:
        return ",".join(_scalar_text(row.get(f)) for f in spec)
    for field in ("_id", "id", "key"):
        if field in row:
            return key_text(row[field])
    return None


def apply(rows: dict[str, Row], change: Change) -> None:
    """Move `rows` by one change (its `left` flag: the row left the room's filter)."""
    if change.get("op") in CLEARS:
        rows.clear()
        return
    key = key_text(change.get("key"))
    if key is None:
        return
    meta = change.get("meta")
    if isinstance(meta, Mapping) and "old_key" in meta:
        # An update that changed the row's key (a Postgres primary key): the old one is gone.
        old = key_text(meta["old_key"])
        if old is not None and old != key:
            rows.pop(old, None)
    after = change.get("after")
    if change.get("op") in REMOVALS or change.get("left") is True:
        rows.pop(key, None)
    elif after is not None:
        rows[key] = after
    elif isinstance(meta, Mapping) and isinstance(meta.get("updateDescription"), Mapping):
        # A MongoDB update without the document (`full_document = "off"`): what it changed.
        if key in rows:
            rows[key] = patched(rows[key], meta["updateDescription"])
    elif change.get("before") is None:
        # A Redis event without the value: the key exists; keep what is known of it.
        rows.setdefault(key, {"key": key})
    else:
        # An image withheld by the server (the row moved out of what this identity may see).
        rows.pop(key, None)


def patched(row: Row, description: Mapping[str, Any]) -> Row:
    """A copy of `row` with a MongoDB update description applied, as the server applied it:
    arrays truncated, fields removed, then fields set (dotted paths; a number steps into an
    array, which grows with nulls as MongoDB's does)."""
    doc = copy.deepcopy(row)
    for cut in description.get("truncatedArrays") or ():
        found = _walk(doc, str(cut.get("field", "")).split("."), create=False)
        if found is not None:
            parent, last = found
            items = _child(parent, last)
            if isinstance(items, list):
                del items[int(cut.get("newSize", len(items))) :]
    for path in description.get("removedFields") or ():
        found = _walk(doc, str(path).split("."), create=False)
        if found is not None:
            parent, last = found
            if isinstance(parent, dict):
                parent.pop(last, None)
            elif isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
                parent[int(last)] = None  # MongoDB's $unset of an element leaves a null
    for path, value in (description.get("updatedFields") or {}).items():
        found = _walk(doc, str(path).split("."), create=True)
        if found is not None:
            parent, last = found
            if isinstance(parent, dict):
                parent[last] = value
            elif isinstance(parent, list) and last.isdigit():
                index = int(last)
                parent.extend([None] * (index + 1 - len(parent)))
                parent[index] = value
    return doc


def _child(parent: Any, part: str) -> Any:
    if isinstance(parent, dict):
        return parent.get(part)
    if isinstance(parent, list) and part.isdigit() and int(part) < len(parent):
        return parent[int(part)]
    return None


def _walk(doc: Row, parts: list[str], create: bool) -> tuple[Any, str] | None:
    """The container holding the path's last part, and that part (None: the path leads through
    something else than documents and arrays, or, unless `create`, through nothing)."""
    node: Any = doc
    for part in parts[:-1]:
        child = _child(node, part)
        if child is None:
            if not create or not isinstance(node, dict):
                return None
            child = node[part] = {}
        if not isinstance(child, dict | list):
            return None
        node = child
    return node, parts[-1]


def jwt_seconds_left(token: str | None) -> float | None:
    """Seconds until a JWT's `exp` (read, not verified), or None for other tokens."""
    if not token:
        return None
    parts = token.removeprefix("Bearer ").split(".")
    if len(parts) != 3:
        return None
    try:
        body = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    exp = body.get("exp") if isinstance(body, dict) else None
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        return float(exp) - time.time()
    return None
