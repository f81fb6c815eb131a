"""Snapshots over Redis: taken by the reader, on request from the node whose client asked.

Only the reader runs the connector, so another node asks it through its inbox channel. The
reader routes the room first, takes the snapshot and answers which of the room's seqs the rows do
not reflect yet (`SnapshotPlan`), so the asking node replays exactly those: nothing lost or
doubled between snapshot and live.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from connectors.base import RoomAddress, Where
from feed.core.change import Change, to_json
from feed.core.filter_index import UNSURE
from feed.core.rooms import Room
from feed.engine.lease import Leases
from feed.engine.routes import room_spec
from feed.engine.wire import dumps, loads, one_line
from feed.errors import FeedError, ProtocolError, SnapshotNotSupported

SNAPSHOT_TIMEOUT = 30.0
INLINE_ANSWER_BYTES = 256 * 1024
"""Largest answer the reader publishes to the asking node's inbox itself. A larger one is left
in a key (`<prefix>:answer:<id>`, expiring after SNAPSHOT_TIMEOUT) and only its name published:
Redis cuts a subscriber whose output buffer passes `client-output-buffer-limit pubsub` (32 MB,
or 8 MB for a minute, by default), and that connection carries every room the node relays."""

ASK_AGAIN_PAUSE = 0.2
"""Seconds between two requests asked again while the reader does not listen: a blip that cut
this node's pub/sub connection cut the reader's too, and it reconnects as fast (0.2 s)."""

log = logging.getLogger("feed.engine")


@dataclass
class SnapshotPlan:
    """What a cluster snapshot's rows already reflect: every seq up to `upto` but `uncovered`."""

    upto: int
    uncovered: frozenset[int]

    def keeps(self, seq: int) -> bool:
        return seq > self.upto or seq in self.uncovered


class Snapshots(Leases):
    """Asking the reader for a snapshot, and answering such requests at the reader."""

    # -- snapshots, taken by the reader --------------------------------------------------------

    async def _snapshot(self, room: Room, address: RoomAddress) -> dict[str, Any]:
        request = {
            "t": "snapshot",
            "spec": room_spec(room),
            "target": address.target,
            "key": address.key,
            "limit": self.hub.settings.snapshot_limit,
            "stored": True,  # a large answer may be left in a key (an older reader ignores this)
        }
        reader = self.readers.get(room.connector)
        if room.connector in self._leases:
            answer = await self._take_snapshot(request)
        elif not reader:
            raise ProtocolError(
                "snapshot_failed", f"no node is reading connector {room.connector!r} right now"
            )
        else:
            answer = await self._ask(reader, request)
        if not answer.get("ok"):
            code = str(answer.get("code", "snapshot_failed"))
            raise ProtocolError(code, str(answer.get("message", "snapshot failed")))
        return answer

    async def _ask(self, node: str, request: dict[str, Any]) -> dict[str, Any]:
        """Ask `node` (the reader) and wait for its answer, which comes to this node's inbox
        over its pub/sub connection. An answer on its way when that connection was lost is
        lost with it (Redis keeps nothing for a channel nobody follows): the request is asked
        again once the connection is back, within the same SNAPSHOT_TIMEOUT. It used to wait
        the whole 30 s for it, then fail; a client gave up at its own 10 s and asked again."""
        try:
            async with asyncio.timeout(SNAPSHOT_TIMEOUT):
                again = False
                while True:
                    # A reply can only arrive over a connection that follows the inbox.
                    await self._connected.wait()
                    answer = await self._ask_once(node, request, again)
                    if answer is not None:
                        break
                    if again:  # the reader's own connection is not back yet (a blip cuts all)
                        await asyncio.sleep(ASK_AGAIN_PAUSE)
                    again = True
            stored = answer.get("stored")
            if isinstance(stored, str):
                body = await self.redis.getdel(stored)
                if body is None:
                    raise ProtocolError(
                        "snapshot_failed", "the reading node's answer expired before it was read"
                    )
                answer = dict(loads(body))
            return answer
        except TimeoutError:
            raise ProtocolError(
                "snapshot_failed", f"the reading node {node} did not answer in time"
            ) from None
        except ProtocolError:
            raise
        except Exception as exc:
            raise ProtocolError("snapshot_failed", f"snapshot failed: {one_line(exc)}") from None

    async def _ask_once(
        self, node: str, request: dict[str, Any], again: bool
    ) -> dict[str, Any] | None:
        """One request and its answer; None when the pub/sub connection was lost meanwhile
        (`_replies_lost`), or, asking `again`, when the reader does not listen yet."""
        ident = secrets.token_hex(8)
        future: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        self._replies[ident] = future
        try:
            inbox = f"{self._p}:node:{node}"
            body = {**request, "id": ident, "reply": self.inbox.decode()}
            receivers = await self.redis.publish(inbox, dumps(body))
            if not receivers:
                if again:
                    return None
                raise ProtocolError("snapshot_failed", f"the reading node {node} is not listening")
            return await future
        finally:
            self._replies.pop(ident, None)

    def _replies_lost(self) -> None:
        """The pub/sub connection is gone, and with it any answer on its way: every request
        waiting for one is asked again (`_ask`)."""
        for future in self._replies.values():
            if not future.done():
                future.set_result(None)

    async def _on_inbox(self, body: Mapping[str, Any]) -> None:
        if body.get("t") == "reply":
            future = self._replies.get(str(body.get("id")))
            if future is not None and not future.done():
                future.set_result(dict(body))
            return
        if body.get("t") == "snapshot":
            self.hub._spawn(self._answer_snapshot(dict(body)))

    async def _answer_snapshot(self, request: dict[str, Any]) -> None:
        answer = await self._take_snapshot(request)
        answer.update(t="reply", id=request.get("id"))
        body = dumps(answer)
        with contextlib.suppress(Exception):
            if request.get("stored") is True and len(body) > INLINE_ANSWER_BYTES:
                key = f"{self._p}:answer:{secrets.token_hex(8)}"
                await self.redis.set(key, body, px=int(SNAPSHOT_TIMEOUT * 1000))
                body = dumps({"t": "reply", "id": request.get("id"), "stored": key})
            await self.redis.publish(str(request["reply"]), body)

    async def _take_snapshot(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """At the reader: route the room from now on, snapshot, say which seqs rows miss."""
        spec = request["spec"]
        name = str(spec["name"])
        connector = self.hub.connectors.get(str(spec.get("connector")))
        if connector is None or connector.name not in self._leases:
            return {"ok": False, "code": "snapshot_failed", "message": "not the reading node"}
        routed = self._route_spec(spec)
        if routed is None:
            return {"ok": False, "code": "snapshot_failed", "message": "bad room"}
        watch: list[tuple[int, Change]] = []
        self._watching[name] = watch
        address = RoomAddress(str(request["target"]), request.get("key"))
        index = self._target_index(connector.name, address.target)
        # A source without before images: which rows left the room while it was read
        # (feed.core.filter_index.SnapshotWatch; a filter room only, as on a single node).
        leaving = index.filtered.watch(name)
        try:
            try:
                snapshot = await asyncio.wait_for(
                    connector.snapshot(address, Where(routed.filter), int(request["limit"])),
                    SNAPSHOT_TIMEOUT,
                )
            finally:
                index.filtered.unwatch(leaving)
            # The rows the room holds. One that left meanwhile was published before the room
            # held it, to no one: the asker's client is told to reload (a gap) rather than
            # keep it; a single node sends that change itself (Hub.subscribe).
            leavers = index.filtered.settle(leaving, snapshot.keys, snapshot.covers)
            batcher = self._batchers.get(connector.name)
            if batcher is not None:  # what the stream yielded before the snapshot: numbered
                await asyncio.wait_for(batcher.drain(), SNAPSHOT_TIMEOUT)
            upto = self._last_seq.get(name)
            if upto is None:  # not published to in this reading: the number earlier ones left
                upto = int(await self.redis.hget(self.meta_key(name), "seq") or 0)
            uncovered = [s for s, change in watch if not snapshot.covers(change)]
            answer: dict[str, Any] = {
                "ok": True,
                "rows": [to_json(r) for r in snapshot.rows],
                "keys": list(snapshot.keys) if snapshot.keys is not None else None,
                "truncated": snapshot.truncated,
                "upto": upto,
                "uncovered": uncovered,
            }
            if leavers is None:
                answer["gap"] = UNSURE
            elif leavers:
                answer["gap"] = "a row of the snapshot left the room while it was read"
            return answer
        except SnapshotNotSupported as exc:
            return {"ok": False, "code": "snapshot_unsupported", "message": str(exc)}
        except (FeedError, TimeoutError, OSError) as exc:
            return {
                "ok": False,
                "code": "snapshot_failed",
                "message": f"snapshot failed: {str(exc) or f'no answer within {SNAPSHOT_TIMEOUT:g}s'}",
            }
        except Exception:
            # A connector's bug: logged here, once, and answered, where it used to escape the
            # spawned task ("Task exception was never retrieved") and leave the asking node
            # waiting SNAPSHOT_TIMEOUT for a reply that never came.
            log.exception("snapshot of %s failed", name)
            return {"ok": False, "code": "snapshot_failed", "message": "snapshot failed: internal"}
        finally:
            if self._watching.get(name) is watch:
                del self._watching[name]
