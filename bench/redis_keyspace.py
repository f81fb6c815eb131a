"""Redis keyspace capture under redis-benchmark SET load: delivered/written and probe latency.

    .venv/bin/python -m bench.redis_keyspace                      # own redis-server, 5k and 20k/s
    .venv/bin/python -m bench.redis_keyspace --url redis://127.0.0.1:6379/14 --rates 5000,20000
    .venv/bin/python -m bench.redis_keyspace --load python        # no redis-benchmark binary
    .venv/bin/python -m bench.redis_keyspace --cluster 3          # a 3-primary Redis Cluster

The feed runs in its own process (the real app: connector, hub, Socket.IO under uvicorn) with one
Redis connector, fetch_values off. Load: redis-benchmark (Debian's redis-tools) runs `SET
<prefix>k:__rand_int__ x`, started every 100 ms for a tenth of the second's target, so the rate
is paced rather than one burst per run, in two shapes (`--shapes`): `paced`, one connection
without pipelining, so a tick's SETs are spread over it by their round trips, and `burst`, 4
connections pipelining 8, so they land within a couple of milliseconds. Without the binary (or
with --load python) a separate Python process writes a small pipeline every millisecond.
Written is Redis's own count (INFO commandstats cmdstat_set, minus the probes); delivered is what
one Socket.IO client subscribed to the load pattern's room received. Latency: a probe writer SETs `<prefix>p:<time.time()>` 200 times a
second in this process during the load; the client (same process, same clock) subtracts that
time on receipt, so it is SET-sent to client-received, the whole path. Targets from issue 4:
every event delivered at 20,000 SET/s; p99 under 10 ms at 5,000/s. `--path connector` measures
the connector alone (SET to `changes()` in this process), which separates the connector's own
cost from the hub's and Socket.IO's. `--cluster N` runs the same against a Redis Cluster of N
primaries (tests/support/redis_cluster.py) with the Python writer, whose cluster pipeline
spreads the keys over every primary; Redis's counts are summed over the primaries.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import multiprocessing
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import redis.asyncio as aioredis
import socketio

from bench.procs import Child
from bench.servers import feed_main, free_port, server_section

RESULTS = Path(__file__).parent / "results"
PROBE_RATE = 200
TICK = 0.1


def feed_config(url: str, port: int, prefix: str, fetch_values: bool = False) -> str:
    return (
        server_section(port, "replay_buffer = 1000")
        + f"""
[[connectors]]
name = "rk"
type = "redis"
url = {json.dumps(url)}
patterns = [{json.dumps(prefix + "k:*")}, {json.dumps(prefix + "p:*")}]
configure = true
fetch_values = {"true" if fetch_values else "false"}
"""
    )


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def delivery(
    rate: float,
    elapsed: float,
    written: int,
    delivered: int,
    gaps: list[str],
    latencies: list[float],
) -> dict[str, Any]:
    """What a phase wrote and delivered, and how late (ms): the figures both paths report."""
    return {
        "target_rate": rate,
        "write_rate": round(written / elapsed),
        "written": written,
        "delivered": delivered,
        "delivered_ratio": round(delivered / written, 5) if written else None,
        "gaps": gaps,
        "probes": len(latencies),
        "latency_ms_p50": round(percentile(latencies, 0.50), 2),
        "latency_ms_p99": round(percentile(latencies, 0.99), 2),
        "latency_ms_max": round(max(latencies), 2) if latencies else None,
    }


# -- load generators --------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadShape:
    """How redis-benchmark delivers each tick's share: its connections and pipeline depth.

    redis-benchmark has no rate option, so the bench starts one short run per tick. With
    `connections=4, pipeline=8` a tick's SETs reach Redis within a couple of milliseconds (500 at
    once at 5,000/s); with `connections=1, pipeline=1` they are spread over the tick by one round
    trip each, as an application writing one key at a time would.
    """

    tick: float
    connections: int
    pipeline: int


SHAPES = {
    "paced": LoadShape(TICK, 1, 1),
    "burst": LoadShape(TICK, 4, 8),
}
"""Named load shapes for `--shapes`: one key at a time, and a tick's SETs pipelined at once."""


async def admin_client(url: str) -> Any:
    """A client for the bench's own commands: RedisCluster when `url` is a cluster node."""
    plain = aioredis.Redis.from_url(url)
    info = await plain.info("cluster")
    if str(info.get("cluster_enabled", "0")) != "1":
        return plain
    await plain.aclose()
    from redis.asyncio.cluster import RedisCluster

    return RedisCluster.from_url(url)


async def benchmark_load(
    url: str, prefix: str, rate: int, seconds: float, shape: LoadShape
) -> None:
    """redis-benchmark, one short run per tick, each writing a tick's share."""
    parsed = urlparse(url)
    per_tick = max(1, int(rate * shape.tick))
    args = [
        "redis-benchmark", "-h", parsed.hostname or "127.0.0.1", "-p", str(parsed.port or 6379),
        "-n", str(per_tick), "-r", "1000000",
        "-c", str(shape.connections), "-P", str(shape.pipeline), "-q",
    ]  # fmt: skip
    args += ["--dbnum", parsed.path.strip("/") or "0"]  # never a cluster: see main()
    if parsed.password:
        args += ["-a", parsed.password]
    args += ["SET", f"{prefix}k:__rand_int__", "x"]
    loop = asyncio.get_running_loop()
    start = loop.time()
    running: list[asyncio.subprocess.Process] = []
    ticks = int(seconds / shape.tick)
    for tick in range(ticks):
        due = start + tick * shape.tick
        if due > loop.time():
            await asyncio.sleep(due - loop.time())
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        running.append(proc)
        running = [p for p in running if p.returncode is None]
    for proc in running:
        await proc.wait()


def load_main(
    conn: Connection, load: str, url: str, prefix: str, rate: int, seconds: float, shape: LoadShape
) -> None:
    """The load generator's own process: say ready, wait for go, write, say done.

    Not in the measuring process: starting a redis-benchmark every tick (a fork, and a thread to
    reap it) there would delay the probes and the client that times them.
    """
    conn.send("ready")
    conn.recv()
    if load == "python":
        asyncio.run(_python_load(url, prefix, rate, seconds))
    else:
        asyncio.run(benchmark_load(url, prefix, rate, seconds, shape))
    conn.send("done")


async def _python_load(url: str, prefix: str, rate: int, seconds: float) -> None:
    client = await admin_client(url)
    loop = asyncio.get_running_loop()
    start = loop.time()
    per_ms = rate / 1000
    sent = 0
    while (now := loop.time()) < start + seconds:
        due = int((now - start) * 1000 * per_ms)
        if due > sent:
            pipe = client.pipeline(transaction=False)
            for i in range(sent, due):
                pipe.set(f"{prefix}k:{i}", "x")
            await pipe.execute()
            sent = due
        await asyncio.sleep(0.001)
    await client.aclose()


# -- one phase --------------------------------------------------------------------------------


async def set_calls(admin: Any) -> int:
    """SETs Redis executed (summed over a cluster's primaries; redirected ones not counted)."""
    if type(admin) is aioredis.Redis:
        stats = await admin.info("commandstats")
        return int(stats.get("cmdstat_set", {}).get("calls", 0))
    per_node = await admin.info("commandstats", target_nodes=admin.PRIMARIES)
    return sum(int(node.get("cmdstat_set", {}).get("calls", 0)) for node in per_node.values())


async def run_load(
    admin: Any,
    url: str,
    prefix: str,
    rate: int,
    seconds: float,
    load: str,
    shape: LoadShape,
) -> tuple[int, float]:
    """Drive the SET load with probes alongside; return (load SETs written, seconds taken)."""
    probes = 0

    async def probe() -> None:
        nonlocal probes
        loop = asyncio.get_running_loop()
        start = loop.time()
        while loop.time() < start + seconds:
            await admin.set(f"{prefix}p:{time.time()!r}", "x")
            probes += 1
            await asyncio.sleep(1 / PROBE_RATE)

    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    proc = context.Process(
        target=load_main, args=(theirs, load, url, prefix, rate, seconds, shape), daemon=True
    )
    proc.start()
    try:
        if not await asyncio.to_thread(ours.poll, 60) or ours.recv() != "ready":
            raise RuntimeError("the load generator did not start")
        before = await set_calls(admin)
        started = time.monotonic()
        ours.send("go")
        _, finished = await asyncio.gather(probe(), asyncio.to_thread(ours.poll, seconds + 60))
        elapsed = time.monotonic() - started
        if not finished:
            raise RuntimeError("the load generator did not finish")
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    return await set_calls(admin) - before - probes, elapsed


async def phase(
    url: str,
    feed_url: str,
    prefix: str,
    rate: int,
    seconds: float,
    load: str,
    feed_pid: int,
    client: str,
    shape: LoadShape,
) -> dict[str, Any]:
    import psutil

    feed_proc = psutil.Process(feed_pid)
    admin = await admin_client(url)
    sio = socketio.AsyncClient(reconnection=False)
    delivered = 0
    gaps: list[str] = []
    latencies: list[float] = []
    load_room = f"rk:{prefix}k:*"

    def on_change(change: dict[str, Any]) -> None:
        nonlocal delivered
        if change["room"] == load_room:
            delivered += 1
        else:
            sent = float(change["key"].rsplit(":", 1)[1])
            latencies.append((time.time() - sent) * 1000)

    stats = None
    if client == "wire":
        from bench.wire import Stats, connect_many

        parsed = urlparse(feed_url)
        stats = Stats()
        wire_clients = await connect_many(
            parsed.hostname or "127.0.0.1",
            parsed.port or 80,
            [f"rk:{prefix}p:*", load_room],
            2,
            stats,
            probes=1,
        )
    else:
        sio.on("change", on_change)

        def on_changes(batch: list[dict[str, Any]]) -> None:
            for change in batch:
                on_change(change)

        sio.on("changes", on_changes)
        sio.on("gap", lambda gap: gaps.append(gap["reason"]))
        await sio.connect(feed_url, transports=["websocket"], wait_timeout=10)
        for room in (load_room, f"rk:{prefix}p:*"):
            ack = await sio.call("subscribe", {"room": room}, timeout=10)
            assert ack["ok"], ack

    own = psutil.Process()
    cpu_before, own_before = feed_proc.cpu_times(), own.cpu_times()
    written, elapsed = await run_load(admin, url, prefix, rate, seconds, load, shape)
    # Drain: wait until delivery stops growing (or catches up), bounded.
    deadline = time.monotonic() + 20
    last, still = -1, 0.0
    while time.monotonic() < deadline and delivered < written:
        if stats is not None:
            delivered = stats.changes - len(stats.latencies)
        if delivered == last:
            if time.monotonic() - still > 2:
                break
        else:
            last, still = delivered, time.monotonic()
        await asyncio.sleep(0.05)
    cpu_after, own_after = feed_proc.cpu_times(), own.cpu_times()
    if stats is not None:
        delivered = stats.changes - len(stats.latencies)
        latencies = [t * 1000 for t in stats.latencies]
        gaps = stats.gaps
        for wire_client in wire_clients:
            wire_client.close()
    own_cpu = (own_after.user + own_after.system) - (own_before.user + own_before.system)
    feed_cpu = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    if stats is None:
        await sio.disconnect()
    await admin.aclose()
    return {
        "path": "feed",
        "client": client,
        "feed_cpu_us_per_change": round(feed_cpu / max(1, written + len(latencies)) * 1e6, 1),
        "bench_client_cpu_share": round(own_cpu / elapsed, 2),
        "feed_cpu_share": round(feed_cpu / elapsed, 2),
        "feed_cpu_system_share": round((cpu_after.system - cpu_before.system) / feed_cpu, 2)
        if feed_cpu
        else None,
        **delivery(rate, elapsed, written, delivered, gaps, latencies),
    }


async def connector_phase(
    url: str,
    prefix: str,
    rate: int,
    seconds: float,
    load: str,
    fetch_values: bool,
    shape: LoadShape,
) -> dict[str, Any]:
    """The same load, read by the connector in this process: SET to `changes()`, no hub."""
    from connectors.redis import RedisConnector
    from feed.core.change import Gap
    from feed.options import Options

    table = {
        "url": url,
        "patterns": [prefix + "k:*", prefix + "p:*"],
        "configure": True,
        "fetch_values": fetch_values,
    }
    source = RedisConnector("rk", Options(table, "bench"))
    admin = await admin_client(url)
    delivered = 0
    latencies: list[float] = []
    gaps: list[str] = []
    probe_target = prefix + "p:*"

    async def consume() -> None:
        nonlocal delivered
        async for item in source.changes():
            if isinstance(item, Gap):
                gaps.append(item.reason)
            elif item.target == probe_target:
                latencies.append((time.time() - float(item.key.rsplit(":", 1)[1])) * 1000)
            else:
                delivered += 1

    async with source:
        reader = asyncio.create_task(consume())
        written, elapsed = await run_load(admin, url, prefix, rate, seconds, load, shape)
        async with asyncio.timeout(20):
            while delivered < written:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    await admin.aclose()
    return {
        "path": "connector",
        **delivery(rate, elapsed, written, delivered, gaps, latencies),
    }


async def cleanup(url: str, prefix: str) -> None:
    admin = await admin_client(url)
    async for key in admin.scan_iter(match=prefix + "*", count=5000):
        await admin.unlink(key)
    await admin.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="Redis to use (default: start a private redis-server)")
    parser.add_argument("--rates", default="5000,20000", help="SET/s, comma separated")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--load", choices=("auto", "redis-benchmark", "python"), default="auto")
    parser.add_argument(
        "--path",
        choices=("feed", "connector", "both"),
        default="both",
        help="through the whole feed to a Socket.IO client, the connector alone, or both",
    )
    parser.add_argument(
        "--client",
        choices=("wire", "socketio"),
        default="wire",
        help="bench/wire.py's wire-level Socket.IO clients (what `python -m bench` uses; little "
        "CPU in the measuring process), or a python-socketio AsyncClient in this process, as a "
        "user's Python service would run",
    )
    parser.add_argument(
        "--fetch-values", action="store_true", help="read values (one script call per batch)"
    )
    parser.add_argument(
        "--shapes",
        default="paced,burst",
        help="redis-benchmark load shapes to run, comma separated: paced (-c 1 -P 1: one round "
        "trip per SET), burst (-c 4 -P 8: a tick's SETs at once)",
    )
    parser.add_argument(
        "--tick", type=float, default=TICK, help="seconds between redis-benchmark runs"
    )
    parser.add_argument(
        "--rb-connections",
        type=int,
        help="redis-benchmark -c (with --rb-pipeline: one custom shape)",
    )
    parser.add_argument("--rb-pipeline", type=int, help="redis-benchmark -P for a custom shape")
    parser.add_argument(
        "--cluster",
        type=int,
        metavar="N",
        help="start a Redis Cluster of N primaries instead of one redis-server",
    )
    args = parser.parse_args()
    if args.rb_connections or args.rb_pipeline:
        shapes = {"custom": LoadShape(args.tick, args.rb_connections or 1, args.rb_pipeline or 1)}
    else:
        try:
            shapes = {
                name: dataclasses.replace(SHAPES[name], tick=args.tick)
                for name in args.shapes.split(",")
            }
        except KeyError as exc:
            sys.exit(f"--shapes: unknown shape {exc}; choose from {', '.join(SHAPES)}")
    load = args.load
    if load == "auto":
        load = "redis-benchmark" if shutil.which("redis-benchmark") else "python"
    elif load == "redis-benchmark" and not shutil.which("redis-benchmark"):
        sys.exit("redis-benchmark not found: apt-get install redis-tools, or use --load python")
    if args.cluster:
        # redis-benchmark --cluster sends a custom command's keys to the right node only when
        # they share one {hash tag}, i.e. one node: the Python writer's cluster pipeline spreads
        # them over every primary instead.
        load = "python"
    if load == "python":
        shapes = {"smooth": SHAPES["paced"]}  # ignored: the Python writer paces every millisecond

    server: Any = None
    url = args.url
    if url is None and args.cluster:
        server = ClusterInThread(args.cluster)
        url = server.url
    elif url is None:
        from tests.support.redis import RedisServer

        server = RedisServer()
        server.start()
        url = server.url()
    prefix = f"rkbench:{uuid.uuid4().hex[:8]}:"
    port = free_port()
    feed = None
    results: list[dict[str, Any]] = []
    try:
        rates = [int(r) for r in args.rates.split(",")]
        runs = [(name, shape, rate) for name, shape in shapes.items() for rate in rates]

        def record(result: dict[str, Any], name: str, shape: LoadShape) -> None:
            result["load"] = load
            result["shape"] = name
            result["load_shape"] = asdict(shape) if load == "redis-benchmark" else None
            result["fetch_values"] = args.fetch_values
            results.append(result)
            print(json.dumps(result), flush=True)
            asyncio.run(cleanup(url, prefix))

        if args.path in ("connector", "both"):
            for name, shape, rate in runs:
                result = asyncio.run(
                    connector_phase(url, prefix, rate, args.seconds, load, args.fetch_values, shape)
                )
                record(result, name, shape)
        if args.path in ("feed", "both"):
            feed = Child(
                feed_main, feed_config(url, port, prefix, args.fetch_values), name="feed-redis"
            )
            feed.recv(60)
            for name, shape, rate in runs:
                result = asyncio.run(
                    phase(
                        url,
                        f"http://127.0.0.1:{port}",
                        prefix,
                        rate,
                        args.seconds,
                        load,
                        feed.pid,
                        args.client,
                        shape,
                    )
                )
                record(result, name, shape)
    finally:
        if feed is not None:
            feed.stop()
        with contextlib.suppress(Exception):
            asyncio.run(cleanup(url, prefix))
        if server is not None:
            server.close()
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"redis_keyspace-{stamp}.json"
    where = f"private cluster of {args.cluster}" if args.cluster else "private"
    out.write_text(json.dumps({"url": where if server else url, "runs": results}, indent=2))
    print()
    print(
        f"{'path':9} {'shape':7} {'SET/s':>6} {'delivered/written':>19} {'p50 ms':>7} {'p99 ms':>7}"
    )
    for r in results:
        print(
            f"{r['path']:9} {r['shape']:7} {r['write_rate']:6} "
            f"{r['delivered']:>9}/{r['written']:<9} {r['latency_ms_p50']:7} {r['latency_ms_p99']:7}"
        )
    print(f"wrote {out}")


class ClusterInThread:
    """A Redis Cluster (tests/support/redis_cluster.py) held open by a thread with its own event
    loop, since each phase here runs in its own `asyncio.run`."""

    def __init__(self, primaries: int) -> None:
        import threading

        from tests.support.redis_cluster import redis_cluster

        ready, self._done = threading.Event(), threading.Event()
        box: dict[str, Any] = {}

        async def hold() -> None:
            async with redis_cluster(primaries=primaries) as cluster:
                box["url"] = cluster.url
                ready.set()
                await asyncio.to_thread(self._done.wait)

        def run() -> None:
            try:
                asyncio.run(hold())
            except BaseException as exc:
                box["error"] = exc
                ready.set()

        self._thread = threading.Thread(target=run, name="redis-cluster", daemon=True)
        self._thread.start()
        if not ready.wait(120) or "error" in box:
            raise RuntimeError(f"the Redis Cluster did not start: {box.get('error')!r}")
        self.url: str = box["url"]

    def close(self) -> None:
        self._done.set()
        self._thread.join(60)


if __name__ == "__main__":
    main()
