"""Redis Streams mode: XREAD from the last delivered entry id, saved in Redis, so nothing is lost.

Unlike keyspace notifications, a stream keeps its entries, so this mode gives the same promise as
the Postgres connector: every entry delivered, in order per stream, across restarts. The position
is saved in a hash (`offsets_key`, one field per stream) whenever the stream goes quiet, every
`_SAVE_EVERY` entries during a burst, and on stop; after a crash at most the entries since the last
save are delivered again, with the same ids (`<connector>:<stream>:<entry id>`), so clients drop
them. The one loss a stream can still cause is trimming (MAXLEN, XTRIM, XDEL) past a position the
feed has not read yet: that is detected at start and announced with a Gap for that stream.

Each group of streams is read by its own blocking XREAD task, and the groups are merged into one
stream of changes (entries of one stream stay in order; different streams never had a common
order). A standalone server has one group; on a Redis Cluster one XREAD can only name streams of
one hash slot, so there is a group per slot.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError, ResponseError

from connectors.base import RoomAddress, Snapshot, State
from connectors.redis_events import text_or_base64
from feed.core.change import Change, Gap
from feed.errors import FeedError, SourceMisconfigured, SourceUnavailable

if TYPE_CHECKING:
    from connectors.redis import RedisConnector

log = logging.getLogger("feed.connectors.redis")

_SAVE_EVERY = 1000


def parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class StreamCapture:
    """The streams-mode half of RedisConnector (it owns options, status and the client)."""

    def __init__(
        self, owner: RedisConnector, client: Any, groups: list[list[str]] | None = None
    ) -> None:
        self.owner = owner
        # redis-py 8's precise return types (bytes | str | None for RESP2 and RESP3) cost more
        # casts than they catch here; the connection is always RESP2 with bytes replies.
        self.client: Any = client
        self.streams = list(owner.patterns)
        self.groups = groups or [self.streams]
        """Streams one XREAD may name together: all of them, or those sharing a cluster slot."""
        self.last: dict[str, str] = {}
        self.delivered: dict[str, str] = {}
        self.saved: dict[str, str] = {}
        self.pending_gaps: list[Gap] = []
        self._progress = asyncio.Event()

    async def start(self) -> None:
        try:
            await self.client.ping()
            saved = await self.client.hmget(self.owner.offsets_key, self.streams)
            new = [s for s, raw in zip(self.streams, saved, strict=True) if raw is None]
            for stream, raw in zip(self.streams, saved, strict=True):
                if raw is not None:
                    position = raw.decode()
                    self.last[stream] = position
                    await self._check_trimmed(stream, position)
                else:
                    self.last[stream] = await self._initial(stream)
        except ResponseError as exc:
            if "WRONGTYPE" in str(exc):
                raise SourceMisconfigured(
                    f"redis at {self.owner.where}: {self.owner.offsets_key!r} or a listed stream "
                    f"has the wrong type ({exc})"
                ) from None
            raise self.owner._failure(exc) from None
        except (RedisError, OSError) as exc:
            raise self.owner._failure(exc) from None
        self.delivered = dict(self.last)
        self.saved = {s: i for s, i in self.last.items() if s not in new}
        # Pin where "latest" was on the first start, so a restart resumes from there.
        await self.save()

    async def _initial(self, stream: str) -> str:
        if self.owner.stream_start == "earliest":
            return "0-0"
        newest = await self.client.xrevrange(stream, "+", "-", count=1)
        return str(newest[0][0].decode()) if newest else "0-0"

    async def _check_trimmed(self, stream: str, position: str) -> None:
        """Queue a Gap when entries after `position` may have been trimmed or deleted unread.

        A first entry newer than the position means trimming reached it (it may have removed
        only entries already delivered: a harmless extra reload); Redis 7 also records the
        highest id removed by XDEL.
        """
        try:
            info = await self.client.xinfo_stream(stream)
        except ResponseError:  # no such stream (never created, or deleted whole)
            if position != "0-0":
                self.pending_gaps.append(
                    Gap(self.owner.name, f"stream {stream!r} no longer exists", target=stream)
                )
            return
        deleted = info.get("max-deleted-entry-id")  # Redis >= 7, counts XDEL only
        first = info.get("first-entry")
        lost = deleted is not None and parse_id(_text(deleted)) > parse_id(position)
        if position != "0-0" and first is not None:
            lost = lost or parse_id(_text(first[0])) > parse_id(position)
        if lost:
            self.pending_gaps.append(
                Gap(
                    self.owner.name,
                    f"stream {stream!r} was trimmed past the saved position {position}",
                    target=stream,
                )
            )

    async def stop(self) -> None:
        with contextlib.suppress(RedisError, OSError, FeedError):
            await self.save()

    async def save(self) -> None:
        changed = {s: i for s, i in self.delivered.items() if self.saved.get(s) != i}
        if changed:
            await self.owner.settle()  # in a cluster: published first (connectors.base)
            await self.client.hset(self.owner.offsets_key, mapping=changed)
            self.saved.update(changed)

    async def changes(self) -> AsyncIterator[Change | Gap]:
        """Entries as they are read: one reader task per group of streams (one group on a
        standalone server; one per hash slot on a cluster), merged as they come.

        Positions are saved when the readers have nothing waiting, every `_SAVE_EVERY` entries,
        and on stop.
        """
        for gap in self.pending_gaps:
            yield gap
        self.pending_gaps = []
        arrived: asyncio.Queue[tuple[Any, list[Any]] | BaseException] = asyncio.Queue(
            maxsize=2 * len(self.groups)  # readers wait while the hub is behind
        )
        readers = [
            asyncio.create_task(self._read_group(group, arrived), name=f"xread:{group[0]}")
            for group in self.groups
        ]
        since_save = 0
        try:
            while True:
                if since_save and arrived.empty():
                    await self.save()
                    since_save = 0
                item = await arrived.get()
                if isinstance(item, BaseException):
                    raise item
                raw_stream, entries = item
                stream = _text(raw_stream)
                for raw_id, fields in entries:
                    entry_id = _text(raw_id)
                    yield self.change(stream, entry_id, fields)
                    # Asked for the next item: the hub has routed this entry.
                    self.delivered[stream] = entry_id
                    self._progress.set()
                    since_save += 1
                    if since_save >= _SAVE_EVERY:
                        await self.save()
                        since_save = 0
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)

    async def _read_group(
        self, group: list[str], arrived: asyncio.Queue[tuple[Any, list[Any]] | BaseException]
    ) -> None:
        """XREAD one group of streams forever; a failure that outlasts `reconnect_timeout` goes to
        the consumer, which ends the stream for the hub to restart (positions are saved)."""
        owner = self.owner
        block = max(1, int(owner.health_check_interval * 1000))
        delay = 0.05
        while True:
            try:
                wanted = {stream: self.last[stream] for stream in group}
                reply = await self.client.xread(wanted, count=owner.stream_batch, block=block)
                me = asyncio.current_task()
                if me is not None and me.cancelling():
                    # redis-py can swallow a cancel that lands as its reply arrives; without
                    # this check a cancelled reader would go on polling forever.
                    raise asyncio.CancelledError
                delay = 0.05
                owner.set_status(State.UP)
            except (RedisError, OSError) as exc:
                failure = owner._failure(exc)
                if not isinstance(failure, SourceUnavailable) or delay > owner.reconnect_timeout:
                    await arrived.put(failure)
                    return
                owner.set_status(State.DOWN, str(failure))
                await asyncio.sleep(delay)
                delay *= 2
                continue
            for raw_stream, entries in reply or []:
                if entries:
                    self.last[_text(raw_stream)] = _text(entries[-1][0])
                    await arrived.put((raw_stream, entries))

    def change(self, stream: str, entry_id: str, fields: Mapping[bytes, bytes]) -> Change:
        fields_read, b64 = _fields(fields)
        ms, _ = parse_id(entry_id)
        op = entry_op(fields, self.owner.stream_op_field)
        key, key_b64 = entry_key(entry_id, fields, self.owner.stream_key_field)
        meta: dict[str, Any] | None = None
        if b64 or key_b64:
            meta = {}
            if b64:
                meta["value_base64"] = True
            if key_b64:
                meta["key_base64"] = True
        return Change(
            id=f"{self.owner.name}:{stream}:{entry_id}",
            connector=self.owner.name,
            source="redis",
            target=stream,
            op=op,
            key=key,
            after=None if op == "delete" else _row(entry_id, fields_read, b64),
            ts=dt.datetime.fromtimestamp(ms / 1000, dt.UTC),
            meta=meta,
            position=(stream, parse_id(entry_id)),
        )

    async def snapshot(
        self, address: RoomAddress, where: Callable[[Mapping[str, Any]], bool], limit: int
    ) -> Snapshot:
        """The stream's newest `limit` entries (or one entry), exact: `covers` knows which
        delivered changes they include, because entry ids are positions."""
        stream = address.target
        key_field = self.owner.stream_key_field
        try:
            if key_field:
                entries, truncated = await self._latest_per_key(stream, key_field, address, limit)
            elif address.key is not None:
                try:
                    entries = await self.client.xrange(stream, address.key, address.key)
                except ResponseError:  # not an entry id at all: no such row
                    entries = []
                truncated = False
            else:
                entries = list(reversed(await self.client.xrevrange(stream, count=limit + 1)))
                truncated = len(entries) > limit
                entries = entries[-limit:]
        except (RedisError, OSError) as exc:
            raise self.owner._failure(exc) from None
        high = max((parse_id(_text(e[0])) for e in entries), default=(0, 0))
        # Honour the Snapshot contract: wait until every entry in the rows has been routed.
        async with asyncio.timeout(10):
            while parse_id(self.delivered.get(stream, "0-0")) < high:
                self._progress.clear()
                await self._progress.wait()
        rows = []
        keys: list[str | None] = []
        for raw_id, fields in entries:
            after, b64 = _fields(fields)
            entry_id = _text(raw_id)
            row = _row(entry_id, after, b64)
            if where(row):
                rows.append(row)
                # The key its changes carry (`change` above), read the same way.
                keys.append(entry_key(entry_id, fields, key_field)[0])
        return Snapshot(
            rows=rows,
            covers=lambda c: (
                c.target == stream and isinstance(c.position, tuple) and c.position[1] <= high
            ),
            truncated=truncated,
            keys=keys,
        )

    async def _latest_per_key(
        self, stream: str, key_field: str, address: RoomAddress, limit: int
    ) -> tuple[list[Any], bool]:
        """With `key_field` a stream is a changelog: its current rows are the newest entry per
        key among the newest `snapshot_scan_limit` entries (oldest key first)."""
        scan = self.owner.snapshot_scan_limit
        newest = await self.client.xrevrange(stream, count=scan)
        wanted = key_field.encode()
        op_field = self.owner.stream_op_field
        latest: dict[bytes, Any] = {}
        for entry in newest:
            key = entry[1].get(wanted, entry[0])
            # A row room names the key as changes carry it (base64 when it is not UTF-8).
            if address.key is not None and text_or_base64(key)[0] != address.key:
                continue
            latest.setdefault(key, entry)
        # A row whose newest entry deletes it is not a current row.
        rows = [e for e in reversed(latest.values()) if entry_op(e[1], op_field) != "delete"]
        truncated = len(rows) > limit or len(newest) >= scan
        return rows[-limit:], truncated


OPS = {
    b"insert": "insert",
    b"create": "insert",
    b"c": "insert",
    b"r": "insert",
    b"update": "update",
    b"u": "update",
    b"delete": "delete",
    b"d": "delete",
}
"""An `op_field` value, any case, as the change's op (Debezium's c, r, u, d included)."""


def entry_op(fields: Mapping[bytes, bytes], op_field: str | None) -> str:
    """The op of an entry: its `op_field` (`delete` ends the row), else `xadd`; a value not in
    `OPS` is passed on as it is, and clients keep the row."""
    if op_field is None:
        return "xadd"
    raw = fields.get(op_field.encode())
    if raw is None:
        return "xadd"
    known = OPS.get(raw.lower())
    if known is not None:
        return known
    return raw.decode("utf-8", "replace")


def entry_key(
    entry_id: str, fields: Mapping[bytes, bytes], key_field: str | None
) -> tuple[str, bool]:
    """The row an entry changes, and whether that key is base64: the `key_field` value, read
    from the raw fields (text, or base64 when it is not UTF-8), else the entry id.

    Read from the raw fields because `_fields` renders every name base64 as soon as any field
    is not UTF-8: looked up there, the key field of such an entry was not found and the entry
    was keyed by its id, a row of its own that no later entry of the key updated or deleted.
    """
    if key_field is None:
        return entry_id, False
    raw = fields.get(key_field.encode())
    if raw is None:
        return entry_id, False
    return text_or_base64(raw)


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _fields(fields: Mapping[bytes, bytes]) -> tuple[dict[str, str], bool]:
    """Field names and values as text, or all base64 when any is not UTF-8.

    A text name that `_row` uses for itself is moved aside (`_name`); base64 names never are
    (base64 has no `_`).
    """
    try:
        return {
            (_name(k.decode()) if k[:1] == b"_" else k.decode()): v.decode()
            for k, v in fields.items()
        }, False
    except UnicodeDecodeError:
        return {_b64(k): _b64(v) for k, v in fields.items()}, True


_RESERVED = ("id", "base64")


def _name(name: str) -> str:
    """A field name as a row's key: `_id` and `_base64`, and those names behind more
    underscores, get one more underscore in front (`_id` -> `__id`, `__id` -> `___id`).

    The row's own `_id` (the entry id) and `_base64` flag must win, or a field named `_id`
    silently passed itself off as the entry id (in filters, and to clients keying rows by
    `_id`); one more underscore keeps the field, under a name no other field can have.
    """
    return "_" + name if name.lstrip("_") in _RESERVED else name


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _row(entry_id: str, fields: dict[str, Any], b64: bool) -> dict[str, Any]:
    """An entry as a row, the same in a change's `after` and in a snapshot: its id as `_id`,
    then its fields (and `_base64` when they are base64; `_fields` has moved any field named
    `_id` or `_base64` aside). A live row used to lack `_id`, so a client's rows differed by
    where they came from, and a filter on `_id` matched snapshot rows only."""
    row: dict[str, Any] = {"_id": entry_id, **fields}
    if b64:
        row["_base64"] = True
    return row
