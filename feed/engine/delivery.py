"""The node side: follow the rooms this node's clients are in, and deliver what Redis sends.

The listen loop is python-socketio's pub/sub manager's shape: a bad message is logged and
skipped, CancelledError is re-raised, a lost connection is retried with a doubling backoff, and
what the outage may have cost is filled from the history or announced with a `gap`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Mapping
from typing import Any

from redis.exceptions import RedisError

from feed.core.rooms import Room
from feed.delivery.transport import FlushBeforeWaiting
from feed.engine.core import UNREACHABLE, log
from feed.engine.history import History
from feed.engine.mirror import Mirror
from feed.engine.relay import numbered, same_payload
from feed.engine.resp import Message, Subscriber
from feed.engine.routes import room_spec
from feed.engine.wire import loads, one_line
from feed.errors import ClusterError, ProtocolError
from feed.tls import REDIS, tls_hint

BACKOFF_START = 0.2
BACKOFF_MAX = 2.0
SUBSCRIBE_TIMEOUT = 5.0
MISSED = "changes were missed while this node's connection to the cluster's Redis was down"
UNREADABLE = (
    "a change published in a message this node's build cannot read (a newer cluster format) "
    "was no longer in the room's history when this node read it"
)
TRIMMED = (
    "a change too large for Redis pub/sub was no longer in the room's history when this node "
    "read it (newer changes had pushed it out)"
)
LOST = "the cluster lost this room's history"
RENUMBERED = (
    "the cluster's Redis came back with older data than it had given out (restored, or a "
    "replica that lagged took over): this room's numbering begins again"
)
DROPPED = (
    "this room's numbering was dropped in the cluster while this node was late to keep it "
    "registered: changes made meanwhile were not numbered in it"
)


def _wake(pubsub: Subscriber, _: object) -> None:
    pubsub.wake()


class Delivery(History):
    """Subscribing to rooms' channels, the listener, and delivery to local members."""

    # -- this node's rooms ---------------------------------------------------------------------

    async def watch(self, room: Room) -> Mirror:
        """Follow a room's channel (confirmed by Redis) and register it for the reader."""
        mirror = self._mirrors.get(room.name)
        if mirror is None:
            channel = self.channel(room.name).encode()
            mirror = self._mirrors[room.name] = Mirror(room, channel)
            self._by_channel[channel] = mirror
        if mirror.ready:
            return mirror
        async with mirror.lock:
            if mirror.ready:
                return mirror
            try:
                await self._subscribe([mirror.channel])
                epoch, seq, gap = await self._register(room, (mirror.epoch, mirror.seq))
                if room.connector in self._leases:
                    # The reader routes a room it registers itself now, not when its listener
                    # reads the registration back from the control channel: a change written
                    # right after the ack would otherwise miss the room (1 to 2 of 40 did,
                    # once the listener had the room's `epoch` notice to read first).
                    self._route_spec(room_spec(room))
                await self._baseline(mirror, epoch, seq, gap)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                why = one_line(exc)
                if isinstance(exc, TimeoutError):  # waited for the listener, or for Redis
                    why = self.detail if not self.up else f"no answer in {SUBSCRIBE_TIMEOUT:g} s"
                why = why.removeprefix(f"{UNREACHABLE}: ")
                raise ProtocolError(
                    "cluster_unavailable",
                    f"the cluster's Redis is unreachable ({why}); retry shortly",
                ) from None
            mirror.ready = True
        return mirror

    async def _baseline(self, mirror: Mirror, epoch: str, seq: int, gap: int) -> None:
        """Take the numbers a registration gave. A mirror watched again (after Redis was
        unreachable, or its numbering was dropped) may be behind, or in an older epoch: its
        members get what they missed, or a `gap` in the new epoch. It took the new epoch with
        the old seq before, so the new epoch's changes up to that seq were dropped as repeats
        and its members were never told."""
        async with mirror.order:
            await self._adopt(mirror, epoch, seq, gap)

    async def _adopt(
        self,
        mirror: Mirror,
        epoch: str,
        seq: int,
        gap: int,
        reason: str = LOST,
        fill_reason: str = MISSED,
    ) -> None:
        """Bring the mirror to the room's numbers in Redis (`mirror.order` held)."""
        if mirror.epoch is not None and epoch != mirror.epoch:
            await self._switch_epoch(mirror, epoch, seq, gap, reason)
            return
        mirror.epoch = epoch
        mirror.gap = max(mirror.gap, gap)
        if mirror.seq is None:
            mirror.seq = mirror.room.seq = seq
        elif seq > mirror.seq:
            await self._fill(mirror, seq, fill_reason)

    async def _switch_epoch(
        self, mirror: Mirror, epoch: str, seq: int, gap: int, reason: str = LOST
    ) -> None:
        """The room's numbering began again (`epoch`, now at `seq`): its members get a `gap`
        in the new epoch, and the mirror follows it from there."""
        await self._announce_gap(mirror, reason, seq, epoch=epoch)
        mirror.ring.clear()
        mirror.epoch, mirror.seq, mirror.gap = epoch, seq, gap
        mirror.room.seq = seq

    def forget(self, room: Room) -> None:
        """The hub dropped an expired or evicted room: stop following its channel, and let
        its registration lapse soon (`_lapse`)."""
        if room.ephemeral:
            self._lapse(room)
        mirror = self._mirrors.pop(room.name, None)
        if mirror is None:
            return
        self._by_channel.pop(mirror.channel, None)
        pubsub = self._pubsub
        if pubsub is not None:
            with contextlib.suppress(ConnectionError):  # a new connection will not subscribe it
                pubsub.unsubscribe(mirror.channel)

    def _lapse(self, room: Room) -> None:
        """Shorten the registration of a room this node dropped to three refresh periods.

        Registered, a room is routed by the reader, every change it matches numbered and kept
        in Redis, until the registration lapses: `filter_room_grace` plus three refresh periods
        after this node's last refresh. A room dropped early (evicted as an idle room too many,
        feed.security.room_budget) stayed routed all that time: one client churning filters had
        5,000 routed against the 500 its node kept, Redis at 1.1 GB and the reader's publish
        script running past 5 s. A node that keeps the room refreshes it in time."""
        lapsing = self._lapsing.setdefault(room.connector, set())
        lapsing.add(room.name)
        if self._lapse_task is None or self._lapse_task.done():
            self._lapse_task = asyncio.get_running_loop().create_task(self._lapse_now())

    async def _lapse_now(self) -> None:
        """Every room `_lapse` was given, in one script call per connector."""
        await asyncio.sleep(0)  # the rest of this pass's drops, in the same call
        while self._lapsing:
            connector, names = self._lapsing.popitem()
            left = int(3 * self.refresh * 1000)
            try:
                await self._script("LAPSE", [self.live_key(connector)], [left, *sorted(names)])
            except (RedisError, OSError) as exc:  # it lapses by itself, only later
                log.info("could not shorten %d dropped rooms' registration: %s", len(names), exc)

    async def _subscribe(self, channels: list[bytes]) -> None:
        await asyncio.wait_for(self._connected.wait(), SUBSCRIBE_TIMEOUT)
        pubsub = self._pubsub
        if pubsub is None:
            raise ClusterError("not connected to the cluster's Redis")
        loop = asyncio.get_running_loop()
        waits = []
        for channel in channels:
            future = self._confirm.get(channel)
            if future is None or future.done():
                future = self._confirm[channel] = loop.create_future()
            waits.append(future)
        pubsub.subscribe(*channels)
        await asyncio.wait_for(asyncio.gather(*waits), SUBSCRIBE_TIMEOUT)

    # -- the listener: every message this node receives ----------------------------------------

    async def _listen(self) -> None:
        """Receive forever; a bad message is logged and skipped, a lost connection retried
        with doubling backoff (and what it may have cost is recovered or announced)."""
        delay = BACKOFF_START
        while True:
            pubsub: Subscriber | None = None
            try:
                pubsub = await Subscriber.open(self.config.url, answer=self.answer)
                pubsub.subscribe(self.control, self.inbox)
                pubsub.direct, pubsub.direct_done = self._direct, self._flush
                self._pubsub = pubsub
                recovery = asyncio.create_task(self._recover())
                # A failed recovery is looked at once, not at the connection's next tick.
                recovery.add_done_callback(functools.partial(_wake, pubsub))
                self._connected.set()
                try:
                    while True:
                        if recovery.done() and not self.up:
                            recovery.result()  # a failed recovery: reconnect and try again
                        # Most messages never come here: a room's next run is relayed in the
                        # read callback (`_direct`). What does (a hole to fill, a new epoch,
                        # control) leaves when the next read would wait, as the hub does with a
                        # change stream: in the pass that received it, one frame per room.
                        pubsub.busy = False
                        messages = await FlushBeforeWaiting(pubsub.read(), self._flush)
                        if not messages:
                            continue
                        pubsub.busy = True  # what arrives meanwhile waits its turn in `read`
                        transport = self.hub.transport
                        if transport is not None:
                            transport.hold(first_at_once=False)
                        for message in messages:
                            try:
                                await self._on_message(message)
                            except asyncio.CancelledError:
                                raise
                            except Exception:
                                log.exception("bad cluster message: %.200r", message)
                finally:
                    self._flush()
                    recovery.cancel()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("cluster listener: %s", one_line(exc), exc_info=True)
                url = self.config.url
                tls, client = url.startswith("rediss"), "ssl_certfile=" in url
                hint = tls_hint(str(exc), REDIS, tls=tls, client=client, fresh=not self.up)
                self._down(one_line(exc) + hint)
            finally:
                self._connected.clear()
                self._pubsub = None
                for future in self._confirm.values():
                    future.cancel()
                self._confirm.clear()
                self._replies_lost()
                if pubsub is not None:
                    pubsub.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)
            if self.up:
                delay = BACKOFF_START

    def _flush(self) -> None:
        transport = self.hub.transport
        if transport is not None:
            transport.flush()

    def _down(self, detail: str) -> None:
        """Redis went away: every node says so (status, /readyz); clients stay connected."""
        first = self.up or self.detail == "connecting"
        self.up = False
        self.detail = f"{UNREACHABLE}: {detail}"
        if not first:
            return
        log.warning("%s: %s", self.node, self.detail)
        for mirror in self._mirrors.values():
            mirror.ready = False
        for name, connector in self.hub.connectors.items():
            self._show_unreachable(connector, detail, hold=name in self._leases)

    async def _recover(self) -> None:
        """After (re)connecting: resubscribe, restore statuses, fill or announce what was missed."""
        channels = [m.channel for m in self._mirrors.values()]
        if channels:
            await self._subscribe(channels)
        await self._claim_name()
        statuses = await self.redis.hgetall(self.status_key)
        was_down = not self.up
        self.up = True
        self.detail = "connected"
        if was_down:
            log.info("%s: connected to the cluster's Redis", self.node)
            self._schemas.clear()  # Redis may have lost them: share and fetch them again
            self.lease_released()  # a lease Redis lost meanwhile is taken at once
        for name, connector in self.hub.connectors.items():
            connector.release_status()  # what it said meanwhile (a reading that ended, say)
            if name in self._leases:
                self.status_changed(connector.status)
            elif name.encode() in statuses:
                self._apply_status(name, loads(statuses[name.encode()]))
        for mirror in list(self._mirrors.values()):
            await self._resync(mirror)
            mirror.ready = True

    async def _resync(self, mirror: Mirror, reason: str = MISSED) -> None:
        async with mirror.order:
            await self._resync_locked(mirror, reason)

    async def _resync_locked(
        self, mirror: Mirror, reason: str = MISSED, switch: str = LOST
    ) -> None:
        """Bring the mirror to the room's registration in Redis: `reason` for a hole filled
        (or its gap), `switch` for a gap when the numbering began again."""
        epoch, seq, gap = await self._register(mirror.room, (mirror.epoch, mirror.seq))
        await self._adopt(mirror, epoch, seq, gap, switch, reason)

    def _direct(self, message: Message) -> bool:
        """Relay a room's run that goes on from its seq in the subscriber's read callback
        (feed.engine.resp.Subscriber.direct), as `_apply` would; False for anything that may
        await (a hole to fill, a new epoch, a resync under way) or is not a room's changes:
        the listener's. The transport holds the run until the read ends (`_flush`)."""
        if message[0] != b"message":
            return False
        mirror = self._by_channel.get(message[1])
        if mirror is None or mirror.seq is None or mirror.order.locked():
            return False
        try:
            head, _, rest = message[2].partition(b"\n")
            if not head.isdigit():  # a notice (format.HEADS), or a head this build cannot read
                return False
            epoch, _, payloads = rest.partition(b"\n")
            first = int(head)
            if first != mirror.seq + 1 or epoch.decode() != mirror.epoch:
                return False  # a hole, an overlap to check (`_apply`), a new epoch
            transport = self.hub.transport
            if transport is not None:
                transport.hold(first_at_once=False)
            self._relay(mirror, first, payloads.split(b"\n"))
        except Exception:
            log.exception("bad cluster message: %.200r", message)
        return True

    async def _on_message(self, message: Message) -> None:
        kind = message[0]
        if kind != b"message":
            if kind == b"subscribe":
                future = self._confirm.pop(message[1], None)
                if future is not None and not future.done():
                    future.set_result(None)
            return
        _, channel, data = message
        if channel == self.control:
            self._on_control(loads(data))
            return
        if channel == self.inbox:
            await self._on_inbox(loads(data))
            return
        if self._direct(message):  # a run that goes on from the room's seq: nothing to await
            return
        mirror = self._by_channel.get(channel)
        if mirror is None:
            return
        head, _, rest = data.partition(b"\n")
        if not head.isdigit() and head not in self._heads:
            await self._unknown_head(mirror, head)
            return
        if head == b"gap":
            seq_text, _, body = rest.partition(b"\n")
            await self._on_gap(mirror, int(seq_text), loads(body))
            return
        if head == b"ref":  # a run too large for pub/sub: it is in the room's history
            first, last, epoch = rest.split(b"\n")
            await self._apply(mirror, int(first), epoch.decode(), None, int(last))
            return
        if head == b"epoch":  # a registration began a new numbering (scripts.REGISTER)
            seq_text, _, epoch = rest.partition(b"\n")
            await self._on_epoch(mirror, epoch.decode(), int(seq_text))
            return
        if head == b"drop":  # the reader dropped the room's numbering (scripts.LIVE)
            await self._on_drop(mirror, rest.decode())
            return
        epoch, _, payloads = rest.partition(b"\n")
        raws = payloads.split(b"\n")
        await self._apply(mirror, int(head), epoch.decode(), raws, int(head) + len(raws) - 1)

    async def _unknown_head(self, mirror: Mirror, head: bytes) -> None:
        """A room's message this build cannot read (published by a node of a newer cluster
        format, feed.engine.format): logged once per head, not a traceback per message, and
        the room brought up to its seq in Redis from the history, as after a reconnect; a
        `gap` where the history no longer holds it. Never a silent hole until the next change."""
        if head not in self._unknown_heads:
            self._unknown_heads.add(head)
            log.warning(
                "%s: a room message this build cannot read (%.20r, from a node of a newer"
                " cluster format than %d): its rooms are filled from their history; finish the"
                " rolling upgrade",
                self.node, head, self.format,
            )  # fmt: skip
        await self._resync(mirror, UNREADABLE)

    def _on_control(self, body: Mapping[str, Any]) -> None:
        kind = body.get("t")
        if kind == "room":
            self._route_spec(body["spec"])
        elif kind == "rooms":  # rooms a late node registered again (feed.engine.registry)
            for spec in body["specs"]:
                self._route_spec(spec)
        elif kind == "status":
            self._apply_status(str(body.get("c")), body.get("s") or {})
        elif kind == "released":  # its reader let the lease go: take it now, not at expiry
            self.lease_released(str(body.get("c")))

    async def _on_epoch(self, mirror: Mirror, epoch: str, seq: int) -> None:
        """Another node's registration began the room's numbering again (after Redis lost it,
        or the reader dropped it): a node still in the old epoch tells its members now, not at
        the room's next change, and a resume here against the old epoch is `recovered: false`."""
        async with mirror.order:
            if mirror.seq is None or mirror.epoch == epoch:
                return  # being watched (its registration gives the numbers), or known already
            # The numbers as Redis has them now, not as the notice said: a node that already
            # went on to a later epoch (read from the history) must not go back to this one.
            now = await self._history_read(mirror.room.name, epoch, seq, seq)
            if now.epoch is None or now.epoch == mirror.epoch:
                return  # dropped again since (its `drop` follows), or known already
            await self._switch_epoch(mirror, now.epoch, now.seq, now.gap)

    async def _on_drop(self, mirror: Mirror, epoch: str) -> None:
        """The reader dropped the room's numbering and history: no node had refreshed it in
        time (this one was late: paused, or cut from Redis). A room this node still keeps is
        registered again at once, in a new epoch, and its members get a `gap` in it; one it
        keeps no more (idle past its grace, about to be dropped here) is registered again by
        the next subscribe to it (`watch`)."""
        async with mirror.order:
            if mirror.epoch != epoch:
                return  # a numbering this node no longer follows
            if not self._keeps(mirror.room, time.monotonic()):
                mirror.ready = False
                return
            await self._resync_locked(mirror, switch=DROPPED)

    async def _apply(
        self, mirror: Mirror, first: int, epoch: str, raws: list[bytes] | None, last: int
    ) -> None:
        """Deliver a room's run of a batch: payloads numbered `first` to `last`, when it may
        have to await (the usual run, going on from the room's seq, is `_direct`'s). `raws`
        None: a run the reader published as a reference, read here from the room's history."""
        async with mirror.order:
            if mirror.seq is None:  # the first message of a room being watched: the baseline
                mirror.epoch, mirror.seq = epoch, first - 1
            elif epoch != mirror.epoch:
                # Said even while a reconnect is still resyncing (not `ready`): a publication in
                # the new epoch can arrive first, and after it the resync sees nothing to tell.
                await self._switch_epoch(mirror, epoch, first - 1, 0)
            if raws is not None and first <= mirror.seq and self._renumbered(mirror, first, raws):
                await self._begin_again(mirror)
                return
            if last <= mirror.seq:
                return  # already delivered (a resync read it from the history first)
            if first > mirror.seq + 1:
                await self._fill(mirror, first - 1)
                if last <= mirror.seq or mirror.epoch != epoch:
                    return  # filled; or the numbering began again under the run (a gap)
            if raws is None:
                await self._fill(mirror, last, TRIMMED)
                return
            self._relay(mirror, first, raws)

    def _renumbered(self, mirror: Mirror, first: int, raws: list[bytes]) -> bool:
        """Whether payloads numbered from `first` differ from those this node delivered under
        the same seqs (`mirror.ring`): Redis came back with older data than it gave out, and
        its numbering went back (scripts.REGISTER, PUBLISH)."""
        ring = mirror.ring
        if not ring:
            return False
        base = ring[0][0]
        for seq, raw in enumerate(raws, start=first):
            if base <= seq <= ring[-1][0]:
                had = ring[seq - base][1]
                if not same_payload(had, numbered(mirror.room.name, seq, raw)):
                    return True
        return False

    async def _begin_again(self, mirror: Mirror) -> None:
        """The room's numbering went back under its epoch: it begins again in a new one (or
        in the one another node began), and its members get a `gap` in it (`mirror.order`
        held)."""
        epoch, seq, gap = await self._register(mirror.room, (mirror.epoch, 1 << 52))
        await self._adopt(mirror, epoch, seq, gap, RENUMBERED)

    def _relay(self, mirror: Mirror, first: int, raws: list[bytes]) -> None:
        """Deliver the payloads past the room's seq, as one run: each relayed as the reader
        encoded it, with its seq spliced in (feed.engine.relay), never decoded here; the room's
        books (seq, ring, counters) kept once per run, not once per change."""
        done = mirror.seq or 0
        if first <= done:
            raws = raws[done - first + 1 :]
            first = done + 1
        if raws:
            name = mirror.room.name
            payloads = [numbered(name, seq, raw) for seq, raw in enumerate(raws, start=first)]
            self._deliver_run(mirror, first, payloads)

    def _deliver_run(self, mirror: Mirror, first: int, payloads: list[Any]) -> None:
        """Deliver `payloads`, numbered `first`, `first + 1`, ... (all past the room's seq)."""
        room = mirror.room
        ring = mirror.ring
        if ring and ring[-1][0] != first - 1:
            ring.clear()
        last = first + len(payloads) - 1
        ring.extend(zip(range(first, last + 1), payloads, strict=True))
        mirror.seq = room.seq = last
        if mirror.advanced is not None:  # a catch-up waits for the room to move on
            mirror.advanced.set()
            mirror.advanced = None
        hub = self.hub
        transport = hub.transport
        receivers = len(room.members) - len(room.pending)
        if receivers > 0 and transport is not None:
            name, skip = room.name, list(room.pending)
            for payload in payloads:
                transport.send_change(name, payload, skip)
            hub._counters(room.connector)[1].inc(receivers * len(payloads))

    async def _fill(self, mirror: Mirror, upto: int, reason: str = MISSED) -> None:
        """Deliver what pub/sub did not bring (a hole up to `upto`, or a run published as a
        reference) from the room's history, as relayed runs are: the reader's bytes with the
        seq spliced in. A `gap` with `reason` when the history no longer holds all of it.

        Read in one step with the room's epoch (feed.engine.history): when the numbering began
        again since (Redis lost the room's meta, or the reader dropped the room), the history's
        entries are the new epoch's, under the same seqs, and delivering them would give the
        members other changes than the ones numbered so. They get a `gap` in the new epoch
        instead (the room registered again when it has no numbering at all)."""
        start = mirror.seq or 0
        # The last change delivered is read back too, when this node still has it: a history
        # that holds another change under its seq was numbered again (`_renumbered`).
        probe = 1 if mirror.ring and mirror.ring[-1][0] == start and start > 0 else 0
        read = await self._history_read(mirror.room.name, mirror.epoch, start - probe, upto)
        if read.entries is not None:
            raws = [raw for _, raw in read.entries]
            if probe and raws and self._renumbered(mirror, start, raws[:1]):
                await self._begin_again(mirror)
                return
            if raws[probe:]:
                self._relay(mirror, start + 1, raws[probe:])
            return
        if read.epoch != mirror.epoch:
            epoch, seq, gap = read.epoch, read.seq, read.gap
            if epoch is None:
                epoch, seq, gap = await self._register(mirror.room)
            if epoch != mirror.epoch:
                await self._switch_epoch(mirror, epoch, seq, gap)
                return
        await self._announce_gap(mirror, reason, upto)
        mirror.ring.clear()
        mirror.seq = upto
        mirror.room.seq = upto

    async def _on_gap(self, mirror: Mirror, seq: int, body: Mapping[str, Any]) -> None:
        mirror.gap = max(mirror.gap, seq)
        reason = mirror.room.source_gap(str(body.get("reason", "")))
        await self._announce_gap(mirror, reason, seq, body.get("ts"))

    async def _announce_gap(
        self, mirror: Mirror, reason: str, seq: int, ts: Any = None, epoch: str | None = None
    ) -> None:
        """Tell the room's members; `epoch`: the new one, when the numbering begins again (Redis
        lost the history), so that a client takes `seq` as the room's position in it."""
        room = mirror.room
        room.mark_gap(reason)
        mirror.gap = max(mirror.gap, seq)
        self.hub.metrics.inc("feed_gaps_total", connector=room.connector)
        if room.members and self.hub.transport is not None:
            body = {
                "connector": room.connector,
                "room": room.name,
                "target": room.target,
                "reason": reason,
                "seq": seq,
                "epoch": epoch or mirror.epoch,
                "ts": ts,
            }
            await self.hub.transport.send_room(room.name, "gap", body, [])
