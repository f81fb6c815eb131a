"""The many-rooms point alone, every server in the same run: 1,000 clients each in its own room,
2,000 changes/s in all, the servers alternating round by round so that drift on a shared machine
hits them alike. Prints each window and the medians (server CPU per delivered change, µs).

    python -m bench.many_rooms                       # feed on asyncio and uvloop, Node.js, raw
    python -m bench.many_rooms --rounds 3 --servers feed-asyncio,node

`feed-asyncio` and `feed-uvloop` are the feed on that event loop (BENCH_LOOP, bench.servers),
`feed-uvloop-nogc` (say) the same with the cycle collector off (BENCH_GC=off, to see its share);
`node` the Node.js Socket.IO server (bench/node), `baseline` the raw websockets server.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from bench.fanout import FanoutResult, Server, node_available, run_point
from bench.procs import raise_nofile
from bench.swarm import Swarm

SERVERS = ("feed-asyncio", "feed-uvloop", "node", "baseline")


def one(kind: str, clients: int, rooms: int, rate: float, seconds: float) -> FanoutResult:
    env: dict[str, str] = {}
    if kind.startswith("feed-"):  # feed-<loop>, or feed-<loop>-nogc: the collector off
        kind, _, variant = kind.partition("-")
        loop, _, gc = variant.partition("-")
        env["BENCH_LOOP"] = loop
        if gc == "nogc":
            env["BENCH_GC"] = "off"
    previous = {name: os.environ.get(name) for name in env}
    os.environ.update(env)  # the spawned server inherits it
    try:
        server = Server(kind, [f"t{i}" for i in range(rooms)])
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    try:
        swarm = Swarm(server.port, server.rooms, clients, processes=2)
        try:
            return run_point(server, swarm, clients, rate, seconds)
        finally:
            swarm.stop()
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.many_rooms")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rooms", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=2000.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--servers", default=",".join(SERVERS))
    args = parser.parse_args()
    raise_nofile()
    kinds = [k for k in args.servers.split(",") if k]
    if "node" in kinds and (why := node_available()) is not None:
        print(f"node left out: {why}")
        kinds.remove("node")
    figures: dict[str, list[float]] = {k: [] for k in kinds}
    for round_ in range(1, args.rounds + 1):
        for kind in kinds:
            started = time.monotonic()
            r = one(kind, args.clients, args.rooms, args.rate, args.seconds)
            figures[kind].append(r.cpu_per_change_us)
            print(
                f"round {round_} {kind:13} {r.cpu_per_change_us:6.1f} µs/change  "
                f"delivered {r.delivered}/{r.expected}  frames {r.frames}  "
                f"p50 {r.p50_ms or 0:.1f} ms  ({time.monotonic() - started:.0f} s)",
                flush=True,
            )
    medians = {k: statistics.median(v) for k, v in figures.items() if v}
    print("medians, µs per delivered change:")
    for kind, value in medians.items():
        ratio = f"  / node {value / medians['node']:.2f}" if "node" in medians else ""
        print(f"  {kind:13} {value:6.1f}  {figures[kind]}{ratio}")
    print(json.dumps({"figures": figures, "medians": medians}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
