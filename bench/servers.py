"""The servers under test, each in its own process: the feed itself, and the raw baseline.

Both make their changes in-process at a paced rate (the in-memory connector's `write` for the
feed; the same dict and the same `42["change",{...}]` text for the baseline), so the CPU the
operating system charges to the server process covers producing, routing and sending alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib
import itertools
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Coroutine, Iterator
from multiprocessing.connection import Connection
from typing import Any

from bench.procs import paced, raise_nofile, serve_commands


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


BENCH_LIMITS = {"connections_per_address": 0}
"""Every bench client connects from this machine's one address: uncapped per address (the
default, 100 anonymous connections, would refuse all but the first hundred)."""

BENCH_LIMITS_TOML = "".join(f"{key} = {value}\n" for key, value in BENCH_LIMITS.items())
"""`BENCH_LIMITS` as lines of a `[limits]` table."""


def server_section(port: int, extra: str = "", limits: str = "") -> str:
    """The `[server]` table every bench feed runs with (loopback, no dashboard, quiet logs), and
    its `[limits]` (`BENCH_LIMITS`, then `limits`)."""
    return f"""
[server]
host = "127.0.0.1"
port = {port}
dashboard = false
log_level = "warning"
{extra}

[limits]
{BENCH_LIMITS_TOML}{limits}
"""


def memory_config(targets: list[str], port: int, extra: str = "", limits: str = "") -> str:
    names = ", ".join(json.dumps(t) for t in targets)
    return (
        # BENCH_REPLAY_BUFFER: a few, to measure with every room's buffer full (each change
        # evicts one), as a feed that has run a while has them.
        server_section(
            port, f"replay_buffer = {os.environ.get('BENCH_REPLAY_BUFFER', 1000)}\n{extra}", limits
        )
        + f"""
[[connectors]]
name = "mem"
type = "memory"
targets = [{names}]
"""
    )


# -- the feed --------------------------------------------------------------------------------


def feed_main(conn: Connection, config_toml: str) -> None:
    raise_nofile()
    if os.environ.get("BENCH_TRACEMALLOC"):
        import tracemalloc

        tracemalloc.start(int(os.environ["BENCH_TRACEMALLOC"]))
    logging.basicConfig(level=logging.WARNING)
    if os.environ.get("BENCH_GC") == "off":  # how much of the CPU is the cycle collector's
        import gc

        gc.disable()
    if os.environ.get("BENCH_GC_LOG"):
        _log_gc_pauses(os.environ["BENCH_GC_LOG"])
    run_in_loop(_feed(conn, config_toml))


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop when asked for or ("auto") when installed, as uvicorn's loop="auto" chooses."""
    if name in ("auto", "uvloop"):
        try:  # not a dependency: installed by hand to compare
            factory: Callable[[], asyncio.AbstractEventLoop]
            factory = importlib.import_module("uvloop").new_event_loop
            return factory
        except ImportError:
            if name == "uvloop":
                raise
    return asyncio.new_event_loop


def run_in_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run the feed on the loop `feed serve` would pick (BENCH_LOOP=asyncio|uvloop to compare)."""
    with asyncio.Runner(loop_factory=loop_factory(os.environ.get("BENCH_LOOP", "auto"))) as r:
        r.run(main)


_profile: list[Any] = []


@contextlib.contextmanager
def _profiling() -> Iterator[None]:
    """With BENCH_CPROFILE=<file>: the process's cProfile runs through the block and is written
    to the file after it (over every block so far). For call counts per change over the emits
    alone, not the clients' connections; not for timings, which cProfile skews."""
    if not os.environ.get("BENCH_CPROFILE"):
        yield
        return
    if not _profile:
        import cProfile

        _profile.append(cProfile.Profile())
    profile = _profile[0]
    profile.enable()
    try:
        yield
    finally:
        profile.disable()
        profile.dump_stats(os.environ["BENCH_CPROFILE"])


def _log_gc_pauses(path: str) -> None:
    """Append every garbage-collector pause (generation, ms) to `path`: is a tail the GC's?"""
    import gc
    import time

    started: list[float] = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            with open(path, "a") as out:
                pause = (time.perf_counter() - started[0]) * 1000
                out.write(f"{info['generation']} {pause:.3f} {time.time():.3f}\n")

    gc.callbacks.append(callback)


async def _feed(conn: Connection, config_toml: str) -> None:

    from connectors.memory import MemoryConnector
    from feed.app.config import parse_config
    from feed.app.server import FeedApp, QuietServer

    config = parse_config(config_toml, "bench.toml", dict(os.environ))
    app = FeedApp(config)
    # QuietServer: the parent stops this child through its pipe (or terminate()), so uvicorn must
    # not take over its SIGINT/SIGTERM (uvicorn 0.54 no longer reads install_signal_handlers).
    server = QuietServer(  # configured as `feed serve` configures it (feed.app.cli)
        app.uvicorn_config(
            config.server.host,
            config.server.port,
            log_level="warning",
            # A knob for comparing uvicorn's websocket implementations; `feed serve` uses "auto".
            ws=os.environ.get("BENCH_UVICORN_WS", "auto"),
        )
    )
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(30):
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn exited before it started")
            await asyncio.sleep(0.01)
    conn.send(("ready", config.server.port))

    snapshot: Any = None
    keys = itertools.count()

    async def handle(request: tuple[Any, ...]) -> Any:
        nonlocal snapshot
        op = request[0]
        if op == "trace":  # where memory grows between two calls (BENCH_TRACEMALLOC=1)
            import gc
            import tracemalloc

            gc.collect()
            now = tracemalloc.take_snapshot()
            lines: list[str] = []
            if snapshot is not None:
                by_file = now.compare_to(snapshot, "filename")
                lines.append(f"total {sum(s.size_diff for s in by_file) / 1024:.0f} KiB")
                lines.extend(str(stat) for stat in by_file[:15])
                stats = now.compare_to(snapshot, "traceback" if request[1] else "lineno")
                for stat in stats[: request[2]]:
                    lines.append(str(stat))
                    if request[1]:
                        lines.extend("    " + line for line in stat.traceback.format()[-12:])
            snapshot = now
            return ("trace", "\n".join(lines))
        if op == "emit":
            targets, count, rate = request[1:]
            memory = MemoryConnector.instances["mem"]
            n = len(targets)

            def write(i: int) -> None:
                # A fresh key each time: numbering from 0 on every emit made every change after
                # the warm-up an insert over a stored row, carrying a `before` image (bigger
                # frames than the baselines send).
                memory.write(targets[i % n], "insert", {"id": next(keys), "t": time.time()})

            with _profiling():
                seconds = await paced(count, rate, write)
            return ("emitted", seconds)
        if op == "burst":  # `count` inserts at once, as one statement's rows arrive
            target, count, users, offset = request[1:]
            memory = MemoryConnector.instances["mem"]
            for i in range(count):
                row = {"id": next(keys), "user_id": (offset + i) % users, "t": time.time()}
                memory.write(target, "insert", row)
            return ("emitted", count)
        if op == "clients":
            return ("clients", len(app.hub.clients))
        raise ValueError(f"unknown request {op!r}")

    try:
        await serve_commands(conn, handle)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


def change_payload(target: str, room: str, i: int, seq: int) -> dict[str, Any]:
    """The `i`th change the baselines emit: the shape of the feed's memory connector's."""
    return {
        "id": f"mem:{i + 1}",
        "connector": "mem",
        "source": "memory",
        "target": target,
        "op": "insert",
        "key": i,
        "before": None,
        "after": {"id": i, "t": time.time()},
        "ts": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "room": room,
        "seq": seq,
    }


# -- the raw baseline: `websockets` broadcast, speaking just enough Engine.IO ---------------


def baseline_main(conn: Connection, port: int) -> None:
    raise_nofile()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_baseline(conn, port))


async def _baseline(conn: Connection, port: int) -> None:
    from websockets.asyncio.server import ServerConnection, broadcast, serve

    rooms: dict[str, set[ServerConnection]] = {}
    seqs: dict[str, int] = {}
    clients = 0

    async def handler(ws: ServerConnection) -> None:
        nonlocal clients
        joined: list[str] = []
        clients += 1
        try:
            await ws.send(
                "0"
                + json.dumps(
                    {
                        "sid": secrets.token_urlsafe(15),
                        "upgrades": [],
                        "pingInterval": 25000,
                        "pingTimeout": 20000,
                        "maxPayload": 1000000,
                    }
                )
            )
            async for message in ws:
                assert isinstance(message, str)
                if message == "40":
                    await ws.send("40" + json.dumps({"sid": secrets.token_urlsafe(15)}))
                elif message.startswith("42"):
                    bracket = message.index("[")
                    ack_id = message[2:bracket]
                    event, body = json.loads(message[bracket:])
                    if event == "subscribe":
                        room = body["room"]
                        rooms.setdefault(room, set()).add(ws)
                        joined.append(room)
                        ack = {
                            "ok": True,
                            "room": room,
                            "seq": seqs.get(room, 0),
                            "recovered": None,
                        }
                        await ws.send(f"43{ack_id}" + json.dumps([ack]))
        except Exception:
            pass
        finally:
            clients -= 1
            for room in joined:
                rooms.get(room, set()).discard(ws)

    async with serve(handler, "127.0.0.1", port, compression=None, max_queue=None):
        conn.send(("ready", port))

        async def handle(request: tuple[Any, ...]) -> Any:
            op = request[0]
            if op == "emit":
                targets, count, rate = request[1:]
                n = len(targets)

                def write(i: int) -> None:
                    target = targets[i % n]
                    room = f"mem:{target}"
                    seq = seqs[room] = seqs.get(room, 0) + 1
                    payload = change_payload(target, room, i, seq)
                    text = "42" + json.dumps(["change", payload], separators=(",", ":"))
                    broadcast(rooms.get(room, ()), text)

                seconds = await paced(count, rate, write)
                return ("emitted", seconds)
            if op == "clients":
                return ("clients", clients)
            raise ValueError(f"unknown request {op!r}")

        await serve_commands(conn, handle)


# -- plain python-socketio: the stack the feed is built on, with its own room emit -----------


def socketio_main(conn: Connection, port: int) -> None:
    raise_nofile()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_socketio(conn, port))


async def _socketio(conn: Connection, port: int) -> None:
    import socketio
    import uvicorn

    from feed.app.server import QuietServer

    sio = socketio.AsyncServer(async_mode="asgi", logger=False, engineio_logger=False)
    seqs: dict[str, int] = {}

    @sio.on("subscribe")  # type: ignore[untyped-decorator]
    async def subscribe(sid: str, data: dict[str, Any]) -> dict[str, Any]:
        await sio.enter_room(sid, data["room"])
        return {"ok": True, "room": data["room"], "seq": seqs.get(data["room"], 0)}

    server = QuietServer(
        uvicorn.Config(socketio.ASGIApp(sio), host="127.0.0.1", port=port, log_level="warning")
    )
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(30):
        while not server.started:  # noqa: ASYNC110 - uvicorn offers no event for this
            await asyncio.sleep(0.01)
    conn.send(("ready", port))

    async def handle(request: tuple[Any, ...]) -> Any:
        op = request[0]
        if op == "emit":
            targets, count, rate = request[1:]
            n = len(targets)
            pending: set[asyncio.Task[None]] = set()

            def write(i: int) -> None:
                target = targets[i % n]
                room = f"mem:{target}"
                seq = seqs[room] = seqs.get(room, 0) + 1
                payload = change_payload(target, room, i, seq)
                emit = asyncio.ensure_future(sio.emit("change", payload, room=room))
                pending.add(emit)
                emit.add_done_callback(pending.discard)

            with _profiling():
                seconds = await paced(count, rate, write)
            return ("emitted", seconds)
        if op == "clients":
            return ("clients", len(sio.manager.rooms.get("/", {}).get(None, {})))
        raise ValueError(f"unknown request {op!r}")

    try:
        await serve_commands(conn, handle)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)
