"""The reader's cost of saving its position by count (`save_every`): one large transaction drained.

    python -m bench.postgres_saves --url postgresql://postgres@127.0.0.1:5432/mydb
    python -m bench.postgres_saves --url ... --mode logical --rows 100000 --rounds 3

Fills a table `bench_saves` in the given database with `--rows` rows, then, for each setting
and round, starts a Postgres connector, updates every row in one transaction and drains the
connector's `changes()` straight (no hub, no clients), timing it. A `save_every` of 10^9 stands
for the saves by time only that came before `save_every` (`save_interval`, 0.5 s). It also
reports how many saves came half way through the transaction and the time spent in them, which
is steadier than the rates on a shared machine. The table and the connector's objects are left
in the database: give it one of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from connectors import postgres, postgres_logical
from feed.options import Options

TIME_ONLY = 10**9
SPENT = {"saves": 0.0, "seconds": 0.0}


def timed(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        finally:
            SPENT["saves"] += 1
            SPENT["seconds"] += time.perf_counter() - started

    return wrapper


async def drain(url: str, mode: str, rows: int, every: int) -> float:
    """Seconds from the UPDATE's start to its last change handed on."""
    options = {"dsn": url, "tables": ["public.bench_saves"], "mode": mode, "auto_migrate": True}
    connector = postgres.PostgresConnector("bench_saves", Options(options, "bench"))
    connector.save_every = every  # past the config's ceiling for TIME_ONLY
    conn = await asyncpg.connect(url)
    await connector.start()
    stream = connector.changes()
    try:
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(1.0)  # the reader is polling
        started = time.perf_counter()
        await conn.execute("UPDATE bench_saves SET n = n + 1")
        await first
        for _ in range(rows - 1):
            await anext(stream)
        return time.perf_counter() - started
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
        await connector.stop()
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="a database of the benchmark's own")
    parser.add_argument("--mode", choices=["notify", "logical"], default="notify")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--every", default=f"{TIME_ONLY},2000", help="save_every values, comma-separated"
    )
    args = parser.parse_args()
    settings = [int(x) for x in args.every.split(",")]
    for owner, name in (
        (postgres.PostgresConnector, "_save_half_way"),
        (postgres_logical.LogicalReader, "_save_partial"),
    ):
        setattr(owner, name, timed(getattr(owner, name)))
    conn = await asyncpg.connect(args.url)
    await conn.execute("DROP TABLE IF EXISTS bench_saves")
    await conn.execute("CREATE TABLE bench_saves (id int PRIMARY KEY, n int, pad text)")
    await conn.execute(
        "INSERT INTO bench_saves SELECT g, 0, repeat('x', 60) FROM generate_series(1, $1) g",
        args.rows,
    )
    await conn.close()
    rates: dict[int, list[float]] = {every: [] for every in settings}
    for round_ in range(args.rounds):
        for every in settings:  # interleaved, so drift falls on every setting alike
            SPENT.update(saves=0, seconds=0.0)
            took = await drain(args.url, args.mode, args.rows, every)
            rates[every].append(args.rows / took)
            print(
                f"round {round_} save_every={every}: {args.rows / took:,.0f} changes/s, "
                f"{SPENT['saves']:.0f} saves half way, {SPENT['seconds'] * 1000:.0f} ms in them",
                flush=True,
            )
    for every, got in rates.items():
        print(
            f"{args.mode} save_every={every}: median {statistics.median(got):,.0f} changes/s "
            f"(all: {', '.join(f'{x:,.0f}' for x in sorted(got))})"
        )


if __name__ == "__main__":
    asyncio.run(main())
