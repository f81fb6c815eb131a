"""`feed serve` with a memory trace, for a soak that shows growth (BENCH_SOAK_TRACE=<seconds>).

    python -m bench.soak_node <report file> serve --config ... (started by bench.soak)

Runs the feed's own command line in this process, and a thread that every BENCH_SOAK_TRACE
seconds appends to the report what grew since the first trace (tracemalloc, by line, with
BENCH_SOAK_FRAMES frames of traceback for the largest) and the live objects by type that grew
(gc.get_objects): where a slow leak's memory comes from. The trace slows the feed by about a
third; read the soak's figures from a run without it.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
import tracemalloc
from collections import Counter


def types() -> Counter[str]:
    return Counter(type(o).__qualname__ for o in gc.get_objects())


def trace(path: str, every: float, frames: int) -> None:
    time.sleep(every)
    first_types = types()
    first = tracemalloc.take_snapshot()
    started = time.monotonic()
    while True:
        time.sleep(every)
        counted = types()  # before the trace's own objects are made
        now = tracemalloc.take_snapshot()
        grown = now.compare_to(first, "traceback" if frames > 1 else "lineno")
        by_type = [(name, counted[name] - first_types.get(name, 0)) for name in counted]
        by_type.sort(key=lambda item: -item[1])
        with open(path, "a") as out:
            total = sum(s.size_diff for s in grown) / 1024
            out.write(f"\n=== {time.monotonic() - started:.0f}s after the first: {total:.0f} KiB\n")
            for stat in grown[:12]:
                out.write(f"{stat}\n")
                if frames > 1:
                    out.writelines(f"    {line}\n" for line in stat.traceback.format()[-frames:])
            out.write("objects by type, grown: ")
            out.write(", ".join(f"{name} {n:+d}" for name, n in by_type[:15]) + "\n")


def main() -> None:
    path, argv = sys.argv[1], sys.argv[2:]
    frames = int(os.environ.get("BENCH_SOAK_FRAMES", "1"))
    tracemalloc.start(max(1, frames))
    every = float(os.environ.get("BENCH_SOAK_TRACE", "60"))
    threading.Thread(target=trace, args=(path, every, frames), daemon=True).start()
    from feed.app.cli import main as feed_main

    sys.exit(feed_main(argv))


if __name__ == "__main__":
    main()
