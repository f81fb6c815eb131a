"""Snapshots in bounded chunks: the rows of one snapshot split by their JSON size.

A snapshot used to travel whole in the subscribe ack. With the default `snapshot_limit` of 1,000
rows and 5 KB rows that ack was 5 MB: more than python-socketio's client takes in one websocket
frame (aiohttp's 4 MB limit), more than a long-polling response should carry, and, past the
outbound limit, a reason to cut off a client that was reading. So the ack carries the first chunk
and says how many there are (`snapshot_chunks`); the rest follow as `snapshot` events, to that
client only, before any change for the room (docs/protocol.md, "Snapshots").

Sizes are measured once per row, with the encoder the transport uses, so a chunk's frame is about
`snapshot_chunk_bytes` of rows plus a little framing; a single row larger than that goes alone.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Sequence
from typing import Any

from feed.core.change import format_ts

_json_size: Callable[[Any], int]
try:
    import orjson

    def _orjson_size(value: Any) -> int:
        return len(orjson.dumps(value))

    _json_size = _orjson_size
except ImportError:  # pragma: no cover

    def _stdlib_size(value: Any) -> int:
        return len(json.dumps(value, separators=(",", ":")).encode())

    _json_size = _stdlib_size


def json_size(value: Any) -> int:
    """Bytes of `value` as JSON; rows that orjson refuses (huge integers) are measured by json."""
    try:
        return _json_size(value)
    except TypeError:
        return len(json.dumps(value, separators=(",", ":"), default=str).encode())


def split_rows(rows: Sequence[Any], max_bytes: int) -> list[list[Any]]:
    """Consecutive chunks of `rows`, each at most `max_bytes` of JSON unless one row is larger.

    Always at least one chunk (an empty snapshot is one empty chunk), so concatenating the
    chunks in order gives back `rows` exactly.
    """
    chunks: list[list[Any]] = [[]]
    size = 0
    for row in rows:
        row_size = json_size(row) + 1  # the comma between rows
        if chunks[-1] and size + row_size > max_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(row)
        size += row_size
    return chunks


RowGuard = Callable[[Any], Any]
SnapshotChunk = tuple[list[Any], list[str | None] | None]
"""One frame's rows and their keys (None: the connector did not say)."""


def visible(
    rows: Sequence[Any], keys: Sequence[str | None] | None, mask: RowGuard | None
) -> tuple[list[Any], list[str | None] | None]:
    """The rows a client may see (`mask` hides some, or some columns) and their keys, still
    paired: a hidden row takes its key with it."""
    if keys is not None and len(keys) != len(rows):
        keys = None  # a connector's bug: better no keys than keys of other rows
    if mask is None:
        return list(rows), (list(keys) if keys is not None else None)
    shown: list[Any] = []
    shown_keys: list[str | None] = []
    for index, row in enumerate(rows):
        image = mask(row)
        if image is None:
            continue
        shown.append(image)
        if keys is not None:
            shown_keys.append(keys[index])
    return shown, (shown_keys if keys is not None else None)


def split_snapshot(
    rows: Sequence[Any], keys: Sequence[str | None] | None, max_bytes: int
) -> list[SnapshotChunk]:
    """`split_rows`, with each chunk's keys beside its rows (None when the keys are unknown):
    the ack carries the first pair (`snapshot`, `snapshot_keys`), each `snapshot` event one more
    (`rows`, `keys`)."""
    chunks = split_rows(rows, max_bytes)
    if keys is None:
        return [(chunk, None) for chunk in chunks]
    paired: list[SnapshotChunk] = []
    start = 0
    for chunk in chunks:
        paired.append((chunk, list(keys[start : start + len(chunk)])))
        start += len(chunk)
    return paired


def chunk_event(room: str, index: int, total: int, chunk: SnapshotChunk) -> dict[str, Any]:
    """The body of the `snapshot` event carrying chunk `index` of `total` (docs/protocol.md)."""
    rows, keys = chunk
    body: dict[str, Any] = {"room": room, "chunk": index, "of": total, "rows": rows}
    if keys is not None:
        body["keys"] = keys
    return body


def gap_event(
    connector: str, room: str, target: str, reason: str, seq: int, epoch: str | None
) -> dict[str, Any]:
    """The body of a `gap` sent to one new member during its catch-up (docs/protocol.md).

    It carries every field of a `gap` sent to a room, `ts` included (the time it is announced
    to this member): a client reading `gap.ts` got nothing from these before.
    """
    return {
        "connector": connector,
        "room": room,
        "target": target,
        "reason": reason,
        "seq": seq,
        "epoch": epoch,
        "ts": format_ts(dt.datetime.now(dt.UTC)),
    }


def snapshot_ack(
    rows: Sequence[Any],
    keys: Sequence[str | None] | None,
    mask: RowGuard | None,
    truncated: bool,
    max_bytes: int,
    encode: Callable[[Any], Any] | None = None,
) -> tuple[dict[str, Any], list[SnapshotChunk]]:
    """The snapshot fields of a subscribe ack, and the chunks that follow it as `snapshot` events.

    The hub (rows from its own connector) and the cluster engine (rows a reading node sent over
    Redis) answer a subscribe the same way, so the ack is built here once: the rows the client
    may see, each passed through `encode` (the hub turns source values into JSON only after the
    mask has seen them), split by size; the ack gets the first chunk (`snapshot`,
    `snapshot_keys`), `snapshot_truncated` and `snapshot_chunks` (docs/protocol.md, "Snapshots").
    """
    shown, shown_keys = visible(rows, keys, mask)
    if encode is not None:
        shown = [encode(row) for row in shown]
    (first, first_keys), *rest = split_snapshot(shown, shown_keys, max_bytes)
    fields: dict[str, Any] = {"snapshot": first}
    if first_keys is not None:
        fields["snapshot_keys"] = first_keys
    fields["snapshot_truncated"] = truncated
    fields["snapshot_chunks"] = 1 + len(rest)
    return fields, rest
