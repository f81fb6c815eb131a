"""Redis Streams mode: XREAD from the last delivered entry id, saved in Redis, so nothing is lost.

Unlike keyspace notifications, a stream keeps its entries, so this mode gives the same promise as
the Postgres connector: every entry delivered, in order per stream, across restarts. The position
is saved in a hash (`offsets_key`, one field per stream) whenever the stream goes quiet, every
`_SAVE_EVERY` entries during a burst, and on stop; after a crash at most the entries since the last
save are delivered again, with the same ids (`<connector>:<stream>:<entry id>`), so clients drop
them. The one loss a stream can still cause is removal (MAXLEN, MINID, XTRIM, XDEL, DEL) of
entries the feed has not read yet: that is detected at start and while reading (`_read`, `judge`)
and announced with a Gap for that stream; a stream deleted is read again from its start.

Each group of streams is read by its own blocking XREAD task, and the groups are merged into one
stream of changes (entries of one stream stay in order; different streams never had a common
order). A standalone server has one group; on a Redis Cluster one XREAD can only name streams of
one hash slot, so there is a group per slot.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.exceptions import ReadOnlyError, RedisError, ResponseError

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


_START = "0-0"
"""The position before every entry: a stream not read yet, or one read again from its start."""


@dataclass(frozen=True)
class StreamInfo:
    """What XINFO STREAM says about a stream, as the loss checks read it.

    Redis 7 adds `entries-added` (every entry the stream was ever given) and
    `max-deleted-entry-id` (the highest id XDEL removed); Redis 6.2 has neither, and its checks
    are cruder (see `judge`).
    """

    length: int
    first: tuple[int, int] | None
    last_generated: tuple[int, int]
    added: int | None
    max_deleted: tuple[int, int] | None

    @classmethod
    def of(cls, reply: Mapping[str, Any]) -> StreamInfo:
        first = reply.get("first-entry")
        added = reply.get("entries-added")
        deleted = reply.get("max-deleted-entry-id")
        return cls(
            length=int(reply.get("length") or 0),
            first=parse_id(_text(first[0])) if first else None,
            last_generated=parse_id(_text(reply.get("last-generated-id") or _START)),
            added=int(added) if added is not None else None,
            max_deleted=parse_id(_text(deleted)) if deleted is not None else None,
        )

    def first_offset(self) -> int | None:
        """The first entry's number in the stream's history (1 for the first ever added; the
        next one's for an empty stream), when Redis 7 can tell: not after an XDEL at or past
        the first entry, which leaves holes the count cannot see (Redis's own rule for a
        consumer group's lag)."""
        if self.added is None:
            return None
        deleted, first = self.max_deleted, self.first
        if first is not None and deleted is not None and deleted >= first:
            return None
        return self.added - self.length + 1


@dataclass(frozen=True)
class Verdict:
    """What became of a stream whose entry read last is gone (`judge`)."""

    lost: str | None
    """A gap's reason, when entries the feed had not read may be gone."""
    reset: bool = False
    """The stream was deleted (and maybe created again): read it again from its start."""
    counted: int | None = None
    """The number (in the stream's history) of the entry the reader is at now, if known."""


def judge(
    stream: str,
    prev: tuple[int, int],
    ids: list[tuple[int, int]],
    counted: int | None,
    info: StreamInfo | None,
) -> Verdict:
    """The entry at `prev`, read last, was gone when the feed looked after reading `ids` (the
    entries after it): were entries the feed never read removed too?

    `counted` is prev's number in the stream's history (Redis 7's `entries-added` at the time
    prev was added), kept by counting what the reader reads. Trimming (MAXLEN, MINID, XTRIM)
    removes the oldest entries, so with the first entry left and Redis 7's count the answer is
    exact: a stream kept at MAXLEN 1 and read entry by entry loses nothing and gets no gap. Redis
    6.2 keeps no count: there a trim past prev is a gap unless nothing was ever added after it,
    and prev gone with older entries left is a gap too, without a reset: an XDEL of prev (no
    loss) and a stream deleted and created again with lower ids (its entries below prev never
    read) look the same there, and only the second would be worth reading the stream again
    from its start; the gap's reload shows the new stream's rows either way.
    """
    last = ids[-1] if ids else prev
    read = len(ids)
    if info is None:
        return Verdict(f"stream {stream!r} was deleted", reset=True, counted=0)
    recreated = info.last_generated < last or (
        info.added is not None and counted is not None and info.added < counted + read
    )
    if info.first is not None and info.first <= prev:
        # Trimming did not reach prev. On Redis 7 an XDEL would have left its id in
        # max-deleted-entry-id; without one, prev went with the stream itself.
        recreated = recreated or (info.max_deleted is not None and info.max_deleted < prev)
    if recreated:
        return Verdict(f"stream {stream!r} was deleted and created again", reset=True)
    if info.first is not None and info.first <= prev:
        deleted = info.max_deleted
        if info.added is None:  # Redis 6.2
            return Verdict(
                f"stream {stream!r} lost the entry read last ({_id(prev)}) but has older ones: "
                "deleted with XDEL, or deleted and created again (Redis 6.2 cannot tell)"
            )
        if deleted is not None and deleted > prev and deleted not in ids:
            return Verdict(f"entries of stream {stream!r} were deleted (XDEL) before being read")
        return Verdict(None, counted=None if counted is None else counted + read)
    # Trimming passed prev: were entries the feed had not read among those trimmed?
    below = read if info.first is None else bisect.bisect_left(ids, info.first)
    offset = info.first_offset()
    after = None if offset is None else offset - 1 + read - below
    if counted is not None and offset is not None:
        missed = offset - (counted + below + 1)
        if missed <= 0:
            return Verdict(None, counted=after)
        return Verdict(
            f"stream {stream!r} was trimmed past {_entries(missed)} not read yet", counted=after
        )
    if info.first is None and info.last_generated == prev and not ids:
        return Verdict(None, counted=after)  # emptied, and nothing was added after prev
    return Verdict(
        f"stream {stream!r} was trimmed past the entry read last ({_id(prev)}): "
        "entries not read yet may be gone",
        counted=after,
    )


@dataclass
class _Lost:
    """A reader's news for one stream, in order with its entries: a gap, maybe a reset."""

    stream: str
    gap: Gap
    reset: bool


_Arrival = tuple[str, list[Any]] | _Lost | BaseException


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
        self.pending_gaps: list[tuple[Gap, str]] = []
        """Found at start, with their `feed_capture_faults_total` kinds."""
        self.tail: dict[str, Mapping[bytes, bytes]] = {}
        """The fields of the entry at `last`, when the reader read it: a stream deleted and
        created again can hold a new entry under that very id (an automatic id in the same
        millisecond), which only its fields tell apart."""
        self.judged: dict[str, tuple[str, tuple[int, int], tuple[int, int] | None] | None] = {}
        """Each stream's position, last id and first id when `judge` last looked at it: while
        the entry read last stays gone and nothing changes, one gap says it, not every read."""
        self.counted: dict[str, int | None] = {}
        """Each stream's number (Redis 7 `entries-added`) of the entry at `last`, if known."""
        self.counters: bool | None = None
        """Whether the server keeps `entries-added` (Redis 7): seen in its first XINFO reply."""
        self.wrong_type: dict[str, str] = {}
        """Listed keys that hold something other than a stream (key -> its type): not read,
        and named in the status, until they are a stream again (or gone)."""
        self._progress = asyncio.Event()
        self._verified: dict[str, float] = {}
        """When each group (by its first stream) last checked Redis 7's counts."""

    async def start(self) -> None:
        try:
            await self.client.ping()
            saved = await self.client.hmget(self.owner.offsets_key, self.streams)
        except ResponseError as exc:
            if "WRONGTYPE" in str(exc):
                raise SourceMisconfigured(
                    f"redis at {self.owner.where}: offsets_key {self.owner.offsets_key!r} is "
                    "not a hash; delete it, or set offsets_key to a key of the feed's own"
                ) from None
            raise self.owner._failure(exc) from None
        except (RedisError, OSError) as exc:
            raise self.owner._failure(exc) from None
        in_redis = {
            s: raw.decode() for s, raw in zip(self.streams, saved, strict=True) if raw is not None
        }
        positions, recalled = self._recall(in_redis)
        try:
            for stream in self.streams:
                await self._place(stream, positions.get(stream), recalled=stream in recalled)
        except (RedisError, OSError) as exc:
            raise self.owner._failure(exc) from None
        self.delivered = dict(self.last)
        # A position moved back to a stream's start (deleted meanwhile), or one this process
        # remembered and Redis lost, is saved below.
        self.saved = in_redis
        # Pin where "latest" was on the first start, so a restart resumes from there.
        await self.save()
        now = asyncio.get_running_loop().time()
        self._verified = {group[0]: now for group in self.groups}

    def _recall(self, in_redis: Mapping[str, str]) -> tuple[dict[str, str], set[str]]:
        """The positions to resume from: Redis's, except where this process delivered and
        saved further before (a restart by the hub) and Redis's are missing or behind.

        A Redis restarted without persistence loses `offsets_key` with the streams: read as a
        first start, `start = "latest"` skipped in silence what was written since Redis came
        back, and clients kept rows of entries that no longer exist. A Redis restarted from an
        older snapshot (RDB, `appendfsync everysec`) brings back older positions, and clients
        kept entries the stream lost. Resuming from the position remembered lets `_place` judge
        the stream against it: gone, created again or trimmed past it, each a gap. (A feed
        process started anew remembers nothing: see docs/connectors/redis.md.)
        """
        positions = dict(in_redis)
        recalled: set[str] = set()
        for stream, known in self.owner.stream_positions.items():
            there = in_redis.get(stream)
            if stream in self.streams and (there is None or parse_id(there) < parse_id(known)):
                positions[stream] = known
                recalled.add(stream)
                log.warning(
                    "redis at %s: offsets_key %r has %s for stream %r, behind the position %s "
                    "this process saved: Redis lost data (a restart without persistence, or "
                    "from an older snapshot), or the key was changed; resuming from %s",
                    self.owner.where,
                    self.owner.offsets_key,
                    "no position" if there is None else there,
                    stream,
                    known,
                    known,
                )
        return positions, recalled

    async def _place(self, stream: str, position: str | None, recalled: bool = False) -> None:
        """Where to read `stream` from: the saved position, or (first start) `start`; a Gap
        queued when entries after the saved position were lost while the feed was stopped.
        `recalled`: the position is this process's own, which Redis had lost (`_recall`).

        A first entry newer than the position means trimming reached it (it may have removed
        only entries already delivered: a harmless extra reload); Redis 7 also records the
        highest id removed by XDEL. A stream deleted, or created again with lower ids (its
        last id below the position), is read again from its start.
        """
        try:
            info: StreamInfo | None = StreamInfo.of(await self.client.xinfo_stream(stream))
        except ResponseError as exc:
            if not _wrong_type(exc):  # no such key: never created, or deleted whole
                info = None
            else:
                kind = _text(await self.client.type(stream))
                aside = self._set_aside(stream, kind, announce=position not in (None, _START))
                if aside is not None:
                    self.pending_gaps.append((aside, "stream_lost"))
                return
        if info is not None:
            self.counters = info.added is not None
        if position is None:  # first start
            if info is None:
                self.last[stream], self.counted[stream] = _START, 0
            elif self.owner.stream_start == "earliest":
                offset = info.first_offset()
                self.last[stream] = _START
                self.counted[stream] = None if offset is None else offset - 1
            else:
                self.last[stream] = _id(info.last_generated)
                self.counted[stream] = info.added
            return
        at = parse_id(position)
        reason, kind = None, "stream_lost"
        if info is None:
            if position != _START:
                reason = f"stream {stream!r} no longer exists"
            self.last[stream], self.counted[stream] = _START, 0
        elif info.last_generated < at:
            reason = f"stream {stream!r} was deleted and created again"
            self.last[stream], self.counted[stream] = _START, None
        else:
            self.last[stream] = position
            self.counted[stream] = info.added if info.last_generated == at else None
            deleted = info.max_deleted  # Redis >= 7, counts XDEL only
            lost = deleted is not None and deleted > at
            if position != _START and info.first is not None and info.first > at:
                lost = True
                offset = info.first_offset()
                self.counted[stream] = None if offset is None else offset - 1
            if lost:
                reason = f"stream {stream!r} was trimmed past the saved position {position}"
                kind = "stream_trimmed"
        if reason is not None:
            if recalled:
                reason += (
                    f" (and offsets_key {self.owner.offsets_key!r} had lost its position: "
                    "Redis restarted without its data, or from an older snapshot)"
                )
            self.pending_gaps.append((Gap(self.owner.name, reason, target=stream), kind))

    async def try_reads(self) -> None:
        """Make each read `serve` makes and `start` does not (XREAD, XRANGE, XREVRANGE) once,
        reading nothing, so `feed check` finds a user refused one: it said ok, and `serve`
        then stopped at its first read."""
        for group in self.groups:
            pipe = self.client.pipeline(transaction=False)
            pipe.xread(dict.fromkeys(group, "$"), count=1)  # no BLOCK: answered at once
            for stream in group:
                pipe.xrange(stream, "+", "+")
                pipe.xrevrange(stream, count=1)
            for reply in await pipe.execute(raise_on_error=False):
                if isinstance(reply, Exception):  # redis-py's own, not its pipeline wrapping
                    raise reply

    def _set_aside(self, stream: str, kind: str, announce: bool) -> Gap | None:
        """Stop reading a listed key that is not a stream (the others go on): the status line
        (`trouble`, logged by the hub as the status changes) names it, and a Gap tells its rooms
        their rows went with the stream it was."""
        self.wrong_type[stream] = kind
        self.last[stream], self.counted[stream] = _START, 0
        if not announce:
            return None
        reason = f"stream {stream!r} was replaced by a {kind}, which is not a stream"
        return Gap(self.owner.name, reason, target=stream)

    def trouble(self) -> str:
        """The status line while listed keys are not streams ('' when all are)."""
        if not self.wrong_type:
            return ""
        keys = ", ".join(f"{k!r} holds a {t}" for k, t in self.wrong_type.items())
        return (
            f"redis at {self.owner.where}: not a stream: {keys}; it is not read until it is a "
            "stream again (delete it, or take it out of patterns)"
        )

    def health(self) -> tuple[State, str]:
        trouble = self.trouble()
        return (State.DOWN, trouble) if trouble else (State.UP, "")

    async def stop(self) -> None:
        with contextlib.suppress(RedisError, OSError, FeedError):
            await self.save(everything=True)

    async def save(self, everything: bool = False) -> None:
        """Write the positions to `offsets_key` when any moved since the last save (with
        `everything`, at stop, even when none did)."""
        changed = dict(self.delivered) if everything else self._unsaved()
        if changed:
            await self.owner.settle()  # in a cluster: published first (connectors.base)
            await self._write(changed)

    def _unsaved(self) -> dict[str, str]:
        """Every stream's position when any moved since the last save, else nothing.

        All of them, not only the ones that moved: `offsets_key` can vanish while the feed runs
        (evicted under an `allkeys-*` maxmemory policy, deleted, expired), and a save of the
        moved ones alone left the others out of it, so the next start of the feed took them for
        new streams and `start = "latest"` skipped what was written meanwhile, in silence. One
        HSET of a field per listed stream costs no more round trips.
        """
        if any(self.saved.get(s) != i for s, i in self.delivered.items()):
            return dict(self.delivered)
        return {}

    async def _write(self, changed: Mapping[str, str]) -> None:
        """HSET the positions; a failure is one line (a ConnectorError), never redis-py's
        exception, which the hub logged as a crash with its traceback at every retry."""
        try:
            await self.client.hset(self.owner.offsets_key, mapping=dict(changed))
        except ReadOnlyError:
            raise SourceMisconfigured(
                f"redis at {self.owner.where} is a read-only replica: streams mode saves its "
                f"positions in offsets_key {self.owner.offsets_key!r}; point url at the primary"
            ) from None
        except (RedisError, OSError) as exc:
            failure = self.owner._failure(exc)
            text = str(failure).removeprefix(f"redis at {self.owner.where}: ")
            raise type(failure)(
                f"redis at {self.owner.where}: cannot save positions in offsets_key "
                f"{self.owner.offsets_key!r}: {text}"
            ) from None
        self.saved.update(changed)
        self.owner.stream_positions.update(changed)

    async def changes(self) -> AsyncIterator[Change | Gap]:
        """Entries as they are read: one reader task per group of streams (one group on a
        standalone server; one per hash slot on a cluster), merged as they come.

        Positions are saved when the readers have nothing waiting, every `_SAVE_EVERY` entries,
        and on stop.
        """
        for gap, kind in self.pending_gaps:
            self.owner.count_fault(kind)
            yield gap
        self.pending_gaps = []
        arrived: asyncio.Queue[_Arrival] = asyncio.Queue(
            maxsize=2 * len(self.groups)  # readers wait while the hub is behind
        )
        readers = [
            asyncio.create_task(self._read_group(group, arrived), name=f"xread:{group[0]}")
            for group in self.groups
        ]
        since_save = 0
        try:
            while True:
                if since_save and arrived.empty() and await self._saved():
                    since_save = 0
                item = await arrived.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, _Lost):
                    # Counted as handed on: a loss can be judged more than once before.
                    if item.reset:
                        self.owner.count_fault("stream_lost")
                    else:
                        self.owner.count_fault("stream_trimmed")
                    yield item.gap
                    if item.reset:  # saved too: a restart reads the new stream from its start
                        self.delivered[item.stream] = _START
                        since_save += 1
                    continue
                stream, entries = item
                for raw_id, fields in entries:
                    entry_id = _text(raw_id)
                    yield self.change(stream, entry_id, fields)
                    # Asked for the next item: the hub has routed this entry.
                    self.delivered[stream] = entry_id
                    self._progress.set()
                    since_save += 1
                    if since_save >= _SAVE_EVERY and await self._saved():
                        since_save = 0
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)

    async def _saved(self) -> bool:
        """Save the positions while reading. A lost connection only means "not yet": the
        readers report it (they retry for `reconnect_timeout`) and the next save tries again;
        it used to end the stream with redis-py's exception, a crash with a traceback."""
        changed = self._unsaved()
        if changed:
            await self.owner.settle()
            try:
                await self._write(changed)
            except SourceUnavailable as exc:
                log.debug("connector %s: %s; saving again later", self.owner.name, exc)
                return False
        return True

    async def _read_group(self, group: list[str], arrived: asyncio.Queue[_Arrival]) -> None:
        """XREAD one group of streams forever; a failure that outlasts `reconnect_timeout` goes to
        the consumer, which ends the stream for the hub to restart (positions are saved)."""
        owner = self.owner
        block = max(1, int(owner.health_check_interval * 1000))
        delay = 0.05
        while True:
            try:
                news = await self._read(group, block)
                me = asyncio.current_task()
                if me is not None and me.cancelling():
                    # redis-py can swallow a cancel that lands as its reply arrives; without
                    # this check a cancelled reader would go on polling forever.
                    raise asyncio.CancelledError
                delay = 0.05
                owner.set_status(*self.health())
            except (RedisError, OSError) as exc:
                failure = owner._failure(exc)
                if not isinstance(failure, SourceUnavailable) or delay > owner.reconnect_timeout:
                    await arrived.put(failure)
                    return
                owner.set_status(State.DOWN, str(failure))
                owner.count_restart()
                await asyncio.sleep(delay)
                delay *= 2
                continue
            for item in news:
                await arrived.put(item)

    async def _read(self, group: list[str], block: int) -> list[_Arrival]:
        """One read of a group: its new entries, each stream's checked for what the read
        cannot show by itself, in one round trip.

        XREAD skips silently over entries that are gone, so with it (same pipeline, after it)
        goes an XRANGE of each stream's last entry read: while that entry is there, trimming
        (which removes the oldest entries) cannot have removed a newer one. Only when it is
        gone does a second round trip ask XINFO what happened (`judge`): trimmed past entries
        not read yet, deleted, or created again. Redis 7's count of entries is anchored with an
        XINFO of its own (once, or again after a reset) and then checked once every
        `capture_check_interval` while the reader is caught up, which also finds entries removed
        by XDEL before the feed read them. Listed keys that are not streams are left out of the
        XREAD (it would fail for every stream) and asked their TYPE until they are streams.
        """
        owner = self.owner
        reading = [s for s in group if s not in self.wrong_type]
        aside = [s for s in group if s in self.wrong_type]
        now = asyncio.get_running_loop().time()
        verify = now - self._verified.get(group[0], now) >= owner.capture_check_interval
        if verify:
            self._verified[group[0]] = now
        pipe = self.client.pipeline(transaction=False)
        if reading:
            wanted = {s: self.last[s] for s in reading}
            pipe.xread(wanted, count=owner.stream_batch, block=block)
        placed = [s for s in reading if self.last[s] != _START]
        for stream in placed:
            pipe.xrange(stream, self.last[stream], self.last[stream])
        asked = [
            s
            for s in reading
            if self.counters is not False and (verify or self.counted.get(s) is None)
        ]
        for stream in asked:
            pipe.xinfo_stream(stream)
        for stream in aside:
            pipe.type(stream)
        if not reading and not aside:
            return []
        replies = list(await pipe.execute(raise_on_error=False))
        news: list[_Arrival] = []
        for stream in aside:
            kind = _text(replies[len(replies) - len(aside) + aside.index(stream)])
            if kind in ("stream", "none"):  # read from its start: what it holds is new
                del self.wrong_type[stream]  # the status says so: up again, or the others
                self.last[stream], self.counted[stream] = _START, None
        if not reading:
            if self.wrong_type.keys() & set(aside):
                await asyncio.sleep(block / 1000)  # nothing else to wait on
            return news
        got, replies = replies[0], replies[1:]
        if isinstance(got, ResponseError):
            if not _wrong_type(got):
                raise got
            return await self._find_wrong_type(reading)
        present = dict(zip(placed, replies[: len(placed)], strict=True))
        infos = dict(zip(asked, replies[len(placed) : len(placed) + len(asked)], strict=True))
        entries_of = {_text(raw): entries for raw, entries in got or [] if entries}
        gone = [s for s in placed if not self._still_there(s, present[s])]
        if gone:
            check = self.client.pipeline(transaction=False)
            for stream in gone:
                check.xinfo_stream(stream)
            infos.update(zip(gone, await check.execute(raise_on_error=False), strict=True))
        for stream in reading:
            entries = entries_of.get(stream, [])
            ids = [parse_id(_text(e[0])) for e in entries]
            reply = infos.get(stream)
            if isinstance(reply, ResponseError) and _wrong_type(reply):
                gap = self._set_aside(stream, _text(await self.client.type(stream)), True)
                if gap is not None:
                    news.append(_Lost(stream, gap, reset=True))
                continue
            info = StreamInfo.of(reply) if isinstance(reply, Mapping) else None
            if info is not None:
                self.counters = info.added is not None
            lost: _Lost | None = None
            seen = None if info is None else (self.last[stream], info.last_generated, info.first)
            if stream in gone and not ids and seen is not None and self.judged.get(stream) == seen:
                pass  # judged already, and nothing was added or trimmed since: said once
            elif stream in gone:
                verdict = judge(
                    stream, parse_id(self.last[stream]), ids, self.counted.get(stream), info
                )
                self.judged[stream] = seen
                at = present.get(stream)
                if isinstance(at, list) and at:  # a new entry under the id read last (6.2)
                    self.tail[stream] = at[0][1]
                if verdict.lost is not None:
                    gap = Gap(owner.name, verdict.lost, target=stream)
                    lost = _Lost(stream, gap, verdict.reset)
                if verdict.reset:  # what was read may be the old stream's or the new one's
                    self.last[stream], self.counted[stream] = _START, verdict.counted
                    self.tail.pop(stream, None)
                    assert lost is not None
                    news.append(lost)
                    continue
                self.counted[stream] = verdict.counted
            else:
                lost = self._recount(stream, ids, info, reply)
            if entries:
                self.last[stream] = _text(entries[-1][0])
                self.tail[stream] = entries[-1][1]
                news.append((stream, entries))
            if lost is not None:
                news.append(lost)
        return news

    def _still_there(self, stream: str, reply: Any) -> bool:
        """Whether the XRANGE of the entry read last found it, with the fields it had."""
        if not isinstance(reply, list) or not reply:
            return False
        tail = self.tail.get(stream)
        return tail is None or reply[0][1] == tail

    def _recount(
        self, stream: str, ids: list[tuple[int, int]], info: StreamInfo | None, reply: Any
    ) -> _Lost | None:
        """Advance the count of entries read, and check it against Redis 7's own when XINFO
        was asked and the reader is at the stream's last entry (then both must be equal; less
        read than added means entries were removed before being read, by XDEL)."""
        counted = self.counted.get(stream)
        if counted is not None:
            counted += len(ids)
        last = ids[-1] if ids else parse_id(self.last[stream])
        lost = None
        if isinstance(reply, ResponseError):  # no such key: a stream not created yet
            counted = 0 if last == (0, 0) else counted
        elif info is not None and info.added is not None and info.last_generated == last:
            if counted is not None and info.added > counted:
                missed = info.added - counted
                reason = f"{_entries(missed)} of stream {stream!r} removed before being read"
                lost = _Lost(stream, Gap(self.owner.name, reason, target=stream), reset=False)
            counted = info.added
        self.counted[stream] = counted
        return lost

    async def _find_wrong_type(self, reading: list[str]) -> list[_Arrival]:
        """XREAD failed with WRONGTYPE: find the listed keys that are not streams, and set them
        aside (the next read goes on with the others)."""
        pipe = self.client.pipeline(transaction=False)
        for stream in reading:
            pipe.type(stream)
        kinds = [_text(k) for k in await pipe.execute()]
        news: list[_Arrival] = []
        for stream, kind in zip(reading, kinds, strict=True):
            if kind not in ("stream", "none"):
                announce = self.last.get(stream, _START) != _START
                gap = self._set_aside(stream, kind, announce)
                if gap is not None:
                    news.append(_Lost(stream, gap, reset=True))
        return news

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
        """The stream's newest `limit` entries the room keeps (or one entry), exact: `covers`
        knows which delivered changes they include, because entry ids are positions.

        `limit` counts the rows the room's filter keeps, not the entries read: reading stops
        past it or at `snapshot_scan_limit` entries (either way `truncated`)."""
        stream = address.target
        key_field = self.owner.stream_key_field
        try:
            if key_field:
                entries, cut = await self._latest_per_key(stream, key_field, address)
                newest = max((_text(e[0]) for e in entries), default="0-0", key=parse_id)
            elif address.key is not None:
                try:
                    entries = await self.client.xrange(stream, address.key, address.key)
                except ResponseError:  # not an entry id at all: no such row
                    entries = []
                cut = False
                newest = _text(entries[0][0]) if entries else "0-0"
            else:
                entries, cut, newest = await self._newest(stream, where, limit)
        except (RedisError, OSError) as exc:
            raise self.owner._failure(exc) from None
        # Every entry read is covered, kept or not: a later change is one past it.
        high = parse_id(newest)
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
            rows=rows[-limit:],
            covers=lambda c: (
                c.target == stream and isinstance(c.position, tuple) and c.position[1] <= high
            ),
            truncated=cut or len(rows) > limit,
            keys=keys[-limit:],
        )

    async def _newest(
        self, stream: str, where: Callable[[Mapping[str, Any]], bool], limit: int
    ) -> tuple[list[Any], bool, str]:
        """The newest entries `where` keeps, at most `limit` + 1 (oldest first), whether reading
        stopped at `snapshot_scan_limit` entries before the stream's start, and the newest
        entry id read. Before, the newest `limit` + 1 entries were read and then filtered: a
        filter room missed its rows whenever the stream held more entries than the limit."""
        scan = self.owner.snapshot_scan_limit
        kept: list[Any] = []
        read = 0
        newest = "0-0"
        end = "+"
        while True:
            count = min(1000, scan - read)
            page = await self.client.xrevrange(stream, max=end, count=count)
            if page and read == 0:
                newest = _text(page[0][0])
            read += len(page)
            for entry in page:
                fields, b64 = _fields(entry[1])
                if where(_row(_text(entry[0]), fields, b64)):
                    kept.append(entry)
                    if len(kept) > limit:
                        return kept[::-1], True, newest
            if len(page) < count:
                return kept[::-1], False, newest
            if read >= scan:
                return kept[::-1], True, newest
            end = "(" + _text(page[-1][0])

    async def _latest_per_key(
        self, stream: str, key_field: str, address: RoomAddress
    ) -> tuple[list[Any], bool]:
        """With `key_field` a stream is a changelog: its current rows are the newest entry per
        key among the newest `snapshot_scan_limit` entries (oldest key first), and whether the
        stream may hold more (the room's filter and `limit` are applied to these rows)."""
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
        return rows, len(newest) >= scan


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


def _id(position: tuple[int, int]) -> str:
    return f"{position[0]}-{position[1]}"


def _entries(count: int) -> str:
    return "1 entry" if count == 1 else f"{count} entries"


def _wrong_type(exc: BaseException) -> bool:
    return "WRONGTYPE" in str(exc)


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
