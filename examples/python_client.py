"""Subscribe to feed rooms and print every change, resuming where it stopped after a reconnect.

    pip install ./clients/python              # dbfeed-client (`make setup` installs it in .venv)
    python examples/python_client.py --room main:public.orders
    python examples/python_client.py --room main:public.orders --filter 'status=eq.paid'
    python examples/python_client.py --url http://127.0.0.1:8000 --room cache:session:* --count 5

The resume logic (both `change` and `changes`, the last `seq` and `epoch` of each room, the
resubscribe after every reconnect, duplicates, `recovered` or `reload`) lives in the client
library, dbfeed_client (clients/python, docs/clients.md); this file only prints what it reports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from typing import Any

from dbfeed_client import FeedClient, FeedError, SubscribeError, Subscription


def show_state(sub: Subscription, state: str, info: dict[str, Any]) -> None:
    if state == "live":
        print(f"live    {sub.room} at seq {sub.seq}", flush=True)
    elif state == "recovered":
        print(f"resumed {sub.room}: {info['replayed']} missed change(s) replayed", flush=True)
    elif state == "reload":
        print(f"reload  {sub.room}: {info['reason']} (reload your data)", flush=True)


def show_change(change: dict[str, Any]) -> None:
    image = change["after"] if change["after"] is not None else change["before"]
    key = json.dumps(change["key"])
    left = " (left the filter)" if change.get("left") else ""  # no longer matches: drop it
    print(
        f"{change['op']:<7} {change['room']} #{change['seq']} key={key} {json.dumps(image)}{left}",
        flush=True,
    )


async def follow(
    feed: FeedClient, room: str, filter: str | None, changes: asyncio.Queue[Any]
) -> None:
    sub = feed.subscribe(room, filter=filter)
    sub.on("state", lambda state, info: show_state(sub, state, info))
    try:
        async with sub:
            async for change in sub:
                await changes.put(change)
    except SubscribeError as exc:
        print(f"subscribe {room}: {exc.code}: {exc.message}", flush=True)
        raise


async def main() -> int:
    parser = argparse.ArgumentParser(description="Print changes from a dbfeed server.")
    parser.add_argument("--url", default=os.environ.get("FEED_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--room", action="append", help="room to follow (repeatable)")
    parser.add_argument("--filter", help="PostgREST-style filter, e.g. status=eq.paid")
    parser.add_argument("--token", default=os.environ.get("FEED_TOKEN"), help="auth token")
    parser.add_argument("--count", type=int, help="exit after printing this many changes")
    args = parser.parse_args()

    stopping = asyncio.Event()  # set when this script closes the connection itself

    def on_disconnect(reason: str) -> None:
        if not stopping.is_set():
            print("disconnected; reconnecting ...", flush=True)

    try:
        async with FeedClient(args.url, token=args.token) as feed:
            feed.on("disconnect", on_disconnect)
            feed.on(
                "status", lambda s: print(f"status  {s['connector']} is {s['state']}", flush=True)
            )
            feed.on("gap", lambda g: print(f"gap     {g['room']}: {g['reason']}", flush=True))
            changes: asyncio.Queue[Any] = asyncio.Queue()
            rooms = args.room or ["main:public.orders"]
            tasks = [asyncio.create_task(follow(feed, r, args.filter, changes)) for r in rooms]
            printed = 0
            following = set(tasks)
            try:
                while following and (args.count is None or printed < args.count):
                    getter = asyncio.create_task(changes.get())
                    done, _ = await asyncio.wait(
                        [getter, *following], return_when=asyncio.FIRST_COMPLETED
                    )
                    for task in done - {getter}:
                        following.discard(task)
                        task.result()  # a refused subscribe raises here
                    if getter in done:
                        show_change(getter.result())
                        printed += 1
                    else:
                        getter.cancel()
            finally:
                stopping.set()
                for task in tasks:
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
    except SubscribeError:
        return 1  # already said which room and why
    except FeedError as exc:
        print(f"cannot connect to {args.url}: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except KeyboardInterrupt:
        sys.exit(130)
