"""The benchmark suite: `python -m bench` (full) or `python -m bench --short` (CI-sized).

Every server, client swarm, writer and listener runs in its own process on loopback; every phase
has a deadline. Prints a table, writes bench/results/<time>.json and latest.json, and draws
bench/results/latest.png. Sources come from FEED_BENCH_POSTGRES_URL / FEED_BENCH_REDIS_URL
(defaults: the local servers); a phase whose source cannot be reached is skipped with a note.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import socket
import statistics
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench import fanout, filter_rooms, idle, sources
from bench.procs import raise_nofile
from bench.swarm import Swarm

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Plan:
    fanout_points: list[tuple[int, int, float]]
    """(clients, rooms, changes/s offered across all rooms)"""
    fanout_windows: int
    fanout_seconds: float
    fanout_rounds_at_targets: int
    idle_clients: list[int]
    pg_rates: list[float]
    redis_rates: list[float]
    mongodb_rates: list[float]
    source_seconds: float
    ingest_seconds: float
    filter_sizes: list[int]
    """distinct filter rooms on one target, for the routing measurement"""
    filter_repeats: int
    burst_sizes: list[int]
    """per-user filter rooms for the burst through the real server"""
    burst_repeats: int
    cluster_clients: int = 200
    cluster_rate: float = 50.0
    cluster_seconds: float = 6.0
    cluster_rounds: int = 3
    """Rounds of the four setups: single rounds' CPU ratios spread by ±0.2 on these machines."""
    cluster_latency_clients: int = 6
    cluster_latency_rate: float = 1000.0
    """The point the latency goal is set at (the engine adds at most 5 ms at p99)."""
    phases: set[str] = field(
        default_factory=lambda: {
            "fanout",
            "idle",
            "postgres",
            "redis",
            "mongodb",
            "cluster",
            "filters",
        }
    )


FULL = Plan(
    fanout_points=[
        (1, 1, 2000.0),
        (100, 1, 400.0),
        (1000, 1, 40.0),
        (5000, 1, 8.0),
        (1000, 100, 2000.0),
        (1000, 1000, 2000.0),  # every client in its own room: the per-change path
    ],
    fanout_windows=3,
    fanout_seconds=5.0,
    fanout_rounds_at_targets=2,
    idle_clients=[1000, 10000],
    pg_rates=[100, 1000, 2000, 5000],
    redis_rates=[100, 1000, 5000, 10000, 20000],  # on to the knee
    mongodb_rates=[100, 1000, 5000],
    source_seconds=5.0,
    ingest_seconds=8.0,
    filter_sizes=[10, 1000, 10_000, 100_000],
    filter_repeats=5,
    burst_sizes=[10, 10_000],
    burst_repeats=3,
)

SHORT = Plan(
    fanout_points=[(100, 1, 400.0), (1000, 1, 40.0)],
    fanout_windows=2,
    fanout_seconds=2.0,
    fanout_rounds_at_targets=1,
    idle_clients=[1000],
    pg_rates=[100, 1000],
    redis_rates=[100, 1000],
    mongodb_rates=[100, 1000],
    source_seconds=2.0,
    ingest_seconds=3.0,
    filter_sizes=[10, 10_000],
    filter_repeats=3,
    burst_sizes=[10, 10_000],
    burst_repeats=1,
    cluster_clients=40,
    cluster_rate=50.0,
    cluster_seconds=2.0,
    cluster_rounds=1,
)


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    import psutil

    packages: dict[str, str | None] = {}
    for name in ("python-socketio", "python-engineio", "uvicorn", "websockets", "asyncpg", "redis"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "packages": packages,
    }


# -- phases ----------------------------------------------------------------------------------


TARGET_POINTS = {(100, 1), (1000, 1), (1000, 1000)}
"""(clients, rooms) the targets are stated at: run `fanout_rounds_at_targets` times, alternating."""


def run_fanout(plan: Plan, log: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    no_node = fanout.node_available()
    if no_node:
        log.append(f"fanout: the Node.js Socket.IO baseline is not run: {no_node}")
        print(log[-1], flush=True)
    for clients, rooms, rate in plan.fanout_points:
        at_target = (clients, rooms) in TARGET_POINTS
        rounds = plan.fanout_rounds_at_targets if at_target else 1
        targets = [f"t{i}" for i in range(rooms)]
        processes = 1 if clients == 1 else 2 if clients <= 1000 else 4
        for round_ in range(rounds):
            kinds = ["feed", "baseline"] + ([] if no_node else ["node"])
            if round_ == 0 and rooms == 1 and clients in (100, 1000):
                kinds.append("socketio")  # python-socketio's own emit: where the feed started
            for kind in kinds:
                windows = 1 if kind == "socketio" else plan.fanout_windows
                server = fanout.Server(kind, targets)
                try:
                    swarm = Swarm(server.port, server.rooms, clients, processes=processes)
                    try:
                        for _ in range(windows):
                            result = fanout.run_point(
                                server, swarm, clients, rate, plan.fanout_seconds
                            )
                            rows.append(result.as_dict())
                            log.append(
                                f"fanout {kind:8} clients={clients:5} rooms={rooms:3} "
                                f"{result.cpu_per_change_us:7.1f} us/change "
                                f"{result.changes_per_s:9.0f} changes/s "
                                f"delivered {result.delivered}/{result.expected}"
                            )
                            print(log[-1], flush=True)
                    finally:
                        swarm.stop()
                finally:
                    server.stop()
    return rows


def run_idle(plan: Plan, log: list[str]) -> list[dict[str, Any]]:
    rows = []
    for clients in plan.idle_clients:
        for kind in ("feed", "socketio", "baseline"):
            result = idle.measure(kind, clients, processes=max(2, clients // 2500))
            rows.append(result.as_dict())
            log.append(
                f"idle   {kind:8} clients={clients:5} {result.kib_per_connection:6.1f} KiB/conn "
                f"({result.connected} connected)"
            )
            print(log[-1], flush=True)
    return rows


BURST_CHANGES = 3000


def run_filters(plan: Plan, log: list[str]) -> dict[str, Any]:
    """Routing CPU per change by number of filter rooms, and a burst through the real server."""
    block: dict[str, Any] = {
        "routing": filter_rooms.routing_phase(
            plan.filter_sizes, budget=2.0, repeats=plan.filter_repeats
        ),
        "burst": filter_rooms.burst_phase(
            plan.burst_sizes, BURST_CHANGES, plan.burst_repeats, timeout=120.0
        ),
    }
    block["summary"] = filter_rooms.summarise(block)
    log.extend(filter_rooms.table(block))
    return block


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), 2):
            return True
    except OSError:
        return False


@contextmanager
def source_url(kind: str) -> Iterator[tuple[str, str]]:
    """The source's URL and where it came from: the environment, the local default server, or
    (as the test suite does on a fresh laptop, or always with FEED_BENCH_EMBEDDED=1) an embedded
    server started for this run."""
    env = "FEED_BENCH_POSTGRES_URL" if kind == "postgres" else "FEED_BENCH_REDIS_URL"
    url = sources.postgres_url() if kind == "postgres" else sources.redis_url()
    embedded = os.environ.get("FEED_BENCH_EMBEDDED") == "1"
    if not embedded and (env in os.environ or _reachable(url)):
        yield url, "environment" if env in os.environ else "local server"
        return
    if kind == "postgres":
        from tests.support.postgres import start_embedded

        pg = start_embedded()
        try:
            yield pg.url(), "embedded (tests/support, fsync off)"
        finally:
            pg.close()
    else:
        from tests.support.redis import RedisServer

        server = RedisServer()
        server.start()
        try:
            yield server.url(14), "embedded redis-server"
        finally:
            server.close()


def run_postgres(plan: Plan, log: list[str]) -> dict[str, Any]:
    with source_url("postgres") as (url, origin):
        out = _run_postgres(plan, log, url)
        out["origin"] = origin
        return out


def _run_postgres(plan: Plan, log: list[str], url: str) -> dict[str, Any]:
    """Each phase gets a fresh database: a feed resumes from its saved position, so a journal
    left by an earlier phase would be delivered again (rightly) and spoil the counts."""
    out: dict[str, Any] = {"url": _redact(url)}
    latency = []
    for kind in ("feed", "relay"):
        with sources.BenchDatabase(url) as db:
            latency += _latency_rows("postgres", kind, db.url, plan.pg_rates, plan, log)
    out["latency"] = latency
    with sources.BenchDatabase(url) as db:
        ingest = sources.ingest_phase("postgres", db.url, plan.ingest_seconds)
    out["ingest"] = ingest.as_dict()
    log.append(_ingest_line("postgres", ingest))
    print(log[-1], flush=True)
    return out


LISTENERS = {
    "postgres": "bare asyncpg listener",
    "redis": "bare pub/sub socket",
}
"""What each source's ingest is compared with (bench/sources.py: listener_main)."""


def _ingest_line(source: str, ingest: sources.IngestResult) -> str:
    return (
        f"ingest {source}: feed {ingest.feed_rate:.0f}/s, {LISTENERS[source]} "
        f"{ingest.listener_rate:.0f}/s, ratio {ingest.ratio:.3f} "
        f"(writers {ingest.write_rate:.0f}/s, delivered {ingest.feed_delivered}/{ingest.committed})"
    )


def run_cluster(plan: Plan, log: list[str]) -> dict[str, Any]:
    """One node without [cluster], then 1, 2 and 3 nodes on one Redis (bench/cluster.py)."""
    import asyncio

    from bench import cluster

    points = [
        (plan.cluster_clients, plan.cluster_rate),  # the CPU goal's point
        (plan.cluster_latency_clients, plan.cluster_latency_rate),  # the latency goal's
    ]
    measured: list[list[dict[str, Any]]] = []
    with source_url("postgres") as (url, origin):
        for clients, rate in points:
            rows = asyncio.run(
                cluster.run_rounds(url, clients, rate, plan.cluster_seconds, plan.cluster_rounds)
            )
            for row in rows:
                print(cluster.describe(row), flush=True)
            measured.append(rows)
    setups, latency = measured
    for row in cluster.medians(setups) + cluster.medians(latency):
        log.append(cluster.describe_median(row))
        print(log[-1], flush=True)
    return {"origin": origin, "setups": setups, "latency": latency}


def run_redis(plan: Plan, log: list[str]) -> dict[str, Any]:
    with source_url("redis") as (url, origin):
        out = _run_redis(plan, log, url)
        out["origin"] = origin
        return out


def _run_redis(plan: Plan, log: list[str], url: str) -> dict[str, Any]:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5)
    client.flushdb()
    try:
        latency = _latency_rows("redis", "feed", url, plan.redis_rates, plan, log)
        client.flushdb()
        ingest = sources.ingest_phase("redis", url, plan.ingest_seconds)
        log.append(_ingest_line("redis", ingest))
        print(log[-1], flush=True)
    finally:
        client.flushdb()
        client.close()
    return {"url": _redact(url), "latency": latency, "ingest": ingest.as_dict()}


def run_mongodb(plan: Plan, log: list[str]) -> dict[str, Any]:
    """Only against a server the user names: no mongod can be started here (see the docs)."""
    url = os.environ.get("FEED_BENCH_MONGODB_URL")
    if not url:
        note = "not run: set FEED_BENCH_MONGODB_URL to a replica set to measure MongoDB"
        print(f"mongodb: {note}", flush=True)
        return {"not_run": note}
    with sources.BenchMongo(url):
        latency = _latency_rows("mongodb", "feed", url, plan.mongodb_rates, plan, log)
    return {"url": _redact(url), "latency": latency, "origin": "environment"}


def _latency_rows(
    source: str, kind: str, url: str, rates: list[float], plan: Plan, log: list[str]
) -> list[dict[str, Any]]:
    """One latency phase: each rate's result as a JSON row, logged and printed as it comes."""
    rows = []
    for r in sources.latency_phase(source, kind, url, rates, plan.source_seconds):
        rows.append(r.as_dict())
        log.append(_latency_line(r))
        print(log[-1], flush=True)
    return rows


def _latency_line(r: sources.LatencyResult) -> str:
    def f(v: float | None) -> str:
        return "   -  " if v is None else f"{v:6.1f}"

    return (
        f"latency {r.source:8} {r.server:5} rate={r.rate:6.0f} (achieved {r.achieved_rate:6.0f}) "
        f"p50 {f(r.p50_ms)} p95 {f(r.p95_ms)} p99 {f(r.p99_ms)} ms "
        f"delivered/committed {r.delivered_ratio:.4f}"
    )


def _redact(url: str) -> str:
    if "@" in url and ":" in url.split("@", 1)[0].split("//", 1)[-1]:
        scheme, rest = url.split("//", 1)
        user = rest.split(":", 1)[0]
        return f"{scheme}//{user}:***@{rest.split('@', 1)[1]}"
    return url


# -- summary ---------------------------------------------------------------------------------


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Medians per point and the ratios the targets are stated in."""
    summary: dict[str, Any] = {}
    points: dict[tuple[int, int], dict[str, list[dict[str, Any]]]] = {}
    for row in results.get("fanout", []):
        points.setdefault((row["clients"], row["rooms"]), {}).setdefault(row["server"], []).append(
            row
        )
    fan = []
    for (clients, rooms), by_kind in sorted(points.items()):
        feed_rows, base_rows = by_kind.get("feed", []), by_kind.get("baseline", [])
        sio_rows = by_kind.get("socketio", [])
        node_rows = by_kind.get("node", [])

        def med(rows: list[dict[str, Any]], key: str) -> float:
            values = [r[key] for r in rows if r[key] is not None and not math.isnan(r[key])]
            return statistics.median(values) if values else float("nan")

        entry: dict[str, Any] = {
            "clients": clients,
            "rooms": rooms,
            "rate": feed_rows[0]["rate"] if feed_rows else None,
            "feed_us_per_change": med(feed_rows, "cpu_per_change_us"),
            "feed_us_per_frame": med(feed_rows, "cpu_per_frame_us"),
            "baseline_us_per_frame": med(base_rows, "cpu_per_frame_us"),
            "socketio_us_per_change": med(sio_rows, "cpu_per_change_us"),
            "node_us_per_change": med(node_rows, "cpu_per_change_us"),
            "node_changes_per_s": med(node_rows, "changes_per_s"),
            "node_delivered_ratio": min(
                (r["delivered"] / r["expected"] for r in node_rows), default=float("nan")
            ),
            "node_p50_ms": med(node_rows, "p50_ms"),
            "feed_changes_per_s": med(feed_rows, "changes_per_s"),
            "baseline_changes_per_s": med(base_rows, "changes_per_s"),
            "feed_changes_per_frame": med(feed_rows, "delivered") / med(feed_rows, "frames")
            if feed_rows
            else float("nan"),
            "feed_delivered_ratio": min(
                (r["delivered"] / r["expected"] for r in feed_rows), default=float("nan")
            ),
            "baseline_delivered_ratio": min(
                (r["delivered"] / r["expected"] for r in base_rows), default=float("nan")
            ),
            "feed_p50_ms": med(feed_rows, "p50_ms"),
            "baseline_p50_ms": med(base_rows, "p50_ms"),
            "windows": len(feed_rows),
        }
        entry["cpu_ratio"] = entry["feed_us_per_change"] / entry["baseline_us_per_frame"]
        entry["node_ratio"] = entry["feed_us_per_change"] / entry["node_us_per_change"]
        fan.append(entry)
    summary["fanout"] = fan
    idle_rows = results.get("idle", [])
    summary["idle"] = [
        {
            "clients": r["clients"],
            "server": r["server"],
            "kib_per_connection": r["kib_per_connection"],
            "connected": r["connected"],
        }
        for r in idle_rows
    ]
    filters = results.get("filters")
    if isinstance(filters, dict) and "summary" in filters:
        summary["filters"] = filters["summary"]
    pg = results.get("postgres")
    if isinstance(pg, dict) and "ingest" in pg:
        summary["postgres_ingest_ratio"] = pg["ingest"]["ratio"]
    rd = results.get("redis")
    if isinstance(rd, dict) and "ingest" in rd:
        summary["redis_ingest_ratio"] = rd["ingest"]["ratio"]
    return summary


def table(results: dict[str, Any]) -> str:
    s = results["summary"]
    lines = ["", "== fan-out: server CPU per delivered change (medians; OS CPU time of the server)"]
    lines.append(
        f"{'clients':>7} {'rooms':>5} {'rate/s':>7} {'feed us/chg':>11} {'feed us/frm':>11} "
        f"{'ws us/frm':>9} {'ratio':>6} {'chg/frame':>9} {'feed chg/s':>10} {'ws chg/s':>9} "
        f"{'delivered':>9}"
    )
    for e in s.get("fanout", []):
        lines.append(
            f"{e['clients']:>7} {e['rooms']:>5} {e['rate']:>7.0f} {e['feed_us_per_change']:>11.1f} "
            f"{e['feed_us_per_frame']:>11.1f} {e['baseline_us_per_frame']:>9.1f} "
            f"{e['cpu_ratio']:>6.2f} {e['feed_changes_per_frame']:>9.1f} "
            f"{e['feed_changes_per_s']:>10.0f} {e['baseline_changes_per_s']:>9.0f} "
            f"{e['feed_delivered_ratio']:>9.3f}"
        )
    node = [e for e in s.get("fanout", []) if not math.isnan(e.get("node_us_per_change", math.nan))]
    if node:
        lines.append("Node.js Socket.IO io.to(room).emit (same clients), us per delivered change:")
        lines.extend(
            f"  {e['clients']:>5} clients, {e['rooms']:>4} rooms: {e['node_us_per_change']:.1f}"
            f" (feed/node {e['node_ratio']:.2f}, delivered {e['node_delivered_ratio']:.3f})"
            for e in node
        )
    sio = [e for e in s.get("fanout", []) if not math.isnan(e["socketio_us_per_change"])]
    if sio:
        lines.append("plain python-socketio emit (same clients, same frames), us per change:")
        lines.extend(f"  {e['clients']:>5} clients: {e['socketio_us_per_change']:.1f}" for e in sio)
    if s.get("idle"):
        lines += ["", "== idle memory per connection (server RSS growth / clients)"]
        for e in s["idle"]:
            lines.append(
                f"{e['server']:>8} {e['clients']:>6} clients: {e['kib_per_connection']:6.1f} KiB "
                f"({e['connected']} connected)"
            )
    filters = results.get("filters")
    if isinstance(filters, dict) and "summary" in filters:
        lines += filter_rooms.table(filters)
    for source in ("postgres", "redis", "mongodb"):
        block = results.get(source)
        if not isinstance(block, dict) or "latency" not in block:
            if block:
                note = block.get("not_run") or block.get("skipped") or block
                lines += ["", f"== {source}: {note}"]
            continue
        lines += [
            "",
            f"== {source}: commit-to-client latency ({block['latency'][0]['clients']} clients)",
        ]
        lines.append(
            f"{'server':>6} {'rate':>6} {'achieved':>8} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} "
            f"{'delivered/committed':>19}"
        )
        for r in block["latency"]:
            lines.append(
                f"{r['server']:>6} {r['rate']:>6.0f} {r['achieved_rate']:>8.0f} "
                f"{_num(r['p50_ms']):>7} {_num(r['p95_ms']):>7} {_num(r['p99_ms']):>7} "
                f"{r['delivered_ratio']:>19.4f}"
            )
        if "ingest" in block:
            i = block["ingest"]
            lines.append(
                f"ingest: feed {i['feed_rate']:.0f}/s vs {LISTENERS[source]} "
                f"{i['listener_rate']:.0f}/s = {i['ratio']:.3f} (writers flat out: {i['write_rate']:.0f}/s)"
            )
    block = results.get("cluster")
    if isinstance(block, dict) and "setups" in block:
        from bench import cluster

        lines += ["", "== cluster: one Postgres connector, clients spread over the nodes"]
        lines.extend(cluster.describe_median(row) for row in cluster.medians(block["setups"]))
        lines.extend(
            cluster.describe_median(row) for row in cluster.medians(block.get("latency", []))
        )
    return "\n".join(lines)


def losses(results: dict[str, Any]) -> list[str]:
    """What the feed failed to deliver in this run, one line each: the checks `--check` makes.

    Only losses, never timings: a slow host moves every figure, but a change that reached a
    client is either there or not. Baselines are not held to it (the relay is expected to fall
    behind).
    """
    found: list[str] = []
    for name, phase in results.items():
        if isinstance(phase, dict) and "skipped" in phase:
            found.append(f"{name}: the phase did not run ({phase['skipped']})")
    for e in results.get("summary", {}).get("fanout", []):
        if e["feed_delivered_ratio"] != 1.0:
            found.append(
                f"fanout {e['clients']} clients, {e['rooms']} rooms: the feed delivered "
                f"{e['feed_delivered_ratio']:.4f} of the changes"
            )
    for source in ("postgres", "redis", "mongodb"):
        for r in results.get(source, {}).get("latency", []):
            if r["server"] == "feed" and r["delivered_ratio"] != 1.0:
                found.append(
                    f"{source} at {r['rate']:.0f}/s: delivered/committed {r['delivered_ratio']:.4f}"
                )
    for source in ("postgres", "redis"):
        ingest = results.get(source, {}).get("ingest")
        if ingest and ingest["feed_delivered"] != ingest["committed"]:
            found.append(
                f"{source} ingest: delivered {ingest['feed_delivered']} of {ingest['committed']}"
            )
    filters = results.get("filters")
    if isinstance(filters, dict):
        found += filter_rooms.losses(filters)
    block = results.get("cluster")
    rows = [*block.get("setups", []), *block.get("latency", [])] if isinstance(block, dict) else []
    for r in rows:
        if r["received"] != r["expected"]:
            found.append(f"cluster {r['nodes']} node(s): {r['received']} of {r['expected']}")
    idle_runs = results.get("idle")
    for r in idle_runs if isinstance(idle_runs, list) else []:
        if r["server"] == "feed" and r["connected"] != r["clients"]:
            found.append(f"idle: {r['connected']} of {r['clients']} clients connected")
    return found


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="CI-sized: fewer points, shorter")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated phases: fanout, idle, postgres, redis, mongodb, cluster, filters",
    )
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 if the feed lost a change or a client anywhere (timings are never checked)",
    )
    args = parser.parse_args(argv)
    plan = SHORT if args.short else FULL
    phases = set(args.only.split(",")) - {""} or plan.phases
    raise_nofile()
    RESULTS.mkdir(exist_ok=True)
    started = time.monotonic()
    results: dict[str, Any] = {
        "mode": "short" if args.short else "full",
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
    }
    log: list[str] = []
    runners = {
        "fanout": run_fanout,
        "idle": run_idle,
        "postgres": run_postgres,
        "redis": run_redis,
        "mongodb": run_mongodb,
        "cluster": run_cluster,
        "filters": run_filters,
    }
    failed = False
    for name in ("fanout", "idle", "postgres", "redis", "mongodb", "cluster", "filters"):
        if name not in phases:
            continue
        try:
            results[name] = runners[name](plan, log)
        except Exception as exc:
            failed = True
            traceback.print_exc()
            results[name] = {"skipped": f"{type(exc).__name__}: {exc}"}
            print(f"{name}: skipped: {exc}", file=sys.stderr)
    results["seconds"] = round(time.monotonic() - started, 1)
    results["summary"] = summarise(results)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(results, indent=1, default=str)
    (RESULTS / f"{stamp}.json").write_text(text)
    # latest.json and its plot are what docs/benchmarks.md shows: only a run of every phase
    # replaces them (an --only run is kept under its time stamp alone).
    whole = phases == plan.phases
    latest = "latest-short" if args.short else "latest"
    if whole:
        (RESULTS / f"{latest}.json").write_text(text)
    print(table(results))
    if not args.no_plot:
        from bench.plot import draw

        png = RESULTS / (f"{latest}.png" if whole else f"{stamp}.png")
        draw(results, png)
        print(f"\nwrote {RESULTS / (stamp + '.json')} and {png}")
        filters = results.get("filters")
        if isinstance(filters, dict) and "summary" in filters:
            name = (
                f"{latest}-filters.png"
                if whole or phases == {"filters"}
                else f"{stamp}-filters.png"
            )
            filter_rooms.draw(filters, RESULTS / name)
            print(f"wrote {RESULTS / name}")
        block = results.get("cluster")
        if isinstance(block, dict) and block.get("setups"):
            from bench import cluster

            name = (
                f"{latest}-cluster.png"
                if whole or phases == {"cluster"}
                else f"{stamp}-cluster.png"
            )
            cluster.draw(block["setups"], RESULTS / name, latency=block.get("latency"))
            print(f"wrote {RESULTS / name}")
    print(f"took {results['seconds']:.0f}s")
    if args.check:
        found = losses(results)
        for line in found:
            print(f"bench check: {line}", file=sys.stderr)
        if found:
            return 1
        print("bench check: every change and every client delivered")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
