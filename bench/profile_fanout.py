"""Profile the feed's fan-out: the server under py-spy while N clients follow one room (or
`--rooms` rooms, the clients spread evenly over them).

    python -m bench.profile_fanout --clients 100 --rate 100 --seconds 6
    python -m bench.profile_fanout --clients 1000 --rooms 1000 --rate 2000 --seconds 6
writes a raw collapsed-stack file to bench/results/ (summarise it with bench/stacks.py).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
from pathlib import Path

from bench.fanout import Server
from bench.swarm import Swarm

RESULTS = Path(__file__).parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rooms", type=int, default=1)
    parser.add_argument("--rate", type=float, default=100)
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--tag", default="")
    parser.add_argument("--spy-rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument(
        "--gil",
        action="store_true",
        help="only samples holding the GIL: the Python work, without time in epoll or send",
    )
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    server = Server("feed", [f"t{i}" for i in range(args.rooms)])
    try:
        swarm = Swarm(server.port, server.rooms, args.clients)
        try:
            stem = RESULTS / f"profile-{args.clients}x{args.rooms}{args.tag}"
            spy = [
                str(Path(sys.executable).with_name("py-spy")),
                "record",
                "--pid",
                str(server.child.pid),
                "--duration",
                str(int(args.seconds)),
                "--rate",
                str(args.spy_rate),
                *(["--gil"] if args.gil else []),
            ]

            def record() -> None:
                subprocess.run(
                    [*spy, "--format", "raw", "-o", f"{stem}.txt"],
                    check=False,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )

            thread = threading.Thread(target=record)
            thread.start()
            count = int(args.rate * (args.seconds + 1))
            server.emit(count, args.rate, timeout=args.seconds * 4 + 60)
            thread.join()
            swarm.wait(count // args.rooms, timeout=30, quiet=2)
        finally:
            swarm.stop()
    finally:
        server.stop()
    print(f"wrote {stem}.txt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
