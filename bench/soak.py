"""The soak: a real `feed serve` (or two on one Redis) under churning clients for minutes, its
resources sampled, to find what grows slowly enough that only a feed running for days shows it.

    python -m bench.soak --minutes 10 [--cluster] [--sessions 30] [--rate 20] [--grace 10]
                         [--buffer 100] [--warmup 2] [--every 5] [--json out.json]

Runs `feed serve` with a Postgres connector on a database of its own (FEED_BENCH_POSTGRES_URL,
default the local server), with `--cluster` two nodes on the Redis at FEED_BENCH_REDIS_URL
(default redis://127.0.0.1:6379/0) under a key prefix of their own, deleted afterwards. A
writer commits steady changes (updates, inserts, deletes and re-inserts, some several to a
transaction); a client process (bench/soak_clients.py) runs sessions that connect, follow and
leave target, row and many distinct filter rooms, resume with `since`, take snapshots, stop
reading for a while and send hostile frames now and then.

Every `--every` seconds it samples each node's RSS, open file descriptors and, from /metrics,
asyncio tasks (`feed_tasks`), rooms by kind, clients, subscriptions and TCP connections; the
journal's rows and bytes, the positions table's bytes and the database's connections; with
`--cluster`, the keys under the prefix, their bytes (MEMORY USAGE) and the prefix's pub/sub
channels. After the warm-up it prints each series' first and last value, its range, and its
growth per minute over the whole measured window and over its second half: a series still
growing in the second half, at the same rate, is the one to look into. Then a sample from
before the first client and one from once every client has left and its rooms have expired
(in a cluster, with the keys left under the prefix by kind, and a row or filter room's with
its TTL): what a node still holds then, past what it held before, is what clients left behind.
Figures are reported, not judged: on a shared 2-core machine they move with the neighbours; a
leak shows as a trend that does not level off.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.cluster import free_port, rss_kib
from bench.servers import BENCH_LIMITS_TOML

ROOT = Path(__file__).parent.parent
METRIC = re.compile(r'^(feed_[a-z_]+)(?:\{kind="([a-z_]+)"[^}]*\}|\{[^}]*\})? (\S+)$', re.M)
NODE_SERIES = {
    "feed_tasks": "tasks",
    "feed_clients": "clients",
    "feed_subscriptions": "subscriptions",
    "feed_connections": "connections",
}
"""/metrics gauges sampled as they are (feed_rooms is split by kind)."""
ORDERS = 500
"""Rows of `orders` the writer keeps (ids 1..ORDERS; bench.soak_clients.ROWS)."""


def config(dsn: str, grace: float, buffer: int, redis_url: str | None, prefix: str) -> str:
    cluster = (
        f'[cluster]\nurl = "{redis_url}"\nprefix = "{prefix}"\nnode = "${{FEED_NODE}}"\n'
        if redis_url
        else ""
    )
    # A short journal retention, filter room grace and replay buffer, so that what they bound
    # is seen to level off within minutes (at the default 1,000 changes per room, a room that
    # gets 3 changes/s fills its buffer in 5.5 minutes: growth that is no leak); a small
    # outbound queue, so that slow readers are also cut off.
    return f"""
[server]
host = "127.0.0.1"
dashboard = false
log_level = "warning"
filter_room_grace = {grace}
replay_buffer = {buffer}

[limits]
outbound_queue_bytes = 262144
{BENCH_LIMITS_TOML}
{cluster}
[[connectors]]
name = "main"
type = "postgres"
dsn = "{dsn}"
tables = ["public.orders", "public.events"]
auto_migrate = true
journal_retention = 60
"""


INSTRUMENTED = bool(os.environ.get("BENCH_SOAK_OBJECTS") or os.environ.get("BENCH_SOAK_TRACE"))
"""Nodes run by bench/soak_node.py: their objects counted by type before the first client and
after the last has left (BENCH_SOAK_OBJECTS=1), and with BENCH_SOAK_TRACE a memory trace."""


@dataclass
class Node:
    name: str
    process: asyncio.subprocess.Process
    url: str
    log: Path

    async def count_objects(self) -> Counter[str]:
        """The node's live objects by type (bench/soak_node.py answers SIGUSR2)."""
        report = self.log.with_suffix(".trace.types")

        def lines() -> list[str]:
            return report.read_text().splitlines() if report.exists() else []

        had = len(lines())
        self.process.send_signal(signal.SIGUSR2)
        async with asyncio.timeout(60):
            while len(lines()) <= had:  # noqa: ASYNC110 - a file, no event to wait for
                await asyncio.sleep(0.2)
        return Counter(json.loads(lines()[-1]))


def grown(before: Counter[str], after: Counter[str], top: int = 12) -> dict[str, int]:
    """The types with more live objects after than before, most first."""
    more = {name: n - before.get(name, 0) for name, n in after.items()}
    return dict(sorted(((k, v) for k, v in more.items() if v > 0), key=lambda kv: -kv[1])[:top])


async def start_node(config_path: Path, name: str, logs: Path) -> Node:
    import aiohttp

    port = free_port()
    log = logs / f"{name}.log"
    command = ["-m", "feed"]
    if INSTRUMENTED:  # objects counted, memory traced (bench/soak_node.py)
        command = ["-m", "bench.soak_node", str(logs / f"{name}.trace")]
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, *command, "serve", "--config", str(config_path),
            "--port", str(port), stdout=out, stderr=out,
            env={**os.environ, "PYTHONPATH": str(ROOT), "FEED_NODE": name},
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http, asyncio.timeout(60):
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{url}/readyz") as response:
                    if response.status == 200:
                        return Node(name, process, url, log)
            if process.returncode is not None:
                raise RuntimeError(f"{name} exited: {log.read_text()[-2000:]}")
            await asyncio.sleep(0.2)


# -- the writer ----------------------------------------------------------------------------------


async def writer(dsn: str, rate: float, stop: asyncio.Event, counts: dict[str, int]) -> None:
    """Steady changes at `rate` transactions per second: mostly updates of the orders (their
    status, amount and user move rows in and out of filter rooms), inserts of events with the
    oldest deleted, an order deleted and inserted again, now and then ten updates at once."""
    import random

    import asyncpg

    rng = random.Random(7)
    conn = await asyncpg.connect(dsn)
    statuses = ["new", "paid", "shipped"]
    event = await conn.fetchval("SELECT coalesce(max(id), 0) FROM events")
    started, n = time.monotonic(), 0
    try:
        while not stop.is_set():
            pick = rng.random()
            order = rng.randint(1, ORDERS)
            note = "x" * rng.randrange(0, 1500)
            if pick < 0.7:
                await conn.execute(
                    "UPDATE orders SET status = $2, amount = $3, user_id = $4, note = $5"
                    " WHERE id = $1",
                    order, rng.choice(statuses), rng.randrange(1000), rng.randrange(200), note,
                )  # fmt: skip
            elif pick < 0.85:
                event += 1
                async with conn.transaction():
                    await conn.execute("INSERT INTO events VALUES ($1, $2)", event, note)
                    await conn.execute("DELETE FROM events WHERE id <= $1", event - 500)
            elif pick < 0.95:
                async with conn.transaction():
                    await conn.execute("DELETE FROM orders WHERE id = $1", order)
                    await conn.execute(
                        "INSERT INTO orders VALUES ($1, 'new', 0, $2, '')",
                        order,
                        rng.randrange(200),
                    )
            else:
                await conn.execute(
                    "UPDATE orders SET amount = amount + 1 WHERE id BETWEEN $1 AND $1 + 9", order
                )
            n += 1
            counts["transactions"] = n
            delay = started + n / rate - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await stop.wait()
    finally:
        await conn.close()


# -- sampling ------------------------------------------------------------------------------------


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def parse_metrics(text: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for name, kind, value in METRIC.findall(text):
        if name == "feed_rooms":
            values[f"rooms_{kind}"] = float(value)
        elif name in NODE_SERIES:
            values[NODE_SERIES[name]] = float(value)
        elif name == "feed_slow_clients_cut_total":
            values["slow_cut_total"] = float(value)
        elif name == "feed_client_errors_total":
            values["client_errors_total"] = values.get("client_errors_total", 0.0) + float(value)
    return values


@dataclass
class Samples:
    times: list[float] = field(default_factory=list)
    series: dict[str, list[float]] = field(default_factory=dict)

    def add(self, t: float, values: dict[str, float]) -> None:
        index = len(self.times)
        self.times.append(t)
        for name, value in values.items():
            column = self.series.setdefault(name, [])
            column.extend([float("nan")] * (index - len(column)))
            column.append(value)


async def sample(
    http: Any, nodes: list[Node], admin: Any, redis: Any, prefix: str
) -> dict[str, float]:
    values: dict[str, float] = {}
    for node in nodes:
        pid = node.process.pid
        values[f"{node.name}.rss_kib"] = float(rss_kib(pid))
        values[f"{node.name}.fds"] = float(open_fds(pid))
        async with http.get(f"{node.url}/metrics") as response:
            for name, value in parse_metrics(await response.text()).items():
                values[f"{node.name}.{name}"] = value
    row = await admin.fetchrow(
        "SELECT (SELECT count(*) FROM feed.journal) AS rows,"
        " pg_total_relation_size('feed.journal') AS bytes,"
        " pg_total_relation_size('feed.consumers') AS positions,"
        " (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()) AS backends"
    )
    values["pg.journal_rows"] = float(row["rows"])
    values["pg.journal_bytes"] = float(row["bytes"])
    values["pg.consumers_bytes"] = float(row["positions"])  # the position, saved twice a second
    values["pg.connections"] = float(row["backends"]) - 1  # less this one
    if redis is not None:
        keys = [key async for key in redis.scan_iter(match=f"{prefix}:*", count=1000)]
        pipe = redis.pipeline(transaction=False)
        for key in keys:
            pipe.memory_usage(key)
        sizes = await pipe.execute() if keys else []
        values["redis.keys"] = float(len(keys))
        values["redis.key_bytes"] = float(sum(s or 0 for s in sizes))
        values["redis.channels"] = float(len(await redis.pubsub_channels(f"{prefix}:*")))
    return values


async def settled(
    http: Any, nodes: list[Node], admin: Any, redis: Any, prefix: str, timeout: float
) -> dict[str, float]:
    """A sample once no node has clients, row or filter rooms (or after `timeout` seconds,
    the sample then showing what stayed), a second after the last of them went."""
    deadline = time.monotonic() + timeout
    held = ("clients", "rooms_row", "rooms_filter", "connections")
    while True:
        values = await sample(http, nodes, admin, redis, prefix)
        # 1 connection: the sampler's own /metrics request.
        busy = any(
            values.get(f"{n.name}.{k}", 0) > (1 if k == "connections" else 0)
            for n in nodes
            for k in held
        )
        if not busy or time.monotonic() > deadline:
            await asyncio.sleep(1)
            return await sample(http, nodes, admin, redis, prefix)
        await asyncio.sleep(1)


async def key_kinds(redis: Any, prefix: str) -> dict[str, int]:
    """The keys under the prefix by kind: a room's `meta` and `history` by its kind of room
    (`target`, `row`, `filter`), the rest by their name less the prefix."""
    kinds: Counter[str] = Counter()
    async for raw in redis.scan_iter(match=f"{prefix}:*", count=1000):
        key = raw.decode(errors="replace").removeprefix(prefix + ":")
        if key.startswith("room:"):
            room, _, suffix = key.removeprefix("room:").rpartition(":")
            kind = "filter" if "?" in room else "row" if room.count(":") > 1 else "target"
            kinds[f"{kind} room {suffix}"] += 1
            if kind != "target":  # left behind for how long: its TTL, in whole hours
                hours = max(0, await redis.pttl(raw)) // 3_600_000
                kinds[f"{kind} room {suffix} expiring within {hours + 1} h"] += 1
        else:
            kinds[key] += 1
    return dict(kinds)


# -- the table -----------------------------------------------------------------------------------


def slope_per_minute(times: list[float], values: list[float]) -> float | None:
    """Least-squares growth per minute (None for fewer than 3 samples)."""
    points = [(t, v) for t, v in zip(times, values, strict=False) if v == v]
    if len(points) < 3:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    if var == 0:
        return None
    return 60 * sum((t - mt) * (v - mv) for t, v in points) / var


def growth(samples: Samples, warmup: float) -> list[dict[str, Any]]:
    """Per series, over the samples after `warmup` seconds: first, last, min, max, and growth
    per minute over all of them and over their second half."""
    start = next((i for i, t in enumerate(samples.times) if t >= warmup), len(samples.times))
    times = samples.times[start:]
    half = len(times) // 2
    rows = []
    for name, column in sorted(samples.series.items()):
        values = [v for v in column[start:]]
        seen = [v for v in values if v == v]
        if not seen:
            continue
        rows.append(
            {
                "series": name,
                "first": seen[0],
                "last": seen[-1],
                "min": min(seen),
                "max": max(seen),
                "per_min": slope_per_minute(times, values),
                "per_min_2nd_half": slope_per_minute(times[half:], values[half:]),
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    def fmt(x: float | None) -> str:
        if x is None:
            return "-"
        return f"{x:.0f}" if abs(x) >= 100 or x == int(x) else f"{x:.2f}"

    head = ("series", "first", "last", "min", "max", "/min", "/min 2nd half")
    lines = [head] + [
        (
            r["series"],
            *(fmt(r[k]) for k in ("first", "last", "min", "max", "per_min", "per_min_2nd_half")),
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    )


# -- the run -------------------------------------------------------------------------------------


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp
    import asyncpg

    base = os.environ.get(
        "FEED_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    redis_url = os.environ.get("FEED_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    tag = uuid.uuid4().hex[:8]
    db, prefix = f"feed_soak_{tag}", f"soak-{tag}"
    tmp = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    admin = await asyncpg.connect(base)
    await admin.execute(f'CREATE DATABASE "{db}"')
    dsn = base.rpartition("/")[0] + "/" + db
    conn = await asyncpg.connect(dsn)
    redis: Any = None
    nodes: list[Node] = []
    clients: asyncio.subprocess.Process | None = None
    stop = asyncio.Event()
    written: dict[str, int] = {}
    samples = Samples()
    result: dict[str, Any] = {}
    try:
        await conn.execute(
            "CREATE TABLE orders (id int PRIMARY KEY, status text, amount int, user_id int,"
            " note text);"
            "CREATE TABLE events (id int PRIMARY KEY, note text);"
            f"INSERT INTO orders SELECT i, 'new', 0, i % 200, '' FROM generate_series(1, {ORDERS})"
            " AS i"
        )
        if args.cluster:
            import redis.asyncio as aioredis

            redis = aioredis.Redis.from_url(redis_url)
        cfg = tmp / "feed.toml"
        cfg.write_text(
            config(dsn, args.grace, args.buffer, redis_url if args.cluster else None, prefix)
        )
        for i in range(2 if args.cluster else 1):
            nodes.append(await start_node(cfg, f"node{i}", tmp))
        async with aiohttp.ClientSession() as http:
            before = await sample(http, nodes, conn, redis, prefix)
        objects = [await node.count_objects() for node in nodes] if INSTRUMENTED else []
        clients = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.soak_clients", "--urls", ",".join(n.url for n in nodes),
            "--sessions", str(args.sessions), "--seed", str(args.seed),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert clients.stdout is not None and clients.stdin is not None
        assert (await asyncio.wait_for(clients.stdout.readline(), 60)).strip() == b"ready"
        writing = asyncio.create_task(writer(dsn, args.rate, stop, written))
        started = time.monotonic()
        end = started + 60 * args.minutes
        async with aiohttp.ClientSession() as http:
            while (now := time.monotonic()) < end:
                if writing.done():
                    writing.result()
                    raise RuntimeError("the writer stopped")
                for node in nodes:
                    if node.process.returncode is not None:
                        raise RuntimeError(f"{node.name} exited: {node.log.read_text()[-2000:]}")
                values = await sample(http, nodes, conn, redis, prefix)
                samples.add(now - started, values)
                if args.verbose:
                    print(f"{now - started:6.0f}s " + " ".join(
                        f"{k}={v:.0f}" for k, v in sorted(values.items())), flush=True)  # fmt: skip
                await asyncio.sleep(max(0.0, args.every - (time.monotonic() - now)))
            stop.set()
            await writing
            clients.stdin.write(b"bye\n")
            await clients.stdin.drain()
            counts = json.loads((await asyncio.wait_for(clients.stdout.readline(), 60)) or "{}")
            await asyncio.wait_for(clients.wait(), 30)
            # What the nodes hold once everyone has left and the grace has passed.
            left = time.monotonic()
            if redis is not None:  # a room's registration outlives its last member by the
                # grace and three refreshes after the last one (lease / 4 each, 2.5 s by
                # default: feed.engine), and the reader drops it, its route and its keys at its
                # next re-read of the registry
                await asyncio.sleep(args.grace + 5 * 2.5 + 3)
            after = await settled(http, nodes, conn, redis, prefix, args.grace + 60)
            after["seconds_to_settle"] = round(time.monotonic() - left, 1)
            keys_left = await key_kinds(redis, prefix) if redis is not None else {}
            objects_grown = {
                node.name: grown(before, await node.count_objects())
                for node, before in zip(nodes, objects, strict=False)
            }
        result = {
            "minutes": args.minutes,
            "cluster": args.cluster,
            "sessions": args.sessions,
            "rate": args.rate,
            "grace": args.grace,
            "buffer": args.buffer,
            "warmup_minutes": args.warmup,
            "transactions": written.get("transactions", 0),
            "clients": counts,
            "growth": growth(samples, 60 * args.warmup),
            "before_clients": before,
            "after_clients_left": after,
            "objects_grown": objects_grown,
            "redis_keys_left": keys_left,
            "log_lines": {n.name: log_summary(n.log) for n in nodes},
            "samples": {"t": samples.times, **samples.series},
        }
    finally:
        stop.set()
        if clients is not None and clients.returncode is None:
            clients.kill()
            await clients.wait()
        for node in nodes:
            if node.process.returncode is None:
                node.process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(node.process.wait(), 30)
                except TimeoutError:
                    node.process.kill()
        await conn.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        await admin.close()
        if redis is not None:
            keys = [key async for key in redis.scan_iter(match=f"{prefix}:*", count=1000)]
            for at in range(0, len(keys), 500):
                await redis.unlink(*keys[at : at + 500])
            await redis.aclose()
        if args.keep_logs:
            print(f"node logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def log_summary(path: Path) -> dict[str, int]:
    """Lines by level in a node's log (a traceback counts once, as `Traceback`)."""
    counts: dict[str, int] = {}
    for line in path.read_text(errors="replace").splitlines():
        for word in ("ERROR", "WARNING", "CRITICAL", "Traceback"):
            if word in line:
                counts[word] = counts.get(word, 0) + 1
    return counts


def report(result: dict[str, Any]) -> str:
    what = "2 nodes on one Redis" if result["cluster"] else "1 node"
    lines = [
        f"soak: {what}, {result['minutes']:g} min ({result['warmup_minutes']:g} warm-up), "
        f"{result['sessions']} client sessions, {result['rate']:g} transactions/s "
        f"({result['transactions']} written), filter_room_grace {result['grace']:g} s, "
        f"replay_buffer {result['buffer']}",
        "",
        table(result["growth"]),
        "",
        "before the first client: "
        + ", ".join(f"{k} {v:.0f}" for k, v in sorted(result["before_clients"].items())),
        "after the clients left and the grace passed: "
        + ", ".join(f"{k} {v:.0f}" for k, v in sorted(result["after_clients_left"].items())),
        "clients: " + ", ".join(f"{k} {v}" for k, v in sorted(result["clients"].items())),
        "node logs: " + json.dumps(result["log_lines"]),
    ]
    if result["redis_keys_left"]:
        lines.append(
            "Redis keys under the prefix once the clients left: "
            + ", ".join(f"{k} {v}" for k, v in sorted(result["redis_keys_left"].items()))
        )
    for name, more in result["objects_grown"].items():
        lines.append(
            f"{name}: live objects by type, more than before the first client: "
            + (", ".join(f"{k} +{v}" for k, v in more.items()) or "none")
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--cluster", action="store_true", help="two nodes on one Redis")
    parser.add_argument("--sessions", type=int, default=30, help="client sessions at once")
    parser.add_argument("--rate", type=float, default=20.0, help="writer transactions per second")
    parser.add_argument("--grace", type=float, default=10.0, help="[server] filter_room_grace")
    parser.add_argument("--buffer", type=int, default=100, help="[server] replay_buffer")
    parser.add_argument("--warmup", type=float, default=None, help="minutes (default: a fifth)")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", default="", help="write the figures and samples here")
    parser.add_argument("--verbose", action="store_true", help="print every sample")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()
    if args.warmup is None:
        args.warmup = args.minutes / 5
    result = asyncio.run(soak(args))
    print(report(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
