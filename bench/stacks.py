"""Summarise a py-spy `--format raw` (collapsed stacks) file: where the server's samples go."""

from __future__ import annotations

import re
import sys
from collections import Counter

FRAME = re.compile(r"^(?P<func>[^ ]+) \((?P<file>[^:]+)(?::\d+)?\)$")


def short(frame: str) -> str:
    m = FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m["file"]
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/", "/work/i15/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{m['func']} ({path})"


def summarise(path: str, top: int = 25) -> str:
    total = 0
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    with open(path) as lines:
        records = [line.rstrip().rpartition(" ") for line in lines]
    for stack, _, count in records:
        if not stack:
            continue
        n = int(count)
        frames = [short(f) for f in stack.split(";")]
        total += n
        leaf[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    out = [f"{total} samples", "", "inclusive:"]
    out += [f"{c / total:6.1%}  {f}" for f, c in inclusive.most_common(top)]
    out += ["", "self:"]
    out += [f"{c / total:6.1%}  {f}" for f, c in leaf.most_common(top)]
    return "\n".join(out)


if __name__ == "__main__":
    print(summarise(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 25))
