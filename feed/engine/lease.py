"""One reader per connector across the cluster: the lease, its fencing token and shared status.

A lease (`SET NX PX`, renewed) with a fencing token (a count of readings and a random tag):
only the holder runs the connector, and the publish script refuses any other token, so a paused
old reader cannot write after a takeover, not even after Redis lost the counter. The reader
shares its connector's status so every node can show it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from connectors.base import Connector, State, Status
from feed.core.change import Gap
from feed.engine.batch import Batcher
from feed.engine.core import log
from feed.engine.format import announced, reader_ahead
from feed.engine.publisher import Publisher
from feed.engine.wire import dumps, loads, one_line
from feed.errors import ClusterError

LEASE_MARGIN = 0.01
"""Seconds past a lease's expiry at which a waiting node asks for it again: Redis expires keys
to the millisecond, and a node that asks a little early only waits the rest."""


class Leases(Publisher):
    """Taking, renewing and losing connectors' leases; showing who reads what."""

    # -- the lease: one reader per connector ---------------------------------------------------

    @contextlib.asynccontextmanager
    async def reading(self, connector: Connector) -> AsyncIterator[None]:
        """Hold the connector's lease while the body runs; end the body when the lease is lost."""
        name = connector.name
        holder, token, asked = await self._acquire(connector)
        count = int(token.split(":", 1)[0])
        lost: list[str] = []
        failed: list[str] = []

        def stop_reading(reason: str) -> None:  # a batch could not be published
            failed.append(reason)
            with contextlib.suppress(RuntimeError):  # the reading is over or ending already
                deadline.reschedule(asyncio.get_running_loop().time())

        try:
            async with asyncio.timeout(None) as deadline:
                renewer = asyncio.create_task(
                    self._renew(name, holder, asked, deadline, lost), name=f"cluster:lease:{name}"
                )
                try:
                    try:
                        await self._load_index(name)
                    except Exception as exc:
                        raise ClusterError(
                            f"cannot read the room registry: {one_line(exc)}"
                        ) from None
                    self._leases[name] = token
                    self.differing.pop(name, None)  # read here: with this node's own config
                    self.format_behind.pop(name, None)  # and in its own format
                    # The batches carry this reading's token: a late one from an ended reading is
                    # refused by Redis once any reading (this node's next one too) has begun.
                    batcher = Batcher(
                        name,
                        lambda batch: self._publish_batch(connector, batch, token, count),
                        stop_reading,
                        self.config.publish_interval,
                    )
                    self._batchers[name] = batcher
                    connector.settle_with(batcher.drain)
                    self._set_reader(name, self.node)
                    log.info("%s: reading connector %s (fencing token %s)", self.node, name, token)
                    if count > 1 and not connector.durable:
                        # Another node read it before (the token counts readings): what the
                        # source said while nobody listened is gone, and the clients must know.
                        reason = "the connector moved to another node: events in between lost"
                        with contextlib.suppress(Exception):
                            await self.publish_gap(Gap(name, reason))
                    elif count > 1 and not connector.before_images:
                        reason = (
                            "the connector moved to another node, which does not know which rows "
                            "this filter room holds: reload"
                        )
                        with contextlib.suppress(Exception):
                            await self.publish_held_gap(Gap(name, reason))
                    yield
                finally:
                    self._leases.pop(name, None)
                    self._index.pop(name, None)
                    self._routed.pop(name, None)
                    # The numbers this reading published: a later reading's snapshots must not
                    # take them for the rooms' (after Redis lost them, a new epoch counts from 1).
                    prefix = f"{name}:"
                    for room in [r for r in self._last_seq if r.startswith(prefix)]:
                        del self._last_seq[room]
                    connector.settle_with(None)
                    gone = self._batchers.pop(name, None)
                    if gone is not None and not gone.close():
                        # It moved on past what was not published: from the saved position.
                        connector.forget_unsaved()
                    if self.readers.get(name) == self.node:
                        self._set_reader(name, None)
                    renewer.cancel()
                    with contextlib.suppress(BaseException):
                        await renewer
        except TimeoutError:
            if lost:
                raise ClusterError(f"lease on {name!r} lost: {lost[0]}") from None
            if failed:
                raise ClusterError(failed[0]) from None
            raise
        finally:
            if not lost:
                released = dumps({"t": "released", "c": name})
                release = self._release(name, holder, released)
                if failed:
                    # A publication went unanswered: Redis is likely out of reach, and the
                    # release would wait its own answer timeout before the hub could show the
                    # connector down with the reason, its clients reading "stopped" meanwhile
                    # (5 s at the default lease, behind a network partition). It goes on alone;
                    # it deletes the lease only while it is still this reading's.
                    self.hub._spawn(release)
                else:
                    await release

    async def _release(self, name: str, holder: str, released: bytes) -> None:
        with contextlib.suppress(Exception):
            await self._script("RELEASE", [self.lease_key(name)], [holder, self.control, released])

    async def _acquire(self, connector: Connector) -> tuple[str, str, float]:
        """Take the connector's lease, waiting for as long as another node holds it; returns
        the holder, the fencing token and when (`time.monotonic`) the winning call was sent: the
        lease runs from no earlier than that (`_renew`).

        A waiting node asks again when the holder's lease would run out (the PTTL the script
        answers with), or at once when the holder says it let go (a "released" message on the
        control channel, `lease_released`): a takeover follows a dead reader's expiry to the
        millisecond, a clean handover takes a round trip, and a waiting node costs Redis one
        call per renewal period rather than one or two a second. While Redis cannot be
        reached, it asks every `lease / 10` seconds (at most 1).
        """
        name = connector.name
        interval = max(0.05, min(1.0, self.config.lease / 10))
        lease_ms = int(self.config.lease * 1000)
        wake = self._lease_wakes.setdefault(name, asyncio.Event())
        shown = ""
        failed = 0
        while True:
            wake.clear()  # before asking: a release said while the answer travels still wakes
            wait = interval
            if self.name_taken is not None:  # freed: `_claim_name` wakes this wait
                shown = ""
                connector.set_status(State.DOWN, self.name_taken)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.config.lease):
                        await wake.wait()
                continue
            try:
                asked = time.monotonic()
                reply = await self._script(
                    "ACQUIRE",
                    [self.lease_key(name), self.fence_key(name)],
                    [self.node, lease_ms, secrets.token_hex(8)],
                )
                if not isinstance(reply, list):
                    token = reply.decode() if isinstance(reply, bytes) else str(reply)
                    return f"{self.node}|{token}", token, asked
                failed = 0
                current, left_ms = reply
                reader = current.decode().rsplit("|", 1)[0] if current else None
                self._set_reader(name, reader)
                if reader and reader != shown:
                    shown = reader
                    await self._mirror_status(connector, reader)
                if isinstance(left_ms, int) and left_ms > 0:
                    wait = min(left_ms / 1000, self.config.lease) + LEASE_MARGIN
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                shown = ""
                failed += 1
                if refused_by_script(exc):  # Redis answered: no outage, the data is not ours
                    if connector.status.detail != self._refusal(exc):  # said once
                        connector.set_status(State.DOWN, self._refusal(exc))
                # With the listener connected, one failed call is most likely a pooled
                # connection from before a Redis restart (redis-py finds it closed on use): the
                # next call opens a new one. Shown as down from the second in a row.
                elif not self.up or failed > 1:
                    self._show_unreachable(connector, one_line(exc))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await wake.wait()

    def _refusal(self, exc: Exception) -> str:
        return (
            f"cluster Redis refused the lease script ({one_line(exc)}): keys under prefix "
            f"{self.config.prefix!r} were written by another program, or by a feed build whose "
            "cluster data differs from this one's (docs/operations.md, Upgrading)"
        )

    def lease_released(self, name: str | None = None) -> None:
        """Wake the nodes' waits for a lease (`name`'s, or every one): its holder let go, or
        Redis is back and whatever it lost should be taken again now."""
        for connector, wake in self._lease_wakes.items():
            if name is None or connector == name:
                wake.set()

    async def _renew(
        self, name: str, holder: str, asked: float, deadline: asyncio.Timeout, lost: list[str]
    ) -> None:
        """Renew the lease every third of `lease`; end the reading (`deadline`) once it may be
        about to run out in Redis without a renewal confirmed.

        The lease is counted from when the last successful call was *sent* (Redis set its expiry
        at some moment after that), and the reading ends `lease / 6` before it, whatever the
        calls meanwhile are doing: a renewal that goes unanswered (Redis out of reach behind a
        network partition that drops packets, with no connection closed) is given up at that
        moment, not when the connection's own answer timeout fires. Before, a reader cut off
        from Redis waited for that timeout (`max(2, lease / 2)`) and then slept a third of the
        lease before trying again, so it went on reading its source up to `lease * 2/3 + 2 *
        answer` after its last renewal: several seconds after another node had taken the
        connector over (fencing kept it from publishing, but both read the source, and the
        old one held the Postgres advisory lock the new one waited for).
        """
        lease = self.config.lease
        lease_ms = int(lease * 1000)
        margin = lease / 6
        valid_until = asked + lease
        due = asked + lease / 3
        while True:
            await asyncio.sleep(max(0.0, min(due, valid_until - margin) - time.monotonic()))
            sent = time.monotonic()
            left = valid_until - margin - sent
            try:
                if left <= 0:
                    raise TimeoutError
                async with asyncio.timeout(left):
                    still = await self._script("RENEW", [self.lease_key(name)], [holder, lease_ms])
            except asyncio.CancelledError:
                raise
            except TimeoutError:
                lost.append(
                    f"no renewal confirmed by Redis in {lease - margin:g} s: it may expire there"
                    " before this node hears back"
                )
            except Exception as exc:
                if time.monotonic() < valid_until - margin:
                    due = time.monotonic() + min(lease / 10, 1.0)  # soon again, not a third later
                    continue
                lost.append(f"cannot renew it: {one_line(exc)}")
            else:
                if still == 1:
                    valid_until = sent + lease
                    due = sent + lease / 3
                    continue
                lost.append(
                    "another node holds it now"
                    if still == 0
                    else "Redis no longer has it (it expired, or Redis lost its data)"
                )
            log.warning("%s: lease on %s lost (%s)", self.node, name, lost[0])
            deadline.reschedule(asyncio.get_running_loop().time())
            return

    # -- the node's name: one process per name ------------------------------------------------

    async def _claim_name(self) -> None:
        """Hold this node's name in Redis for `lease` seconds (renewed by the upkeep loop).

        Leases, statuses and each node's inbox go by the name: a second process given the same
        `node` would never read (it takes the reader's name for its own), and snapshot answers
        meant for one would reach both. So while another process holds the name, this one says
        so and takes no lease (`_acquire`); it goes on once the name is free, a lease's time
        after the other stopped at the latest.
        """
        ms = int(self.config.lease * 1000)
        ours = await self._script("NAME", [self.name_key()], [self.instance, ms, 1])
        if ours:  # and the cluster format it reads, for the readers (`_check_formats`)
            await self.redis.hset(self.nodes_key, self.node, self.format)
            if self.name_taken is not None:
                log.info("%s: this node's name is its own again", self.node)
                self.name_taken = None
                self.lease_released()
            return
        if self.name_taken is None:
            self.name_taken = (
                f"another feed process on this cluster is named {self.node!r} (a node still"
                f" running, or one that stopped less than {self.config.lease:g} s ago): give each"
                " node its own [cluster] node, or leave it out (the host name and process id)"
            )
            log.error("%s: %s", self.node, self.name_taken)

    async def _forget_name(self) -> None:
        with contextlib.suppress(Exception):
            await self._script("NAME", [self.name_key()], [self.instance, 0, 0])
            await self.redis.hdel(self.nodes_key, self.node)

    async def _check_formats(self) -> None:
        """At a reader: say once which nodes announce an older cluster format than this node
        writes (they cannot read all of it: the roll is not finished), and how many nodes
        announce none (builds from before the format stamp: every node, whatever its build,
        subscribes to the control channel, so its subscribers beyond the nodes that announce a
        format are such nodes). Entries of nodes whose name lapsed are dropped."""
        entries = await self.redis.hgetall(self.nodes_key)
        names = [n.decode() for n in entries]
        async with self.redis.pipeline(transaction=False) as pipe:
            for node in names:
                pipe.exists(self.name_key(node))
            pipe.pubsub_numsub(self.control)
            *alive, numsub = await pipe.execute()
        gone = [node for node, live in zip(names, alive, strict=True) if not live]
        if gone:
            await self.redis.hdel(self.nodes_key, *gone)
        older: dict[str, int] = {}
        for (node, raw), live in zip(entries.items(), alive, strict=True):
            theirs = announced(int(raw) if raw.isdigit() else None)
            if live and theirs < self.format:
                older[node.decode()] = theirs
        for node, theirs in older.items():
            if self.older_nodes.get(node) != theirs:
                log.warning(
                    "%s: node %s reads cluster format %d, this reader writes %d: it cannot read"
                    " all of what it receives; finish the rolling upgrade",
                    self.node, node, theirs, self.format,
                )  # fmt: skip
        self.older_nodes = older
        subscribers = int(numsub[0][1]) if numsub else 0
        silent = max(0, subscribers - (len(names) - len(gone)))
        previous, self._silent_last = self._silent_last, silent
        if silent != previous:  # seen twice running only: a node just started subscribes
            return  # before it announces its format
        if silent and silent != self.silent_nodes:
            log.warning(
                "%s: %d node(s) on this cluster announce no cluster format (a build from before"
                " the format stamp, which may not read all this reader writes; or another client"
                " subscribed to %s), this reader writes format %d: finish the rolling upgrade",
                self.node, silent, self.control.decode(), self.format,
            )  # fmt: skip
        self.silent_nodes = silent

    async def _mirror_status(self, connector: Connector, reader: str) -> None:
        raw = await self.redis.hget(self.status_key, connector.name)
        if raw:
            self._apply_status(connector.name, loads(raw))
        else:
            connector.set_status(State.STARTING, f"read by {reader}")

    def _apply_status(self, name: str, body: Mapping[str, Any]) -> None:
        connector = self.hub.connectors.get(name)
        reader = body.get("reader")
        # Its own word coming back (through the control channel, or the hash after a
        # reconnect) says nothing new, and may be older than what it shows since its reading
        # ended: a "stopped" echo arriving after the "down" that said why.
        if connector is None or name in self._leases or reader == self.node:
            return
        self._set_reader(name, reader if isinstance(reader, str) else None)
        detail = str(body.get("detail", ""))
        theirs = announced(body.get("format"))
        if theirs > self.format:
            # Its rooms' messages may be ones this build cannot read: not "up" as if all were
            # well, but down with what to do, until the roll is finished or an older node reads.
            ahead = reader_ahead(str(reader), theirs, self.format)
            if self.format_behind.get(name) != ahead:
                log.warning("%s: connector %s: %s", self.node, name, ahead)
                self.format_behind[name] = ahead
            state = str(body.get("state", "down"))
            says = "" if state == State.UP else f" (the reader says: {state}: {detail})"
            connector.set_status(State.DOWN, ahead + says)
        else:
            self.format_behind.pop(name, None)
            connector.set_status(State(body.get("state", "down")), detail)
        self._compare_targets(connector, str(reader), body.get("targets"))
        digest = body.get("schema")
        if isinstance(digest, str) and self._schemas.get(name) != digest:
            self._schemas[name] = digest
            self.hub._spawn(self._adopt_schema(connector))

    async def _adopt_schema(self, connector: Connector) -> None:
        """Take the reader's filter schema (`Connector.filter_schema`), so that a filter it
        would refuse is refused here too, not accepted to match nothing."""
        try:
            raw = await self.redis.hget(self.schema_key, connector.name)
            if raw is None:
                raise LookupError("not shared yet")
            connector.adopt_filter_schema(loads(raw))
        except Exception as exc:
            self._schemas.pop(connector.name, None)  # asked again with the next status
            log.debug("%s: no filter schema for %s yet: %s", self.node, connector.name, exc)

    def _compare_targets(self, connector: Connector, reader: str, theirs: Any) -> None:
        """Say so when the reader's config gives the connector other targets than this node's
        (a config rolled out node by node): a room of a target only this node has gets nothing
        until a node with this config reads the connector, and that must not go unnoticed."""
        name = connector.name
        ours = connector.configured_targets()
        if not isinstance(theirs, list) or theirs == ours:
            self.differing.pop(name, None)
            return
        differs = (
            f"{reader} reads {name!r} with other targets than this node's config: only here"
            f" {sorted(set(ours) - set(theirs))}, only there {sorted(set(theirs) - set(ours))};"
            " rooms of a target the reader lacks get no changes until a node with this config"
            " reads it (run every node with the same config)"
        )
        if self.differing.get(name) != differs:
            log.warning("%s: %s", self.node, differs)
            self.differing[name] = differs

    def status_changed(self, status: Status) -> None:
        """The reader shares its connector's status with every node."""
        if status.connector not in self._leases or self.redis is None:
            return
        self.hub._spawn(self._share_status(status.connector))

    async def _share_status(self, name: str) -> None:
        """The reader's connector to every node: its status, this node's name, the targets
        its config gives it (`_compare_targets`), the cluster format it writes (`_apply_status`)
        and the digest of its filter schema (the schema itself written beside it when it
        changed: `_adopt_schema`)."""
        with contextlib.suppress(Exception):
            connector = self.hub.connectors[name]
            body: dict[str, Any] = {
                **connector.status.to_json(),
                "reader": self.node,
                "targets": connector.configured_targets(),
                "format": self.format,
            }
            schema = connector.filter_schema()
            text = dumps(schema) if schema else None
            digest = hashlib.sha1(text).hexdigest()[:16] if text else None
            if digest is not None:
                body["schema"] = digest
            async with self.redis.pipeline(transaction=False) as pipe:
                if text is not None and self._schemas.get(name) != digest:
                    pipe.hset(self.schema_key, name, text)
                pipe.hset(self.status_key, name, dumps(body))
                pipe.publish(self.control, dumps({"t": "status", "c": name, "s": body}))
                await pipe.execute()
            if digest is not None:
                self._schemas[name] = digest

    def _set_reader(self, name: str, reader: str | None) -> None:
        """Note who reads `name` now; a change is told to this node's clients with the status,
        even when the state stays the same (a handover from one "up" reader to another)."""
        if self.readers.get(name) != reader:
            self.readers[name] = reader
            self.hub.reader_changed(name)

    def reader_of(self, name: str) -> str | None:
        return self.readers.get(name)


def refused_by_script(exc: BaseException) -> bool:
    """An error raised by Redis running a script on data it did not expect (a WRONGTYPE, an
    INCR of a value that is not a number), as opposed to Redis being out of reach."""
    import redis.exceptions

    return isinstance(exc, redis.exceptions.ResponseError) and "script" in str(exc)
