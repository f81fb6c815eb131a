"""`feed serve` instrumented for a soak: its live objects counted by type on a signal, and with
BENCH_SOAK_TRACE=<seconds> a memory trace.

    python -m bench.soak_node <report file> serve --config ... (started by bench.soak)

Runs the feed's own command line in this process. On SIGUSR2 it appends one line of JSON to
`<report file>.types`: the live objects by type (gc.get_objects, after a collection), which
bench.soak asks for before the first client and again once every client has left and the
grace has passed: a type with more objects the second time, in proportion to the clients that
came and went, is what a client leaves behind. With BENCH_SOAK_TRACE, a thread appends to the
report every that many seconds what grew since the first trace (tracemalloc, by line, with
BENCH_SOAK_FRAMES frames of traceback each) and the objects by type that grew: where a slow
leak's memory comes from. The trace slows the feed by about a third and inflates its RSS; read
the soak's figures from a run without it.
"""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import sys
import threading
import time
import tracemalloc
from collections import Counter
from types import FrameType


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

    def count_types(signum: int, frame: FrameType | None) -> None:
        gc.collect()
        counted = types()
        # Timers by what they will call (asyncio's and uvloop's TimerHandle): a timer per
        # client that outlives the client shows as `timer <callback>`.
        for o in gc.get_objects():
            if type(o).__name__ == "TimerHandle" and not o.cancelled():
                counted["timer " + re.sub(r" at 0x[0-9a-f]+|when=[0-9.]+ ", "", repr(o))[:120]] += 1
        with open(path + ".types", "a") as out:
            out.write(json.dumps(counted) + "\n")

    signal.signal(signal.SIGUSR2, count_types)
    if os.environ.get("BENCH_SOAK_TRACE"):
        frames = int(os.environ.get("BENCH_SOAK_FRAMES", "1"))
        tracemalloc.start(max(1, frames))
        every = float(os.environ["BENCH_SOAK_TRACE"])
        threading.Thread(target=trace, args=(path, every, frames), daemon=True).start()
    from feed.app.cli import main as feed_main

    sys.exit(feed_main(argv))


if __name__ == "__main__":
    main()
