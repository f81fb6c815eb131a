"""One PNG with the run's figures: fan-out CPU, fan-out throughput, latency, idle memory."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def draw(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results.get("summary", {})
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    fan = [e for e in summary.get("fanout", []) if e["rooms"] == 1]

    ax = axes[0][0]
    if fan:
        xs = [e["clients"] for e in fan]
        ax.plot(
            xs, [e["feed_us_per_change"] for e in fan], "o-", label="feed: per delivered change"
        )
        ax.plot(xs, [e["feed_us_per_frame"] for e in fan], "o:", label="feed: per frame sent")
        ax.plot(
            xs, [e["baseline_us_per_frame"] for e in fan], "s--", label="raw websockets: per frame"
        )
        node = [e for e in fan if not math.isnan(e.get("node_us_per_change", math.nan))]
        if node:
            ax.plot(
                [e["clients"] for e in node],
                [e["node_us_per_change"] for e in node],
                "d-.",
                label="Node.js Socket.IO: per delivered change",
            )
        sio = [e for e in fan if not math.isnan(e.get("socketio_us_per_change", math.nan))]
        if sio:
            ax.plot(
                [e["clients"] for e in sio],
                [e["socketio_us_per_change"] for e in sio],
                "x",
                markersize=10,
                label="plain python-socketio emit: per change",
            )
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    ax.set_yscale("log")
    ax.set_title("Fan-out, one room: server CPU (OS time) per delivery")
    ax.set_xlabel("clients in the room")
    ax.set_ylabel("µs of server CPU")

    ax = axes[0][1]
    if fan:
        xs = [e["clients"] for e in fan]
        ax.plot(xs, [e["feed_changes_per_s"] for e in fan], "o-", label="feed")
        ax.plot(xs, [e["baseline_changes_per_s"] for e in fan], "s--", label="raw websockets")
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    ax.set_title("Fan-out: changes delivered per second (all clients)")
    ax.set_xlabel("clients in the room")
    ax.set_ylabel("changes/s")

    ax = axes[1][0]
    for source, style in (("postgres", "o"), ("redis", "^"), ("mongodb", "s")):
        block = results.get(source)
        if not isinstance(block, dict) or "latency" not in block:
            continue
        for server in ("feed", "relay"):
            rows = [r for r in block["latency"] if r["server"] == server and r["p50_ms"]]
            if not rows:
                continue
            label = f"{source} {'feed' if server == 'feed' else 'asyncpg→socketio relay'}"
            xs = [r["achieved_rate"] for r in rows]
            line = ax.plot(xs, [r["p50_ms"] for r in rows], style + "-", label=label + " p50")
            ax.plot(
                xs,
                [r["p99_ms"] for r in rows],
                style + ":",
                color=line[0].get_color(),
                label=label + " p99",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title("Commit-to-client latency")
    ax.set_xlabel("changes/s committed")
    ax.set_ylabel("ms")
    ax.legend(fontsize=7)

    ax = axes[1][1]
    idle = summary.get("idle", [])
    if idle:
        labels = [f"{e['server']}\n{e['clients']}" for e in idle]
        ax.bar(labels, [e["kib_per_connection"] for e in idle], color="tab:blue")
        ax.axhline(20, color="tab:red", linestyle="--", label="target: 20 KiB")
        ax.legend(fontsize=8)
    ax.set_title("Server memory per idle connection")
    ax.set_ylabel("KiB (RSS growth / clients)")

    machine = results.get("machine", {})
    fig.suptitle(
        f"{results.get('mode', '')} run {results.get('started', '')} on "
        f"{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, "
        f"Python {machine.get('python', '?')}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
