"""The cluster reader's upkeep with many row and filter rooms registered: its idle CPU.

    python -m bench.registry                   # 1,000, 10,000 and 50,000 filter rooms
    python -m bench.registry --rooms 100000 --seconds 30

One feed node of a cluster (a private Redis) reads the memory connector; N per-user filter
rooms (`user_id=eq.<i>`) are registered in Redis as member nodes register them, and once the
reader routes them all, its CPU is read over a window in which nothing changes. What it spends
then is the registry upkeep: every `lease / 4` seconds (2.5 by default) it brings its routing
index in line with the registry.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from bench.fanout import Server

PREFIX = "bench"  # the [cluster] prefix bench.fanout gives a "feed-cluster" server
TARGET = "t0"


async def register(url: str, count: int) -> None:
    """Register `count` filter rooms of `mem:t0` as nodes with members would."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    expiry = int((time.time() + 3600) * 1000)
    try:
        for start in range(0, count, 10_000):
            async with client.pipeline(transaction=False) as pipe:
                for i in range(start, min(count, start + 10_000)):
                    name = f"mem:{TARGET}?user_id=eq.{i}"
                    spec = {"name": name, "connector": "mem", "target": TARGET,
                            "key": None, "filter": f"user_id=eq.{i}"}  # fmt: skip
                    pipe.hset(f"{PREFIX}:rooms:mem", name, json.dumps(spec))
                    pipe.zadd(f"{PREFIX}:live:mem", {name: expiry})
                await pipe.execute()
    finally:
        await client.aclose()


def upkeep(count: int, seconds: float) -> float:
    """The reader's CPU, % of one core, with `count` rooms registered and nothing changing."""
    server = Server("feed-cluster", [TARGET])
    try:
        asyncio.run(register(server.redis.url, count))
        time.sleep(8.0)  # the next re-reads route them (the first reads every spec once)
        before = server.usage().cpu
        time.sleep(seconds)
        return 100 * (server.usage().cpu - before) / seconds
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.registry")
    parser.add_argument("--rooms", default="1000,10000,50000", help="comma-separated")
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    for count in (int(n) for n in args.rooms.split(",")):
        share = upkeep(count, args.seconds)
        print(f"{count} filter rooms registered: reader idle at {share:.1f}% of a core", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
