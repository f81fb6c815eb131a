"""Memory per idle connection: N connected, subscribed, silent clients in one server process.

The figure is the growth of the server's resident memory (RSS and, where readable, USS) from
before the first client to a few seconds after the last one subscribed, divided by N. With
`--cpu SECONDS`, also the server's CPU over that many idle seconds (the pings and pongs every
connection exchanges each ping interval, 25 s by default), as a share of one core.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from bench.fanout import Server
from bench.swarm import Swarm


@dataclass
class IdleResult:
    server: str
    clients: int
    connected: int
    rss_before: int
    rss_after: int
    kib_per_connection: float
    uss_kib_per_connection: float
    connect_seconds: float
    idle_cpu_percent: float | None = None
    """Server CPU while the N clients sat idle, % of one core (when a window was asked for)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure(
    kind: str, clients: int, processes: int = 4, settle: float = 3.0, cpu_window: float = 0.0
) -> IdleResult:
    server = Server(kind, ["t0"])
    try:
        # One client first, so that lazily built machinery is not charged to the N that follow.
        warm = Swarm(server.port, server.rooms, 1, processes=1, probes=0)
        warm.stop()
        time.sleep(1.0)
        before = server.usage()
        started = time.monotonic()
        swarm = Swarm(
            server.port, server.rooms, clients, processes=processes, probes=0, timeout=300
        )
        try:
            connect_seconds = time.monotonic() - started
            _, connected = server.child.ask("clients")
            time.sleep(settle)
            after = server.usage()
            idle_cpu = None
            if cpu_window > 0:
                time.sleep(cpu_window)
                idle_cpu = 100 * (server.usage().cpu - after.cpu) / cpu_window
        finally:
            swarm.stop()
    finally:
        server.stop()
    return IdleResult(
        server=kind,
        clients=clients,
        connected=connected,
        rss_before=before.rss,
        rss_after=after.rss,
        kib_per_connection=(after.rss - before.rss) / clients / 1024,
        uss_kib_per_connection=(after.uss - before.uss) / clients / 1024
        if after.uss
        else float("nan"),
        connect_seconds=connect_seconds,
        idle_cpu_percent=idle_cpu,
    )


def _main() -> None:
    """`python -m bench.idle [N ...]`: the feed, plain python-socketio and the raw websockets
    server at each N (default 1000), in one run, as `python -m bench --only idle` measures them.
    `python -m bench.idle --cluster [N ...]`: the feed alone and as a node of a cluster.
    `--cpu SECONDS` adds the server's CPU over that many idle seconds."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.idle", description=_main.__doc__)
    parser.add_argument("clients", nargs="*", type=int, help="idle clients per run (1000)")
    parser.add_argument("--cluster", action="store_true", help="the feed alone and as a node")
    parser.add_argument("--cpu", type=float, default=0.0, metavar="SECONDS", help="idle CPU too")
    args = parser.parse_args()  # `--help`, or a count that is not a number, was a traceback
    kinds: tuple[str, ...] = ("feed", "socketio", "baseline")
    if args.cluster:  # the feed alone and as one node of a cluster
        kinds = ("feed", "feed-cluster")
    window = args.cpu
    for n in args.clients or [1000]:
        for kind in kinds:
            result = measure(kind, n, processes=max(2, n // 2500), cpu_window=window)
            cpu = result.idle_cpu_percent
            print(
                f"{kind:8} clients={n:6} {result.kib_per_connection:5.1f} KiB/conn RSS "
                f"{result.uss_kib_per_connection:5.1f} USS ({result.connected} connected, "
                f"{result.connect_seconds:.1f} s to connect)"
                + (f", idle {cpu:.1f}% of a core" if cpu is not None else ""),
                flush=True,
            )


if __name__ == "__main__":
    _main()
