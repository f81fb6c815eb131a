"""Filter rooms: routing cost per change as the number of distinct filters on one target grows.

Two measurements (docs/benchmarks.md, "Filter rooms"):

- **routing CPU per change**, in a process of its own: the hub's routing step (find the rooms,
  number and buffer the change in each) over a target holding N distinct filter rooms, for
  `user_id=eq.<i>` rooms, `user_id=in.(<a>,<b>,<c>)` rooms, and a mix (a third each of `eq`,
  `in` on another field, and `eq`&`gt`, plus ten range-only rooms); and, for comparison, the
  range-only case (`amount=gt.<x>`, which has no equality part and is checked room by room) and
  the old way of checking every room's filter one by one (`scan`). CPU is `time.process_time`
  over a fixed list of inserts and updates whose images name random users;
- **a burst through the real server**: a feed process (in-memory connector) with one client in
  the table room and N per-user filter rooms subscribed by 20 further clients; the server makes
  3,000 inserts at once, each for one user, and the time until every delivery arrived (the table
  room's 3,000 and each user room's own) and the server's CPU over it are measured.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.procs import Child, Usage, raise_nofile, serve_commands
from bench.servers import feed_main, free_port, memory_config
from bench.wire import SioClient, Stats

TARGET = "orders"
KINDS = ("eq", "in", "mixed", "range", "scan")


def filter_texts(kind: str, count: int) -> list[str]:
    """`count` distinct filters of one kind (see the module docstring)."""
    if kind in ("eq", "scan"):
        return [f"user_id=eq.{i}" for i in range(count)]
    if kind == "in":
        return [f"user_id=in.({i},{i + count},{i + 2 * count})" for i in range(count)]
    if kind == "range":
        return [f"amount=gt.{2000 + i}" for i in range(count)]  # none match: the checks alone
    texts = []
    for i in range(count):
        part = i % 3
        if part == 0:
            texts.append(f"user_id=eq.{i}")
        elif part == 1:
            texts.append(f"tenant=in.({i},{i + count})")
        else:
            texts.append(f"user_id=eq.{i}&amount=gt.{i % 100}")
    texts += [f"amount=gt.{1990 + i}" for i in range(10)]
    return texts


def make_changes(kind: str, rooms: int, count: int, seed: int = 1) -> list[Any]:
    """Inserts and updates whose images name random users (and tenants, amounts)."""
    from feed.core.change import Change

    rng = random.Random(seed)
    spread = 3 * rooms if kind == "in" else max(rooms, 1)
    out = []
    for n in range(count):
        after = {
            "id": n,
            "user_id": rng.randrange(spread),
            "tenant": rng.randrange(2 * rooms),
            "amount": rng.randrange(2000),
            "status": "paid",
        }
        before = None if n % 2 == 0 else {**after, "user_id": rng.randrange(spread)}
        op = "insert" if before is None else "update"
        out.append(Change(f"mem:{n}", "mem", "memory", TARGET, op, n, before, after))
    return out


@dataclass
class RoutingResult:
    kind: str
    rooms: int
    changes: int
    us_per_change: float
    """median of the repeats"""
    repeats: list[float]
    routed_per_change: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_routing(kind: str, rooms: int, changes: int, repeats: int = 3) -> RoutingResult:
    """CPU per change of the hub's routing step over `rooms` filter rooms of `kind`."""
    from feed.core.filters import parse_filter
    from feed.core.rooms import Room
    from feed.routing.hub import TargetRooms

    target = TargetRooms(Room(f"mem:{TARGET}", "mem", TARGET, capacity=1000))
    filters = [parse_filter(t) for t in filter_texts(kind, rooms)]
    all_rooms = [
        Room(f"mem:{TARGET}?{f.canonical}", "mem", TARGET, None, f, capacity=1000) for f in filters
    ]
    for room in all_rooms:
        target.add(room)

    def route_indexed(change: Any) -> int:
        routed = target.matching(change)
        for room in routed:
            room.record(change)
        return len(routed)

    def route_scan(change: Any) -> int:  # every room's filter, one by one (before the index)
        routed = [target.room]
        routed += [r for r in all_rooms if r.filter is not None and r.filter.matches(change)]
        for room in routed:
            room.record(change)
        return len(routed)

    route = route_scan if kind == "scan" else route_indexed
    timings = []
    routed = 0
    for repeat in range(repeats):
        batch = make_changes(kind, rooms, changes, seed=repeat + 1)
        started = time.process_time()
        routed = sum(route(c) for c in batch)
        timings.append((time.process_time() - started) / changes * 1e6)
    return RoutingResult(
        kind, rooms, changes, statistics.median(timings), timings, routed / changes
    )


def routing_main(conn: Connection, kind: str, rooms: int, changes: int, repeats: int) -> None:
    conn.send(("result", measure_routing(kind, rooms, changes, repeats).as_dict()))


def routing_phase(sizes: list[int], budget: float, repeats: int) -> list[dict[str, Any]]:
    """Each (kind, size) in a fresh process; range and scan only up to 10,000 rooms (they are
    linear in the number of rooms, on purpose: that is what they show)."""
    rows = []
    for kind in KINDS:
        for size in sizes:
            if kind in ("range", "scan") and size > 10_000:
                continue
            linear = kind in ("range", "scan")
            changes = max(50, min(5000, int(budget / (size * 1e-6)))) if linear else 5000
            child = Child(routing_main, kind, size, changes, repeats, name=f"routing-{kind}")
            try:
                _, row = child.recv(600)
            finally:
                child.stop()
            rows.append(row)
            print(
                f"routing {kind:5} rooms={size:6} {row['us_per_change']:9.1f} us/change "
                f"(repeats {', '.join(f'{t:.1f}' for t in row['repeats'])}; "
                f"{row['routed_per_change']:.2f} rooms per change)",
                flush=True,
            )
    return rows


# -- the burst through the real server ---------------------------------------------------------


class MultiClient(SioClient):
    """A wire client that subscribes to a list of (room, filter) one after the other."""

    def __init__(self, host: str, port: int, subs: list[dict[str, Any]], stats: Stats) -> None:
        super().__init__(host, port, subs[0]["room"], stats, subscribe=subs[0])
        self.subs = subs
        self.next = 1

    def _control(self, message: bytes) -> None:
        if not message.startswith(b"43"):  # not an ack: pings, the namespace connect
            super()._control(message)
            return
        ack = json.loads(message[message.index(b"[") :])[0]
        if not ack.get("ok"):
            if not self.ready.done():
                self.ready.set_exception(ConnectionError(f"subscribe refused: {ack}"))
        elif self.next < len(self.subs):
            body = self.subs[self.next]
            self.send_text(f"42{self.next}" + json.dumps(["subscribe", body]))
            self.next += 1
        elif not self.ready.done():
            self.ready.set_result(ack)


def burst_clients_main(conn: Connection, port: int, rooms: int, subscribers: int) -> None:
    raise_nofile()
    asyncio.run(_burst_clients(conn, port, rooms, subscribers))


async def _burst_clients(conn: Connection, port: int, rooms: int, subscribers: int) -> None:
    loop = asyncio.get_running_loop()
    table, users = Stats(), Stats()
    clients: list[SioClient] = []
    _, first = await loop.create_connection(
        lambda: SioClient("127.0.0.1", port, f"mem:{TARGET}", table), "127.0.0.1", port
    )
    clients.append(first)
    await first.ready
    groups = [list(range(i, rooms, subscribers)) for i in range(min(subscribers, rooms))]

    for group in groups:
        subs = [{"room": f"mem:{TARGET}", "filter": f"user_id=eq.{u}"} for u in group]
        factory = functools.partial(MultiClient, "127.0.0.1", port, subs, users)
        _, many = await loop.create_connection(factory, "127.0.0.1", port)
        clients.append(many)
    async with asyncio.timeout(300):
        await asyncio.gather(*(c.ready for c in clients[1:]))
    conn.send(("ready", len(clients)))

    async def handle(request: tuple[Any, ...]) -> Any:
        if request[0] == "reset":
            table.reset()
            users.reset()
            return ("ok",)
        if request[0] == "wait":
            expected_table, expected_users, timeout = request[1:]
            deadline = time.monotonic() + timeout
            while (  # noqa: ASYNC110 - the wire clients count; they signal nothing
                table.changes < expected_table or users.changes < expected_users
            ) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            last = max(table.last_receive, users.last_receive)
            return ("counts", table.changes, users.changes, last)
        raise ValueError(f"unknown request {request[0]!r}")

    try:
        await serve_commands(conn, handle)
    finally:
        for client in clients:
            client.close()


@dataclass
class BurstResult:
    rooms: int
    changes: int
    seconds: float
    """from the first insert until the last delivery (or the deadline)"""
    cpu: float
    table_delivered: int
    user_delivered: int
    expected_users: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def burst_once(rooms: int, changes: int, timeout: float, subscribers: int = 20) -> BurstResult:
    port = free_port()
    # Each subscriber client holds rooms/20 subscriptions, made as fast as acks come back.
    config = memory_config(
        [TARGET],
        port,
        f"max_subscriptions = {rooms}\n",
        f"subscribe_rate = 100000\nsubscribe_burst = {rooms}\n"
        "rooms_per_identity = 0\n",  # every bench client is the same anonymous identity
    )
    server = Child(feed_main, config, name="feed")
    try:
        server.recv(60)
        swarm = Child(burst_clients_main, port, rooms, subscribers, name="burst-clients")
        try:
            swarm.recv(600)
            # A warm-up burst, so the first measured one does not pay for imports and caches.
            server.ask("burst", TARGET, 100, rooms, 0, timeout=60)
            expected_users = 100
            swarm.ask("wait", 100, expected_users, 60, timeout=90)
            swarm.ask("reset")
            before = Usage.of(server.pid)
            started = time.monotonic()
            server.ask("burst", TARGET, changes, rooms, 100, timeout=60)
            _, table, users, last = swarm.ask(
                "wait", changes, changes, timeout, timeout=timeout + 30
            )
            after = Usage.of(server.pid)
            done = table == changes and users == changes
            seconds = (last if done else time.monotonic()) - started
            return BurstResult(
                rooms, changes, seconds, after.cpu - before.cpu, table, users, changes
            )
        finally:
            swarm.stop()
    finally:
        server.stop()


def burst_phase(
    sizes: list[int], changes: int, repeats: int, timeout: float
) -> list[dict[str, Any]]:
    """Alternate the sizes `repeats` times, so drift on the shared machine hits each alike."""
    rows = []
    for _ in range(repeats):
        for rooms in sizes:
            result = burst_once(rooms, changes, timeout)
            rows.append(result.as_dict())
            print(
                f"burst   {rooms:6} user rooms: {changes} changes delivered in "
                f"{result.seconds:6.2f} s, server CPU {result.cpu:5.2f} s "
                f"(table {result.table_delivered}/{changes}, users "
                f"{result.user_delivered}/{result.expected_users})",
                flush=True,
            )
    return rows


def summarise(block: dict[str, Any]) -> dict[str, Any]:
    routing: dict[str, dict[int, float]] = {}
    for row in block.get("routing", []):
        routing.setdefault(row["kind"], {})[row["rooms"]] = row["us_per_change"]
    bursts: dict[int, list[dict[str, Any]]] = {}
    for row in block.get("burst", []):
        bursts.setdefault(row["rooms"], []).append(row)
    burst = {
        rooms: {
            "seconds": statistics.median(r["seconds"] for r in rows),
            "cpu": statistics.median(r["cpu"] for r in rows),
            "complete": all(
                r["table_delivered"] == r["changes"] and r["user_delivered"] == r["expected_users"]
                for r in rows
            ),
            "runs": len(rows),
        }
        for rooms, rows in sorted(bursts.items())
    }
    return {"routing": routing, "burst": burst}


def table(block: dict[str, Any]) -> list[str]:
    s = block["summary"]
    routing = {kind: {int(n): us for n, us in by.items()} for kind, by in s["routing"].items()}
    sizes = sorted({n for by in routing.values() for n in by})
    lines = ["", "== filter rooms: routing CPU per change, µs (median of repeats)"]
    lines.append(f"{'kind':>6} " + " ".join(f"{n:>9}" for n in sizes))
    for kind, by in routing.items():
        cells = [f"{by[n]:>9.1f}" if n in by else f"{'-':>9}" for n in sizes]
        lines.append(f"{kind:>6} " + " ".join(cells))
    for rooms, b in s["burst"].items():
        lines.append(
            f"burst of {block['burst'][0]['changes']} changes with {rooms} user rooms: "
            f"{b['seconds']:.2f} s, server CPU {b['cpu']:.2f} s "
            f"({'all delivered' if b['complete'] else 'NOT all delivered'}, {b['runs']} runs)"
        )
    return lines


def losses(block: dict[str, Any]) -> list[str]:
    return [
        f"filter rooms burst with {rooms} rooms: not every change was delivered"
        for rooms, b in block.get("summary", {}).get("burst", {}).items()
        if not b["complete"]
    ]


def draw(block: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = block["summary"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"eq": "o-", "in": "s-", "mixed": "^-", "range": "x--", "scan": "d:"}
    labels = {
        "eq": "user_id=eq.<i> (indexed)",
        "in": "user_id=in.(a,b,c) (indexed)",
        "mixed": "mixed eq / in / eq&gt + 10 range-only",
        "range": "amount=gt.<x> only (checked room by room)",
        "scan": "eq rooms checked one by one (before the index)",
    }
    for kind, by in s["routing"].items():
        points = sorted((int(n), us) for n, us in by.items())  # JSON made the keys text
        left.plot(
            [n for n, _ in points],
            [us for _, us in points],
            styles.get(kind, "o-"),
            label=labels.get(kind, kind),
        )
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("distinct filter rooms on the target")
    left.set_ylabel("routing CPU per change (µs)")
    left.set_title("Routing one change")
    left.legend(fontsize=8)
    bursts = s["burst"]
    if bursts:
        xs = [str(k) for k in bursts]
        right.bar(xs, [b["seconds"] for b in bursts.values()], label="delivered in (s)")
        right.plot(xs, [b["cpu"] for b in bursts.values()], "ko", label="server CPU (s)")
        right.set_xlabel("per-user filter rooms subscribed")
        right.set_title(f"Burst of {block['burst'][0]['changes']} changes, real server")
        right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
