"""Clients arriving and leaving at once: the server CPU each storm costs, for growing counts.

    python -m bench.storm                      # 1,000, 2,000, 4,000 and 8,000 clients
    python -m bench.storm --clients 5000,10000

Each client follows a room of its own (as per-user rooms do); all of them are cut at once (their
processes stopped), and the server's CPU is read from /proc until it stops moving. A cost that
grows with the square of the count (python-socketio's manager, which scanned every room per
disconnect) shows as a ratio of 4 between two counts a factor 2 apart; the feed's own manager
(feed/delivery/manager.py) should show 2.
"""

from __future__ import annotations

import argparse
import time

from bench.fanout import Server
from bench.procs import raise_nofile
from bench.swarm import Swarm

QUIET = 1.5
"""Seconds without any CPU time added that end a storm."""


def storm(count: int) -> tuple[float, float, float]:
    """(server CPU seconds to connect them, to let them go, and seconds until it settled) for
    `count` clients arriving (as fast as four processes connect them) and leaving at once."""
    server = Server("feed", [f"t{i}" for i in range(count)])
    try:
        idle = server.usage().cpu
        swarm = Swarm(server.port, server.rooms, count, processes=4)
        before = server.usage().cpu
        started = time.monotonic()
        swarm.stop()
        last, moved = server.usage().cpu, time.monotonic()
        while time.monotonic() - moved < QUIET:
            time.sleep(0.1)
            now = server.usage().cpu
            if now != last:
                last, moved = now, time.monotonic()
        return before - idle, last - before, moved - started
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.storm")
    parser.add_argument("--clients", default="1000,2000,4000,8000", help="comma-separated")
    args = parser.parse_args()
    raise_nofile()
    for count in (int(n) for n in args.clients.split(",")):
        arriving, leaving, seconds = storm(count)
        print(
            f"{count} clients: arriving {arriving:.2f} s of server CPU "
            f"({1e6 * arriving / count:.0f} µs each); leaving at once {leaving:.2f} s "
            f"({1e6 * leaving / count:.0f} µs each), settled in {seconds:.1f} s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
