"""Keyspace mode: keyspace notifications read straight off a pub/sub socket, with every loss
announced.

Keyspace notifications are fire-and-forget: Redis sends them to whoever is subscribed at that
moment and keeps nothing. So this mode cannot promise every event; it promises that every window
in which events may have been lost is announced with a `Gap` (after a dropped pub/sub connection,
a Redis restart, a subscriber cut for a full output buffer, or a restart of the connector itself).
A silent TCP connection is found by PINGing it when it has been quiet for `health_check_interval`
seconds.

The pub/sub connection is a bare redis-py `Connection`, not `redis.asyncio.client.PubSub`, because
PubSub reconnects and resubscribes by itself, which would hide exactly the loss windows the feed
must announce. Events are parsed from raw bytes (see `redis_events`) so non-UTF-8 keys survive.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from connectors.base import RoomAddress, Snapshot, State
from connectors.redis_events import (
    GONE_OPS,
    NEEDED_FLAGS,
    NOT_CHANGES,
    KeyspaceEvent,
    ResponseLine,
    RespStream,
    merged_flags,
    missing_flags,
    text_or_base64,
)
from connectors.redis_values import READ_VALUES, KeyValue, decode_value
from feed.core.change import Change, Gap
from feed.errors import ConnectorError, SourceMisconfigured, SourceUnavailable

if TYPE_CHECKING:
    from connectors.redis import RedisConnector

log = logging.getLogger("feed.connectors.redis")

LOST = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.IncompleteReadError)
"""What a dropped or dead connection looks like from redis-py."""

_Received = tuple[KeyspaceEvent, dt.datetime, str]
"""An event as the reader queues it: the event, when it arrived, and its id stem."""
_Item = list[_Received] | Gap | ConnectorError
PING = b"*1\r\n$4\r\nPING\r\n"


@dataclass(eq=False)
class EventSource:
    """One server whose keyspace events are read: the standalone primary, or one cluster primary.

    Each keeps its own pub/sub connection, so each has its own epoch (ids stay unique across
    servers and reconnects) and its own restart detection.
    """

    pool: ConnectionPool
    where: str
    tag: str = ""
    """Appended to the epoch in ids: "" for a standalone server, a node number in a cluster."""
    cluster: bool = False
    epoch: str = "0"
    restarted: bool = False
    flushes: int | None = None
    """FLUSHDB, FLUSHALL and SWAPDB run on it so far (INFO commandstats), when known."""


class KeyspaceCapture:
    """The keyspace-mode half of RedisConnector (which owns options, status and the pools).

    One instance per start: `start` subscribes and starts the reader task, `stop` ends it. A
    cluster runs one reader per primary into the same queue (connectors/redis_cluster.py).
    """

    def __init__(self, owner: RedisConnector, client: Any, sources: list[EventSource]) -> None:
        self.owner = owner
        self.client = client
        self.sources = sources
        self.script: Any = client.register_script(READ_VALUES)
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._pending = 0
        self._drained = asyncio.Event()
        self._readers: list[asyncio.Task[None]] = []
        self._by_channel: dict[bytes, list[tuple[int, str]]] = {}
        self.flag_faults: dict[str, str] = {}
        """Servers (by `where`) whose notify-keyspace-events misses flags, and the status line."""
        self._stopping = False

    async def start(self) -> None:
        for source in self.sources:  # what to compare with: flushes from now on are gaps
            source.flushes = await self._flushes_so_far(source)
        conns: list[AbstractConnection] = []
        try:
            for source in self.sources:
                conns.append(await self._subscribe(source))
        except BaseException:  # one primary refused: leave none of the others subscribed
            for conn in conns:
                with contextlib.suppress(Exception):
                    await conn.disconnect()
            raise
        if self.owner._sessions:
            self._queue.put_nowait(
                Gap(self.owner.name, "the connector restarted: keyspace events in between lost")
            )
        self.owner._sessions += 1
        for source, conn in zip(self.sources, conns, strict=True):
            self._readers.append(
                asyncio.create_task(
                    self._read_loop(source, conn), name=f"redis:{self.owner.name}:{source.where}"
                )
            )
            self._readers.append(
                asyncio.create_task(
                    self._watch_flags(source), name=f"redis:{self.owner.name}:flags:{source.where}"
                )
            )

    async def stop(self) -> None:
        # redis-py's connection can swallow a cancel that lands as a command's reply arrives
        # (seen here: a stop that never ended); the flags loop then ends at its next turn.
        self._stopping = True
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        self._readers.clear()

    # -- keyspace mode: setup ------------------------------------------------------------------

    async def _ensure_notifications(self, conn: AbstractConnection, where: str) -> None:
        """Check notify-keyspace-events; with `configure` add what is missing, never removing."""
        try:
            await conn.send_command("CONFIG", "GET", "notify-keyspace-events")
            reply = await conn.read_response()
        except ResponseError as exc:
            if self.owner.auto_configure:
                raise SourceMisconfigured(
                    f"redis at {where} refuses CONFIG ({exc}): set notify-keyspace-events "
                    f"to include {NEEDED_FLAGS!r} in your provider's settings"
                ) from None
            log.warning(
                "redis at %s refuses CONFIG GET (%s); assuming notify-keyspace-events includes %r",
                where,
                exc,
                NEEDED_FLAGS,
            )
            return
        current = reply[1].decode() if reply and len(reply) > 1 else ""
        if not missing_flags(current):
            return
        wanted = merged_flags(current)
        # Single quotes: the flags hold a `$`, which a shell would expand inside double quotes.
        command = f"CONFIG SET notify-keyspace-events '{wanted}'"
        if not self.owner.auto_configure:
            raise SourceMisconfigured(
                f"redis at {where} has notify-keyspace-events={current!r}, which misses "
                f"{missing_flags(current)!r}: run {command} (or set configure = true)"
            )
        try:
            await conn.send_command("CONFIG", "SET", "notify-keyspace-events", wanted)
            await conn.read_response()
        except ResponseError as exc:
            raise SourceMisconfigured(
                f"redis at {where} refused {command} ({exc}): set it in your provider's settings"
            ) from None
        log.info("redis at %s: notify-keyspace-events %r -> %r", where, current, wanted)

    async def _watch_flags(self, source: EventSource) -> None:
        """Look at notify-keyspace-events, and for flushes, every `capture_check_interval`.

        Redis checks nothing: with the flags cleared (`CONFIG SET notify-keyspace-events ""`,
        a config reload, a managed service's settings page) it simply stops publishing, the
        pub/sub socket stays healthy and every event is lost in silence. So the flags are read
        again while running: a fault is announced with a gap and a DOWN status; with
        `configure = true` the flags are set again at once (and the window still announced),
        without it the status says what to run, and a second gap closes the window when the
        flags come back. Nor does Redis send an event for the keys FLUSHDB, FLUSHALL or SWAPDB
        remove: their counts in INFO commandstats are read too, and one that grew is a gap. A
        lost connection is the reader's business; this loop just retries.
        """
        interval = self.owner.capture_check_interval
        conn: AbstractConnection | None = None
        config = info = True  # what the server lets this loop read
        try:
            while config or info:
                await asyncio.sleep(interval)
                if self._stopping:
                    return
                try:
                    if conn is None:
                        conn = source.pool.make_connection()  # type: ignore[no-untyped-call]
                        await conn.connect()
                    if info:
                        info = await self._look_for_flushes(source, conn)
                    if not config:
                        continue
                    await conn.send_command("CONFIG", "GET", "notify-keyspace-events")
                    reply = await conn.read_response()
                except ResponseError as exc:
                    if not _refused(exc):  # LOADING after a restart, say: look again later
                        continue
                    # CONFIG refused (a managed service): nothing to watch with.
                    log.warning(
                        "redis at %s: cannot watch notify-keyspace-events: %s", source.where, exc
                    )
                    config = False
                    continue
                except (*LOST, RedisError):
                    if conn is not None:
                        with contextlib.suppress(Exception):
                            await conn.disconnect()
                    conn = None
                    continue
                current = reply[1].decode() if reply and len(reply) > 1 else ""
                await self._judge_flags(source, conn, current)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.disconnect()

    async def _flushes_so_far(self, source: EventSource) -> int | None:
        conn = source.pool.make_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.connect()
            return await _read_flushes(conn)
        except (*LOST, RedisError):  # the first look takes it then
            return None
        finally:
            with contextlib.suppress(Exception):
                await conn.disconnect()

    async def _look_for_flushes(self, source: EventSource, conn: AbstractConnection) -> bool:
        """Announce a gap when FLUSHDB, FLUSHALL or SWAPDB ran since the last look; False when
        the server refuses INFO (then nothing tells, as documented)."""
        try:
            count = await _read_flushes(conn)
        except ResponseError as exc:
            if "loading" in str(exc).lower():  # a restart: look again next time
                return True
            # Refused (an ACL, a proxy that has no INFO): the flags are still watched.
            log.warning("redis at %s: cannot watch for FLUSHDB/FLUSHALL: %s", source.where, exc)
            return False
        before, source.flushes = source.flushes, count
        if before is not None and count > before:
            self.owner.count_fault("flush")
            at = f" at {source.where}" if source.cluster else ""
            line = (
                f"FLUSHDB, FLUSHALL or SWAPDB ran on Redis{at}: the keys it removed or swapped "
                "sent no keyspace events"
            )
            log.warning("connector %s: %s", self.owner.name, line)
            await self._queue.put(Gap(self.owner.name, line))
        return True

    async def _judge_flags(
        self, source: EventSource, conn: AbstractConnection, current: str
    ) -> None:
        owner = self.owner
        missing = missing_flags(current)
        at = f" at {source.where}" if source.cluster else ""
        if not missing:
            was = self.flag_faults.pop(source.where, None)
            if was is not None:
                if not was.startswith("re-applied"):
                    await self._queue.put(
                        Gap(
                            owner.name,
                            f"notify-keyspace-events{at} covers the feed again; keyspace events "
                            "while it did not were lost",
                        )
                    )
                self._show_flags()
            return
        owner.count_fault("keyspace_flags")
        wanted = merged_flags(current)
        command = f"CONFIG SET notify-keyspace-events '{wanted}'"
        if owner.auto_configure:
            try:
                await conn.send_command("CONFIG", "SET", "notify-keyspace-events", wanted)
                await conn.read_response()
                line = (
                    f"re-applied notify-keyspace-events{at} ({current!r} missed {missing!r}): "
                    "keyspace events before that were lost"
                )
            except ResponseError as exc:
                line = f"notify-keyspace-events{at} is {current!r}, missing {missing!r}, and {command} was refused ({exc})"
        else:
            line = (
                f"notify-keyspace-events{at} is {current!r}, missing {missing!r}: Redis sends "
                f"no keyspace events the feed needs; run {command} (or set configure = true)"
            )
        if source.where in self.flag_faults and not line.startswith("re-applied"):
            return  # still the same standing fault: announced once
        log.warning("connector %s: %s", owner.name, line)
        self.flag_faults[source.where] = line
        await self._queue.put(Gap(owner.name, line))
        self._show_flags()

    def _show_flags(self) -> None:
        if self.flag_faults:
            self.owner.set_status(State.DOWN, " | ".join(self.flag_faults.values()))
        else:
            self.owner.set_status(State.UP)

    async def _subscribe(self, source: EventSource) -> AbstractConnection:
        """Open the events connection, check the server, PSUBSCRIBE every pattern."""
        conn: AbstractConnection = source.pool.make_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.connect()  # type: ignore[no-untyped-call]
            await self._ensure_notifications(conn, source.where)
            await conn.send_command("INFO", "server")
            info = await conn.read_response()
            run_id = _info_field(info, b"run_id")
            await conn.send_command("INFO", "cluster")
            is_cluster = _info_field(await conn.read_response(), b"cluster_enabled") == "1"
            if is_cluster != source.cluster:
                raise SourceUnavailable(
                    f"redis at {source.where} "
                    + ("became a cluster node" if is_cluster else "is no longer a cluster node")
                    + " since the connector started"
                )
            prefix = f"__keyspace@{self.owner.db}__:".encode()
            self._by_channel = {}
            for index, pattern in enumerate(self.owner.patterns):
                self._by_channel.setdefault(prefix + pattern.encode(), []).append((index, pattern))
            await conn.send_command("PSUBSCRIBE", *self._by_channel)
            for _ in self._by_channel:
                try:
                    reply = await conn.read_response()
                except ResponseError as exc:
                    raise self._channels_refused(source, exc) from None
                if not (isinstance(reply, list) and reply and reply[0] == b"psubscribe"):
                    raise SourceUnavailable(f"redis at {source.where}: odd reply {reply!r}")
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await conn.disconnect()
            if isinstance(exc, Exception):
                raise self.owner._failure(exc) from None
            raise
        known = self.owner._run_ids.get(source.where)
        source.restarted = bool(known) and run_id != known
        self.owner._run_ids[source.where] = run_id
        source.epoch = _base36(time.time_ns() // 1000) + source.tag
        return conn

    def _channels_refused(self, source: EventSource, exc: ResponseError) -> Exception:
        """PSUBSCRIBE refused by an ACL: name the channel rules the user lacks.

        Redis compares a PSUBSCRIBE pattern with the user's channel rules literally (6.2 and 7),
        so `&__keyspace@0__:*` does not allow `__keyspace@0__:orders:*`: each pattern must be
        granted as it is, or `allchannels`. Redis's own message names no channel.
        """
        text = str(exc).strip()
        if "channel" not in text.lower():
            return exc
        user = source.pool.connection_kwargs.get("username") or "default"
        channels = [c.decode("utf-8", "replace") for c in self._by_channel]
        head = (
            f"redis at {source.where}: permission denied ({text}): the user may not subscribe "
            "to the keyspace events of its patterns; "
        )
        if any(ch.isspace() for c in channels for ch in c):
            # An ACL rule cannot hold a space (Redis answers "Syntax error").
            return SourceMisconfigured(head + f"run ACL SETUSER {user} allchannels")
        rules = " ".join(_shell_quote("&" + c) for c in channels)
        return SourceMisconfigured(
            head + f"run ACL SETUSER {user} {rules} (a PSUBSCRIBE pattern must be granted "
            "exactly as it is) or give it allchannels"
        )

    # -- keyspace mode: reading ----------------------------------------------------------------

    async def _read_loop(self, source: EventSource, conn: AbstractConnection) -> None:
        """Read events until stopped; on a lost connection reconnect and queue a Gap.

        Items go to a bounded queue: when the hub falls behind, this loop stops reading, Redis
        buffers the events, and if its output-buffer limit cuts us off that too ends in a Gap.
        """
        try:
            while True:
                try:
                    await self._pump(source, conn)
                except LOST as exc:
                    with contextlib.suppress(Exception):
                        await conn.disconnect()
                    reason = str(exc).strip() or type(exc).__name__
                    where = f" to {source.where}" if source.cluster else ""
                    self.owner.set_status(State.DOWN, f"pub/sub connection{where} lost: {reason}")
                    conn = await self._reconnect(source)
                    at = f" at {source.where}" if source.cluster else ""
                    why = (
                        f"redis{at} restarted"
                        if source.restarted
                        else f"the pub/sub connection{where} dropped ({reason})"
                    )
                    await self._queue.put(
                        Gap(self.owner.name, f"{why}: keyspace events may be lost")
                    )
                    self.owner.set_status(State.UP)
        except ConnectorError as exc:
            self.owner.set_status(State.DOWN, str(exc))
            await self._queue.put(exc)
        except Exception as exc:  # a bug: still end the stream visibly instead of hanging
            log.exception("redis reader failed")
            await self._queue.put(SourceUnavailable(f"redis reader failed: {exc!r}"))
        finally:
            with contextlib.suppress(Exception):
                await conn.disconnect()

    async def _reconnect(self, source: EventSource) -> AbstractConnection:
        """Resubscribe with backoff for up to `reconnect_timeout`, then give up to the hub."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.owner.reconnect_timeout
        delay = 0.05
        while True:
            self.owner.count_restart()
            try:
                return await self._subscribe(source)
            except SourceMisconfigured:
                raise
            except SourceUnavailable as exc:
                if loop.time() + delay > deadline:
                    raise
                self.owner.set_status(State.DOWN, str(exc))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _pump(self, source: EventSource, conn: AbstractConnection) -> None:
        """Parse events straight off the socket, a whole read at a time.

        After the handshake redis-py's parser has consumed exactly the replies it was asked for
        (the pure-Python parser reads no further), so the connection's stream reader holds the
        next unread byte and we take over from there.

        A silent connection is found by one timer per `health_check_interval`, not by a timeout
        around every read: at thousands of reads a second, a timer armed and cancelled per read
        was a visible share of the per-event cost.
        """
        reader, writer = conn._reader, conn._writer
        if reader is None or writer is None:
            raise RedisConnectionError("the events connection closed during setup")
        loop = asyncio.get_running_loop()
        interval = self.owner.health_check_interval
        last_heard = loop.time()
        ping_sent = False
        timer: asyncio.TimerHandle

        def watchdog() -> None:
            nonlocal ping_sent, timer
            now = loop.time()
            if now - last_heard < interval:  # heard from since: look again when due
                timer = loop.call_at(last_heard + interval, watchdog)
            elif not ping_sent:  # quiet for a whole interval: is the connection still alive?
                writer.write(PING)
                ping_sent = True
                timer = loop.call_at(now + interval, watchdog)
            else:
                reader.set_exception(RedisTimeoutError(f"no reply to PING within {interval:g}s"))

        timer = loop.call_at(last_heard + interval, watchdog)
        stream = RespStream()
        by_channel = self._by_channel
        stem = f"{self.owner.name}:{source.epoch}-"
        count = 0
        now = dt.datetime.now
        utc = dt.UTC
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    raise RedisConnectionError("connection closed by the server")
                last_heard = loop.time()
                ping_sent = False
                ts = now(utc)
                batch: list[_Received] = []
                for reply in stream.feed_events(data):
                    if type(reply) is KeyspaceEvent:
                        if reply.pattern in by_channel and reply.op not in NOT_CHANGES:
                            count += 1
                            batch.append((reply, ts, f"{stem}{count}"))
                    elif isinstance(reply, ResponseLine) and reply.error:
                        raise RedisConnectionError(
                            f"redis error on the events connection: {reply.text}"
                        )
                if batch:
                    await self._enqueue(batch)
        finally:
            timer.cancel()

    async def _enqueue(self, batch: list[_Received]) -> None:
        """Hand a batch to `changes()`; past `max_pending` unconsumed events, stop reading."""
        self._queue.put_nowait(batch)
        self._pending += len(batch)
        if self._pending > self.owner.max_pending // 2 and self.owner.own_status.state == State.UP:
            self.owner.set_status(State.LAGGING, f"{self._pending} events waiting for the hub")
        while self._pending > self.owner.max_pending:
            self._drained.clear()
            await self._drained.wait()

    def _taken(self, batch: list[_Received]) -> None:
        self._pending -= len(batch)
        if self._pending <= self.owner.max_pending:
            self._drained.set()
        # Hysteresis: back to "up" only well below the mark, so the status does not flap.
        if (
            self._pending < self.owner.max_pending // 10
            and self.owner.own_status.state == State.LAGGING
        ):
            self.owner.set_status(State.UP)

    async def changes(self) -> AsyncIterator[Change | Gap]:
        if self.owner.fetch_values:
            async for change_or_gap in self._changes_with_values():
                yield change_or_gap
            return
        get = self._queue.get
        build = self._build
        while True:
            item = await get()
            if isinstance(item, list):
                self._taken(item)
                for received in item:
                    for change in build(received, None, None):
                        yield change
            elif isinstance(item, Gap):
                yield item
            else:
                raise item

    def _build(
        self, item: _Received, value: KeyValue | None, value_error: str | None
    ) -> list[Change]:
        event, ts, stem = item
        key, key_b64 = text_or_base64(event.key)
        meta: dict[str, Any] = {}
        if key_b64:
            meta["key_base64"] = True
        after = None
        if value is not None:
            after = _row(event.key, value, True)  # the same row a snapshot gives for the key
            meta.update(value.flags())
        if value_error is not None:
            meta["value_error"] = value_error
        return [
            Change(
                id=stem,
                connector=self.owner.name,
                source="redis",
                target=pattern,
                op=event.op,
                key=key,
                after=after,
                ts=ts,
                meta=meta or None,
                position=stem,
            )
            for _, pattern in self._by_channel.get(event.pattern, ())
        ]

    # -- keyspace mode: values -----------------------------------------------------------------

    async def _changes_with_values(self) -> AsyncIterator[Change | Gap]:
        """Read values for batches of events while the next batches are already being read.

        Up to 4 batches are in flight on separate connections, so one slow read does not stall the
        stream; results are still yielded in arrival order.
        """
        ready: asyncio.Queue[asyncio.Task[list[Change | Gap | ConnectorError]]] = asyncio.Queue(4)

        async def batcher() -> None:
            while True:
                items = [await self._queue.get()]
                size = 0
                while True:
                    last = items[-1]
                    if isinstance(last, list):
                        self._taken(last)
                        size += len(last)
                    if size >= 500 or self._queue.empty():
                        break
                    items.append(self._queue.get_nowait())
                await ready.put(asyncio.create_task(self._with_values(items)))

        feeder = asyncio.create_task(batcher())
        try:
            while True:
                task = await ready.get()
                for item in await task:
                    if isinstance(item, ConnectorError):
                        raise item
                    yield item
        finally:
            feeder.cancel()
            with contextlib.suppress(BaseException):
                await feeder
            while not ready.empty():
                ready.get_nowait().cancel()

    async def _with_values(self, items: list[_Item]) -> list[Change | Gap | ConnectorError]:
        batch: list[_Received | Gap | ConnectorError] = []
        for item in items:
            if isinstance(item, list):
                batch.extend(item)
            else:
                batch.append(item)
        keys = list(
            dict.fromkeys(
                item[0].key
                for item in batch
                if isinstance(item, tuple) and item[0].op not in GONE_OPS
            )
        )
        values: dict[bytes, KeyValue] = {}
        error: str | None = None
        if keys:
            try:
                values = await self.read_values(keys)
            except (RedisError, OSError) as exc:
                error = str(exc) or type(exc).__name__
        out: list[Change | Gap | ConnectorError] = []
        unread: dict[str, dict[str, None]] = {}  # target -> keys whose change has no value
        for entry in batch:
            if isinstance(entry, tuple):
                event = entry[0]
                if event.op in GONE_OPS:
                    out.extend(self._build(entry, None, None))
                else:
                    built = self._build(entry, values.get(event.key), error)
                    out.extend(built)
                    if error is not None:
                        for change in built:
                            unread.setdefault(change.target, {})[str(change.key)] = None
            else:
                out.append(entry)
        if error is not None:
            out.extend(self._unread_gaps(unread, error))
        return out

    def _unread_gaps(
        self, unread: Mapping[str, Mapping[str, None]], error: str
    ) -> list[Change | Gap | ConnectorError]:
        """A gap for the rooms the changes sent without their value reach (`value_error`).

        Such a change says a key changed, not what it holds: a client keeping rows cannot
        apply it and kept a stale (or empty) row for the key with nothing telling it so. The
        gap comes after the changes, so the snapshot a client reloads is taken after them.
        """
        self.owner.count_fault("value_read")
        gaps: list[Change | Gap | ConnectorError] = []
        for target, keys in unread.items():
            first = next(iter(keys))
            what = (
                f"the value of {first!r} could not be read after its change"
                if len(keys) == 1
                else f"the values of {len(keys)} keys ({first!r}, ...) could not be read "
                "after their changes"
            )
            reason = f"{what} ({error}): the changes went out with after: null"
            gaps.append(Gap(self.owner.name, reason, target, keys=frozenset(keys)))
        return gaps

    async def read_values(self, keys: list[bytes]) -> dict[bytes, KeyValue]:
        """Type and bounded value of each key, in one script call."""
        assert self.client is not None
        reply = await self.script(
            keys=keys, args=[self.owner.max_value_items, self.owner.max_value_bytes]
        )
        return {
            key: decode_value(row, self.owner.max_value_items)
            for key, row in zip(keys, reply, strict=True)
        }

    # -- snapshots -----------------------------------------------------------------------------

    async def snapshot(
        self, address: RoomAddress, where: Callable[[Mapping[str, Any]], bool], limit: int
    ) -> Snapshot:
        """SCAN the pattern (or read the one key); never exact, so `covers` is always False.

        SCAN may return a key twice or miss keys changed while it runs, and values are read after
        the keys are listed; every buffered change is therefore replayed after the snapshot.
        """
        try:
            if address.key is not None:
                key = address.key.encode()
                rows = await self._rows([key] if await self.client.exists(key) else [], where)
                truncated = False
            else:
                rows, truncated = await self._scan_rows(address.target, where, limit)
        except RedisError as exc:
            raise self.owner._failure(exc) from None
        shown = rows[:limit]
        # A row's key is the Redis key (as text, or base64 with `key_base64`), as in its changes.
        row_keys: list[str | None] = [row["key"] for row in shown]
        return Snapshot(rows=shown, truncated=truncated or len(rows) > limit, keys=row_keys)

    async def _scan_rows(
        self, pattern: str, where: Callable[[Mapping[str, Any]], bool], limit: int
    ) -> tuple[list[dict[str, Any]], bool]:
        """The rows `where` keeps among the keys matching `pattern`, once each, and whether the
        scan was cut: it stops at `limit` + 1 rows kept (`snapshot_limit` counts the room's
        rows, not the keys met: counting keys cut a filter room short whenever the pattern held
        more keys than the limit, whoever's they were) or at `snapshot_scan_limit` keys
        examined (a SCAN over a huge keyspace must stay bounded)."""
        kept: dict[str, dict[str, Any]] = {}
        async with contextlib.aclosing(self._scan(pattern)) as batches:
            async for batch in batches:
                if batch is None:
                    return list(kept.values()), True
                for start in range(0, len(batch), 200):
                    for row in await self._rows(batch[start : start + 200], where):
                        kept.setdefault(row["key"], row)  # SCAN may return a key twice
                        if len(kept) > limit:
                            return list(kept.values()), True
        return list(kept.values()), False

    async def _rows(
        self, keys: list[bytes], where: Callable[[Mapping[str, Any]], bool]
    ) -> list[dict[str, Any]]:
        """The rows of `keys` that still exist and that `where` keeps."""
        if not keys:
            return []
        if self.owner.fetch_values:
            values = await self.read_values(keys)
        else:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.type(key)
            kinds = await pipe.execute()
            values = {
                k: KeyValue(t.decode() if isinstance(t, bytes) else t, None)
                for k, t in zip(keys, kinds, strict=True)
            }
        rows = [_row(key, values[key], self.owner.fetch_values) for key in keys]
        return [row for row in rows if row is not None and where(row)]

    async def _scan(self, pattern: str) -> AsyncGenerator[list[bytes] | None, None]:
        """Batches of the keys matching `pattern` (SCAN may repeat a key), then None if it
        stopped at `snapshot_scan_limit` keys examined before SCAN's end. SCAN's COUNT is the
        keys it walks per call, matching or not: the database's keys are what is examined."""
        assert self.client is not None
        cursor = 0
        examined = 0
        while True:
            cursor, batch = await self.client.scan(cursor, match=pattern, count=1000)
            examined += 1000
            yield [key if isinstance(key, bytes) else str(key).encode() for key in batch]
            if cursor == 0:
                return
            if examined >= self.owner.snapshot_scan_limit:
                yield None
                return


def _row(key: bytes, value: KeyValue, with_value: bool) -> dict[str, Any] | None:
    if value.type == "none":
        return None  # deleted between SCAN and the read
    text, key_b64 = text_or_base64(key)
    row: dict[str, Any] = {"key": text, "type": value.type}
    if with_value:
        row["value"] = value.value
        row.update(value.flags())
    if key_b64:
        row["key_base64"] = True
    return row


FLUSHES = (b"cmdstat_flushdb", b"cmdstat_flushall", b"cmdstat_swapdb")


async def _read_flushes(conn: AbstractConnection) -> int:
    await conn.send_command("INFO", "commandstats")
    return flush_count(await conn.read_response())


def flush_count(info: Any) -> int:
    """FLUSHDB, FLUSHALL and SWAPDB calls that succeeded, from INFO commandstats' text (a
    count that fell was reset by CONFIG RESETSTAT: the next look compares with it)."""
    text = info if isinstance(info, bytes) else str(info).encode()
    total = 0
    for line in text.splitlines():
        name, _, stats = line.strip().partition(b":")
        if name in FLUSHES:
            fields = dict(part.split(b"=", 1) for part in stats.split(b",") if b"=" in part)
            total += int(fields.get(b"calls", 0)) - int(fields.get(b"failed_calls", 0))
    return total


def _refused(exc: ResponseError) -> bool:
    """Whether the server refuses CONFIG for good (renamed, ACL), not for the moment."""
    text = str(exc).lower()
    return "unknown command" in text or "noperm" in text or "permission" in text


def _shell_quote(text: str) -> str:
    """Single quotes for a shell (a pattern holds `*`, `?`, `$`...), as the CONFIG SET line has."""
    return "'" + text.replace("'", "'\\''") + "'"


def _info_field(info: Any, name: bytes) -> str:
    if isinstance(info, bytes):
        for line in info.splitlines():
            if line.startswith(name + b":"):
                return line.split(b":", 1)[1].decode()
    return ""


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while number:
        number, rem = divmod(number, 36)
        out = digits[rem] + out
    return out or "0"
