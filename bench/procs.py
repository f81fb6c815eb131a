"""Process plumbing: start a server or a client swarm in its own process, talk to it over a pipe,
and read its CPU time and memory from the operating system (never wall time).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import psutil

CTX = mp.get_context("spawn")


def raise_nofile() -> int:
    """Lift the soft open-file limit to the hard one (10,000 sockets need 10,000 descriptors)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass
class Usage:
    cpu: float
    """user + system seconds"""
    rss: int
    uss: int

    @classmethod
    def of(cls, pid: int) -> Usage:
        proc = psutil.Process(pid)
        try:
            uss = proc.memory_full_info().uss
        except (psutil.AccessDenied, AttributeError):
            uss = 0
        return cls(cpu_seconds(pid), proc.memory_info().rss, uss)


def cpu_seconds(pid: int) -> float:
    """A process's CPU time, all its threads, to the nanosecond: Linux's clock of another
    process (what `clock_getcpuclockid` returns). The user and system times the OS reports count
    in ticks of 10 ms: 16,000 deliveries at 50 µs each were 80 ticks, one tick 1.25% of the
    figure; elsewhere, psutil's times."""
    try:
        return time.clock_gettime((~pid << 3) | 2)  # MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)
    except (OSError, AttributeError):  # not Linux
        times = psutil.Process(pid).cpu_times()
        return float(times.user + times.system)


class Child:
    """A spawned process running `target(conn, *args)`, driven by request/response messages."""

    def __init__(self, target: Callable[..., Any], *args: Any, name: str = "bench") -> None:
        self.conn, child_conn = CTX.Pipe()
        self.proc = CTX.Process(target=target, args=(child_conn, *args), name=name, daemon=True)
        self.proc.start()
        child_conn.close()

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def recv(self, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"{self.proc.name} did not answer within {timeout:.0f}s")
        message = self.conn.recv()
        if isinstance(message, tuple) and message and message[0] == "error":
            raise RuntimeError(f"{self.proc.name}: {message[1]}")
        return message

    def ask(self, *request: Any, timeout: float = 60.0) -> Any:
        self.conn.send(request)
        return self.recv(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        with contextlib.suppress(Exception):
            self.conn.send(("stop",))
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


async def serve_commands(conn: Connection, handle: Callable[[tuple[Any, ...]], Any]) -> None:
    """Answer the parent's requests until it says stop; `handle` may be a coroutine function."""
    loop = asyncio.get_running_loop()
    while True:
        request = await loop.run_in_executor(None, conn.recv)
        if request[0] == "stop":
            return
        try:
            result = handle(request)
            if asyncio.iscoroutine(result):
                result = await result
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        else:
            conn.send(result)


async def paced(count: int, rate: float, write: Callable[[int], None]) -> float:
    """Call `write(i)` `count` times at `rate` per second; return the seconds it took.

    On the Node.js server's schedule (bench/node/server.mjs), so that every server under test
    gets its changes alike: a timer that wakes in whole milliseconds, at least one apart (Node's
    `setTimeout` truncates a delay to whole milliseconds and waits at least 1), and at each
    wake-up every write that has fallen due, as a real source delivers what arrived meanwhile.
    At 2,000 changes/s that is two writes per wake-up for every server. The pacer before slept
    until each write's own time, so the Python servers woke up to once per write where Node.js
    woke once per two: about 5% of the feed's CPU per change at the many-rooms point.

    The timer is a plain callback (`call_later`), as Node's `setTimeout(tick)` is: a coroutine
    that sleeps costs each wake-up a future and a task step through the request handler's
    coroutines, work of the harness that Node.js's pacer does not do.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[float] = loop.create_future()
    start = loop.time()
    i = 0

    def tick() -> None:
        nonlocal i
        if done.done():  # the request was cancelled: no more writes
            return
        try:
            now = loop.time()
            while i < count and start + i / rate <= now:
                write(i)
                i += 1
        except Exception as exc:  # the awaiting request fails with it, not the loop
            done.set_exception(exc)
            return
        if i >= count:
            done.set_result(loop.time() - start)
            return
        wait = int((start + i / rate - loop.time()) * 1000)  # whole ms, as setTimeout
        loop.call_later(max(1, wait) / 1000, tick)

    tick()
    return await done


def wait_for(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()
