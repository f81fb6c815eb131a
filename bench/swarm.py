"""A process holding many Socket.IO clients, and a pool of such processes.

Clients live in separate processes from the server so the server's CPU time, read from the
operating system, is the server's alone.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from bench.procs import Child, raise_nofile, serve_commands
from bench.wire import SioClient, Stats, connect_many


def swarm_main(
    conn: Connection, host: str, port: int, rooms: list[str], count: int, probes: int
) -> None:
    raise_nofile()
    asyncio.run(_swarm(conn, host, port, rooms, count, probes))


async def _swarm(
    conn: Connection, host: str, port: int, rooms: list[str], count: int, probes: int
) -> None:
    stats = Stats()
    clients: list[SioClient] = []
    try:
        clients = await connect_many(host, port, rooms, count, stats, probes=probes)
    except Exception as exc:
        conn.send(("error", f"{count} clients could not connect: {type(exc).__name__}: {exc}"))
        for client in clients:
            client.close()
        return
    conn.send(("ready", len(clients)))

    async def handle(request: tuple[Any, ...]) -> Any:
        op = request[0]
        if op == "reset":
            stats.reset()
            return ("ok",)
        if op == "wait":
            # Until every client has everything, or nothing arrived for `quiet` seconds.
            expected, timeout, quiet = request[1:]
            started = time.monotonic()
            deadline = started + timeout
            while stats.changes < expected and time.monotonic() < deadline:
                idle = time.monotonic() - max(stats.last_receive, started)
                if idle > quiet:
                    break
                await asyncio.sleep(0.02)
            return (
                "counts",
                stats.changes,
                stats.frames,
                stats.latencies,
                stats.disconnected,
                stats.last_receive,
            )
        raise ValueError(f"unknown request {op!r}")

    try:
        await serve_commands(conn, handle)
    finally:
        for client in clients:
            client.close()
        await asyncio.sleep(0.1)


@dataclass
class Counts:
    changes: int = 0
    frames: int = 0
    latencies: list[float] = field(default_factory=list)
    disconnected: int = 0
    last_receive: float = 0.0
    """time.monotonic() of the last frame any client got (the clock is shared by processes)"""


class Swarm:
    """`count` clients spread over `processes` processes, each following one of `rooms`."""

    def __init__(
        self,
        port: int,
        rooms: list[str],
        count: int,
        processes: int = 2,
        probes: int = 1,
        host: str = "127.0.0.1",
        timeout: float = 120.0,
    ) -> None:
        processes = max(1, min(processes, count))
        self.sizes = [
            count // processes + (1 if i < count % processes else 0) for i in range(processes)
        ]
        self.children: list[Child] = []
        try:
            first = 0
            for i, size in enumerate(self.sizes):
                # Each process starts where the one before stopped, so that the clients cover
                # the rooms evenly: with as many clients as rooms, one client per room. (Rotating
                # by the process's index left 1,000 clients in 1,000 rooms as two clients in
                # each of 500 rooms, and half the changes with no one to go to.)
                shift = first % len(rooms)
                rotated = rooms[shift:] + rooms[:shift]
                first += size
                self.children.append(
                    Child(swarm_main, host, port, rotated, size, probes, name=f"swarm{i}")
                )
            for child in self.children:
                child.recv(timeout)
        except BaseException:
            self.stop()
            raise

    def reset(self) -> None:
        for child in self.children:
            child.conn.send(("reset",))
        for child in self.children:
            child.recv(30)

    def wait(self, expected_per_client: int, timeout: float, quiet: float = 2.0) -> Counts:
        for child, size in zip(self.children, self.sizes, strict=True):
            child.conn.send(("wait", expected_per_client * size, timeout, quiet))
        total = Counts()
        for child in self.children:
            _, changes, frames, latencies, disconnected, last = child.recv(timeout + 30)
            total.last_receive = max(total.last_receive, last)
            total.changes += changes
            total.frames += frames
            total.latencies.extend(latencies)
            total.disconnected += disconnected
        return total

    def stop(self) -> None:
        for child in self.children:
            child.stop()
