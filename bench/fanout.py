"""Fan-out: one room (or many) to N clients, the feed against a raw `websockets` broadcast and
the reference Node.js Socket.IO server (bench/node/server.mjs, `io.to(room).emit`).

The figure that matters is server CPU per delivered change, read from the operating system for
the server process over the whole window from the first write until every client has everything.
"""

from __future__ import annotations

import json
import select
import shutil
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.procs import Child, Usage
from bench.servers import baseline_main, feed_main, free_port, memory_config, socketio_main
from bench.swarm import Swarm


@dataclass
class FanoutResult:
    server: str
    clients: int
    rooms: int
    rate: float
    offered: int
    delivered: int
    expected: int
    frames: int
    seconds: float
    elapsed: float
    cpu: float
    cpu_per_change_us: float
    cpu_per_frame_us: float
    changes_per_s: float
    p50_ms: float | None
    p99_ms: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


NODE_DIR = Path(__file__).parent / "node"


def node_available() -> str | None:
    """Why the Node.js baseline cannot run here, or None (it needs node and `npm ci` done)."""
    if shutil.which("node") is None:
        return "node is not installed"
    if not (NODE_DIR / "node_modules" / "socket.io").is_dir():
        return f"socket.io is not installed: run `npm ci --prefix {NODE_DIR}` (make bench does)"
    return None


class NodeChild:
    """The Node.js Socket.IO server as a child process, driven over stdin/stdout (JSON lines)
    with the same ask/recv/stop/pid as a bench.procs.Child."""

    def __init__(self, port: int) -> None:
        self.proc = subprocess.Popen(
            ["node", str(NODE_DIR / "server.mjs"), str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def recv(self, timeout: float) -> Any:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"the Node.js server did not answer within {timeout:.0f}s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the Node.js server exited ({self.proc.poll()})")
        message = json.loads(line)
        if message["op"] == "error":
            raise RuntimeError(f"node: {message['message']}")
        if message["op"] == "ready":
            return ("ready", message["port"])
        if message["op"] == "emitted":
            return ("emitted", message["seconds"])
        return (message["op"], message.get("count"))

    def ask(self, op: str, *args: Any, timeout: float = 60.0) -> Any:
        assert self.proc.stdin is not None
        request: dict[str, Any] = {"op": op}
        if op == "emit":
            request.update(zip(("targets", "count", "rate"), args, strict=True))
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self.recv(timeout)

    def stop(self) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # the server exits when its stdin closes
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(5)


class Server:
    """A feed or baseline server process on a fresh port, serving `targets` of connector `mem`."""

    def __init__(self, kind: str, targets: list[str]) -> None:
        self.kind = kind
        self.targets = targets
        port = free_port()
        self.redis: Any = None
        self.child: Child | NodeChild
        if kind == "feed":
            self.child = Child(feed_main, memory_config(targets, port), name="feed")
        elif kind == "node":
            self.child = NodeChild(port)
        elif kind == "feed-cluster":  # the same feed as one node of a cluster (private Redis)
            from bench.cluster import RedisProcess

            self.redis = RedisProcess()
            cluster = f'\n[cluster]\nurl = "{self.redis.url}"\nprefix = "bench"\n'
            self.child = Child(feed_main, memory_config(targets, port) + cluster, name="feed")
        elif kind == "socketio":
            self.child = Child(socketio_main, port, name="socketio")
        else:
            self.child = Child(baseline_main, port, name="baseline")
        _, self.port = self.child.recv(60)

    @property
    def rooms(self) -> list[str]:
        return [f"mem:{t}" for t in self.targets]

    def usage(self) -> Usage:
        return Usage.of(self.child.pid)

    def emit(self, count: int, rate: float, timeout: float) -> float:
        _, seconds = self.child.ask("emit", self.targets, count, rate, timeout=timeout)
        return float(seconds)

    def stop(self) -> None:
        self.child.stop()
        if self.redis is not None:
            self.redis.close()


def run_point(
    server: Server,
    swarm: Swarm,
    clients: int,
    rate: float,
    seconds: float,
    warmup: float = 1.0,
) -> FanoutResult:
    """Warm up, then offer `rate` changes/s for `seconds` and count what the clients get."""
    rooms = len(server.targets)
    warm = max(rooms, int(rate * warmup))
    warm -= warm % rooms
    swarm.reset()
    server.emit(warm, rate, timeout=warmup + 60)
    swarm.wait(warm // rooms, timeout=60, quiet=2.0)
    swarm.reset()
    count = max(rooms, int(rate * seconds))
    count -= count % rooms
    before = server.usage()
    started = time.monotonic()
    server.emit(count, rate, timeout=seconds * 4 + 60)
    counts = swarm.wait(count // rooms, timeout=seconds * 4 + 60, quiet=3.0)
    after = server.usage()
    # Until the last client had its last change (one monotonic clock for all processes): a
    # server that falls behind takes longer than the nominal window.
    elapsed = max(seconds, counts.last_receive - started)
    cpu = after.cpu - before.cpu
    expected = count // rooms * clients
    delivered = counts.changes
    lat = counts.latencies
    p50 = percentile(lat, 0.5)
    p99 = percentile(lat, 0.99)
    return FanoutResult(
        server=server.kind,
        clients=clients,
        rooms=rooms,
        rate=rate,
        offered=count,
        delivered=delivered,
        expected=expected,
        frames=counts.frames,
        seconds=seconds,
        elapsed=elapsed,
        cpu=cpu,
        cpu_per_change_us=cpu / delivered * 1e6 if delivered else float("nan"),
        cpu_per_frame_us=cpu / counts.frames * 1e6 if counts.frames else float("nan"),
        changes_per_s=delivered / elapsed,
        p50_ms=p50 * 1000 if p50 is not None else None,
        p99_ms=p99 * 1000 if p99 is not None else None,
    )


def compare(
    clients: int,
    rate: float,
    seconds: float,
    rooms: int = 1,
    repeats: int = 3,
    processes: int = 2,
    kinds: tuple[str, ...] = ("feed", "baseline"),
) -> list[FanoutResult]:
    """Alternate feed and baseline `repeats` times at one point, so drift hits both alike."""
    targets = [f"t{i}" for i in range(rooms)]
    results: list[FanoutResult] = []
    for _ in range(repeats):
        for kind in kinds:
            server = Server(kind, targets)
            try:
                swarm = Swarm(server.port, server.rooms, clients, processes=processes)
                try:
                    results.append(run_point(server, swarm, clients, rate, seconds))
                finally:
                    swarm.stop()
            finally:
                server.stop()
    return results


def median_of(results: list[FanoutResult], kind: str, field: str) -> float:
    values = [getattr(r, field) for r in results if r.server == kind]
    return statistics.median(values) if values else float("nan")
