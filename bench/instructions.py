"""User-space instructions per change in the feed's server, counted by callgrind: a figure that
does not drift with the machine's load, for telling apart changes worth a few percent.

    python -m bench.instructions                          # 200 clients in 200 rooms, 200/s
    python -m bench.instructions --clients 100 --rooms 1  # one room to 100 clients

The server runs under valgrind (Debian's `valgrind` package) with instrumentation off; after a
warm-up it is switched on for exactly the measured changes (`callgrind_control -i on/off`), so
start-up, connection set-up and shutdown are not counted. The clients run natively. The rate is
kept low because valgrind slows the server about fifty times: it must keep up, or the changes
would arrive batched and the count would describe another workload. Repeat runs agree within
about 1% at 200 rooms, and within about 3% at 1,000 (110.9k, 113.3k, 114.0k for one build on
2026-12-04); CPU seconds on these shared machines vary by ±10% from one round to the next
(docs/benchmarks.md, "How it measures").
"""

from __future__ import annotations

import argparse
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import procs
from bench.fanout import Server
from bench.procs import raise_nofile
from bench.swarm import Swarm


def wrapper(directory: Path) -> Path:
    """An executable that starts this Python under callgrind, for multiprocessing to spawn."""
    script = directory / "python-under-callgrind"
    script.write_text(
        "#!/bin/sh\n"
        f"exec valgrind --tool=callgrind --instr-atstart=no "
        f'--callgrind-out-file={directory}/callgrind.%p {sys.executable} "$@" 2>/dev/null\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def counted(directory: Path) -> int:
    """The largest total over callgrind's output files (the dump taken for the window)."""
    best = 0
    for path in directory.glob("callgrind.*"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                best = max(best, int(line.split()[1]))
    return best


def control(*args: str) -> None:
    subprocess.run(
        ["callgrind_control", *args],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--rooms", type=int, default=200)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--changes", type=int, default=2000)
    parser.add_argument(
        "--keep", metavar="DIR", help="copy callgrind's output here, for callgrind_annotate"
    )
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("bench.instructions needs valgrind: apt-get install valgrind", file=sys.stderr)
        return 2
    raise_nofile()
    with tempfile.TemporaryDirectory(prefix="bench-callgrind-") as tmp:
        directory = Path(tmp)
        procs.CTX.set_executable(str(wrapper(directory)))
        try:
            server = Server("feed", [f"t{i}" for i in range(args.rooms)])
        finally:
            procs.CTX.set_executable(sys.executable)
        try:
            swarm = Swarm(server.port, server.rooms, args.clients, processes=2)
            try:
                each = args.changes // args.rooms  # changes go round the rooms
                server.emit(2 * args.rooms, args.rate, timeout=120)  # warm-up, not counted
                swarm.wait(2, timeout=120, quiet=2)
                swarm.reset()
                pid = str(server.child.pid)
                control("-i", "on", pid)
                server.emit(args.changes, args.rate, timeout=args.changes / args.rate * 4 + 120)
                got = swarm.wait(each, timeout=120, quiet=2)
                control("-i", "off", pid)
                control("-d", pid)
            finally:
                swarm.stop()
        finally:
            server.stop()
        total = counted(directory)
        if args.keep:
            Path(args.keep).mkdir(parents=True, exist_ok=True)
            for path in directory.glob("callgrind.*"):
                shutil.copy(path, args.keep)
    print(
        f"{total / args.changes / 1000:.1f}k instructions per change "
        f"({args.clients} clients, {args.rooms} rooms, {args.rate:g}/s, {args.changes} changes; "
        f"{got.changes} deliveries)"
    )
    return 0 if total else 1


if __name__ == "__main__":
    raise SystemExit(main())
