"""Subscribe to feed rooms and print every change, resuming where it stopped after a reconnect.

    pip install python-socketio aiohttp        # (both come with the feed itself)
    python examples/python_client.py --room main:public.orders
    python examples/python_client.py --room main:public.orders --filter 'status=eq.paid'
    python examples/python_client.py --url http://127.0.0.1:8000 --room cache:session:* --count 5

The parts worth copying: handle both `change` and `changes` (a list, in order), remember the
last `seq` per room and the server's `epoch`, and on every (re)connect subscribe again with
`since` and `epoch`. The server then re-sends what was missed (`recovered: true`) or says that it
cannot (`recovered: false`: reload your data). Duplicates are dropped by `seq`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

import socketio


class Follower:
    def __init__(self, rooms: list[str], filter: str | None, count: int | None) -> None:
        self.wanted = rooms
        self.filter = filter
        self.count = count
        self.printed = 0
        self.epoch: str | None = None
        self.canonical: dict[str, str] = {}  # requested room -> the server's canonical name
        self.last_seq: dict[str, int] = {}  # canonical room -> last seq printed
        self.done = asyncio.Event()
        self.sio = socketio.AsyncClient(reconnection=True, reconnection_delay=0.5)
        self.sio.on("connect", self.on_connect)
        self.sio.on("disconnect", self.on_disconnect)
        self.sio.on("change", self.on_change)
        self.sio.on("changes", self.on_changes)
        self.sio.on("gap", self.on_gap)
        self.sio.on("status", self.on_status)

    async def on_connect(self) -> None:
        # Subscribe from a task: the acks arrive as messages this handler would otherwise block.
        self.sio.start_background_task(self.subscribe_all)

    async def subscribe_all(self) -> None:
        for room in self.wanted:
            request: dict[str, Any] = {"room": room}
            if self.filter:
                request["filter"] = self.filter
            canonical = self.canonical.get(room)
            if canonical in self.last_seq and self.epoch:
                request["since"] = self.last_seq[canonical]
                request["epoch"] = self.epoch
            ack = await self.sio.call("subscribe", request, timeout=10)
            if not ack.get("ok"):
                error = ack.get("error", {})
                print(f"subscribe {room}: {error.get('code')}: {error.get('message')}", flush=True)
                self.done.set()
                return
            canonical = self.canonical[room] = ack["room"]
            if ack.get("recovered") is not True:
                if "since" in request:
                    print(f"resume {canonical}: missed changes, reload your data", flush=True)
                if ack.get("epoch") != self.epoch:
                    self.last_seq[canonical] = ack["seq"]  # a new server run numbers afresh
                else:
                    self.last_seq[canonical] = max(self.last_seq.get(canonical, 0), ack["seq"])
            state = {None: "subscribed", True: "resumed", False: "subscribed again"}
            print(f"{state[ack.get('recovered')]} {canonical} at seq {ack['seq']}", flush=True)
        # One server run for all rooms: remember its epoch once every room has answered.
        self.epoch = ack.get("epoch")

    async def on_disconnect(self, *reason: Any) -> None:
        if not self.done.is_set():
            print("disconnected; reconnecting ...", flush=True)

    async def on_change(self, change: dict[str, Any]) -> None:
        room, seq = change["room"], change["seq"]
        if seq <= self.last_seq.get(room, -1):
            return  # already printed (a resend after a resume)
        self.last_seq[room] = seq
        image = change["after"] if change["after"] is not None else change["before"]
        print(
            f"{change['op']:<7} {room} #{seq} key={json.dumps(change['key'])} {json.dumps(image)}",
            flush=True,
        )
        self.printed += 1
        if self.count is not None and self.printed >= self.count:
            self.done.set()

    async def on_changes(self, changes: list[dict[str, Any]]) -> None:
        for change in changes:
            await self.on_change(change)

    async def on_gap(self, gap: dict[str, Any]) -> None:
        print(f"gap     {gap.get('room')}: {gap.get('reason')} (reload your data)", flush=True)

    async def on_status(self, status: dict[str, Any]) -> None:
        print(f"status  {status['connector']} is {status['state']} {status['detail']}", flush=True)


async def main() -> int:
    parser = argparse.ArgumentParser(description="Print changes from a dbfeed server.")
    parser.add_argument("--url", default=os.environ.get("FEED_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--room", action="append", help="room to follow (repeatable)")
    parser.add_argument("--filter", help="PostgREST-style filter, e.g. status=eq.paid")
    parser.add_argument("--token", default=os.environ.get("FEED_TOKEN"), help="auth token")
    parser.add_argument("--count", type=int, help="exit after printing this many changes")
    args = parser.parse_args()

    follower = Follower(args.room or ["main:public.orders"], args.filter, args.count)
    auth = {"token": args.token} if args.token else None
    try:
        await follower.sio.connect(args.url, auth=auth, transports=["websocket"], wait_timeout=10)
    except socketio.exceptions.ConnectionError as exc:
        print(f"cannot connect to {args.url}: {exc}", file=sys.stderr)
        return 1
    try:
        await follower.done.wait()
    finally:
        await follower.sio.disconnect()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except KeyboardInterrupt:
        sys.exit(130)
