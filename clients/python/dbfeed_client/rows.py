"""Row keys as in row room names, and how one change moves the current rows.

Kept apart from the connection logic because it is the part that depends on the sources: what a
key looks like (a Postgres composite key, a MongoDB ObjectId, a Redis key) and which operations
remove a row or empty the whole target.
"""

from __future__ import annotations

import base64
import binascii
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
    """The key as in a row room name: `42`, `abc`, `7,2` for a composite key, None for none."""
    if key is None:
        return None
    if isinstance(key, str):
        return key
    if isinstance(key, list | tuple):
        return ",".join(_scalar_text(v) for v in key)
    if isinstance(key, Mapping):
        oid = key.get("$oid")
        if isinstance(oid, str):
            return oid
        return ",".join(_scalar_text(v) for v in key.values())
    return _scalar_text(key)


def _scalar_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        oid = value.get("$oid")
        return oid if isinstance(oid, str) else json.dumps(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # JSON does not tell 1.0 from 1; the server wrote 1
    return str(value)


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
    elif change.get("before") is None:
        # A Redis event without the value: the key exists; keep what is known of it.
        rows.setdefault(key, {"key": key})
    else:
        # An image withheld by the server (the row moved out of what this identity may see).
        rows.pop(key, None)


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
