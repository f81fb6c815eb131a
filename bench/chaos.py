"""A randomized fault run, checked as Jepsen checks a database: "loses nothing, or says so".

    python -m bench.chaos --seed N --minutes M [--clients 4] [--rate 20] [--every 6]
                          [--faults kill,stop,...] [--quiet 90] [--json out.json] [--logs DIR]

Three `feed serve` nodes in cluster mode on a private redis-server (this run's own, restarted and
killed by it), a notify-mode Postgres connector on a database of its own
(FEED_BENCH_POSTGRES_URL, default the local server), a writer inserting, updating and deleting
rows of `orders` at a steady rate (its ledger: every row's expected content), and `--clients`
Python client library clients (`dbfeed_client`, each given every node, each node through a
proxy of its own that can be blackholed), each following with `snapshot=True` (live rows)
the table room, a filter room (`status=eq.paid`) and a row room.

Every `--every` seconds on average a fault picked at random (the seed decides which, where and
for how long; faults overlap): a node killed (`kill -9`) and started again, a node paused
(SIGSTOP, then SIGCONT), a node restarted (SIGTERM), Redis restarted keeping its data (SHUTDOWN
SAVE) or losing it, the connector's Postgres sessions terminated (the reader alone, or every one
of them), a client's connection blackholed (packets dropped, nothing closed) or reset.

Then every fault is healed, the writer stops, and after a quiet period each subscription is
checked (a violation is printed, and the exit status is 1):

- rows: its live rows equal the table's rows that match its room (the writer's ledger is checked
  against the table first). A difference that stays after `--quiet` seconds is a quiet hole:
  whatever the subscriber was told (a gap, `recovered: false`, a reload), it did not end right;
- conflict: no two changes delivered under one (room, epoch, seq) with different content, over
  all clients and nodes (a change is identified by what it says: id, op, key, images, left);
- hole: the changes a subscription delivered follow each other by one `seq` unless it said
  something in between (a snapshot, a state: reload, pending, recovered, live).

The figures: faults injected by kind, transactions and row changes written, and per subscriber
the reloads, `recovered` true/false, gaps and connector `down` statuses it saw.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from bench.cluster import postgres_config
from bench.servers import BENCH_LIMITS
from tests.support.cluster import FeedNode
from tests.support.proxy import Blackhole
from tests.support.redis import RedisServer

ROOT = Path(__file__).parent.parent
ROWS = 200
"""Row ids 1..ROWS: the writer inserts, updates and deletes among them."""
STATUSES = ("new", "paid", "shipped")
TABLE_ROOM = "main:public.orders"
FILTER = "status=eq.paid"
FAULTS = (
    "kill",
    "stop",
    "restart",
    "redis_keep",
    "redis_lose",
    "redis_stale",
    "pg_reader",
    "pg_all",
    "blackhole",
    "reset",
)


def node_config(dsn: str, redis_url: str, prefix: str) -> str:
    """Pings every 2 s and a 2 s lease, so that faults are noticed within seconds."""
    return postgres_config(
        dsn,
        redis_url,
        prefix,
        server={"ping_interval": 2, "ping_timeout": 2, "dashboard": False},
        cluster={"lease": 2.0},
        connector={"heartbeat_interval": 0.5, "save_interval": 0.2},
        limits=BENCH_LIMITS,
    )


# -- the writer ----------------------------------------------------------------------------------


@dataclass
class Ledger:
    rows: dict[int, tuple[str, int]] = field(default_factory=dict)
    """Row id -> (status, version): `amount` holds the version, unique per write."""
    log: list[tuple[tuple[Any, ...], int, str | None, str | None]] = field(default_factory=list)
    """Every committed write in commit order: its identity (("w", version) for an insert or
    update, ("d", id, version deleted) for a delete), the row id, status before and after."""
    version: int = 0
    transactions: int = 0
    changes: Counter[str] = field(default_factory=Counter)


async def writer(
    dsn: str, rate: float, rng: random.Random, stop: asyncio.Event, ledger: Ledger
) -> None:
    """`rate` transactions a second, one row change each, or 2 to 5 now and then; the ledger
    holds every row as committed (the writer's connection is never faulted)."""
    conn = await asyncpg.connect(dsn)
    started = time.monotonic()
    try:
        while not stop.is_set():
            rows = dict(ledger.rows)
            done: Counter[str] = Counter()
            writes: list[tuple[tuple[Any, ...], int, str | None, str | None]] = []
            version = ledger.version
            async with conn.transaction():
                for _ in range(1 if rng.random() < 0.9 else rng.randint(2, 5)):
                    i = rng.randint(1, ROWS)
                    version += 1
                    if i not in rows:
                        rows[i] = (rng.choice(STATUSES), version)
                        await conn.execute("INSERT INTO orders VALUES ($1, $2, $3)", i, *rows[i])
                        writes.append((("w", version), i, None, rows[i][0]))
                        done["insert"] += 1
                    elif rng.random() < 0.8:
                        before = rows[i][0]
                        rows[i] = (rng.choice(STATUSES), version)
                        await conn.execute(
                            "UPDATE orders SET status = $2, amount = $3 WHERE id = $1", i, *rows[i]
                        )
                        writes.append((("w", version), i, before, rows[i][0]))
                        done["update"] += 1
                    else:
                        writes.append((("d", i, rows[i][1]), i, rows[i][0], None))
                        del rows[i]
                        await conn.execute("DELETE FROM orders WHERE id = $1", i)
                        done["delete"] += 1
            ledger.rows = rows
            ledger.version = version
            ledger.log += writes
            ledger.changes.update(done)
            ledger.transactions += 1
            delay = started + ledger.transactions / rate - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await stop.wait()
    finally:
        await conn.close()


# -- the subscribers -----------------------------------------------------------------------------


def signature(change: dict[str, Any]) -> str:
    fields = ("id", "op", "key", "before", "after", "left")
    return json.dumps({k: change.get(k) for k in fields}, sort_keys=True, default=str)


def identity(change: dict[str, Any]) -> tuple[Any, ...]:
    """The writer's identity of the write a change carries (see `Ledger.log`)."""
    if change.get("op") == "delete":
        before = change.get("before") or {}
        return ("d", before.get("id"), before.get("amount"))
    return ("w", (change.get("after") or {}).get("amount"))


def room_writes(w: Watched, ledger: Ledger) -> list[tuple[Any, ...]]:
    """The committed writes the subscription's room gets, in commit order."""
    if w.kind == "table":
        return [ident for ident, _, _, _ in ledger.log]
    if w.kind == "filter":
        return [ident for ident, _, b, a in ledger.log if "paid" in (b, a)]
    return [ident for ident, i, _, _ in ledger.log if i == w.row]


def missed(w: Watched, ledger: Ledger) -> list[str]:
    """Writes its room got that the subscription skipped, with nothing said: within a segment
    (from one snapshot to the next), two changes delivered one after the other must be two
    writes of the room one after the other in commit order, once past the numbers the
    segment's snapshot may skip."""
    order = {ident: n for n, ident in enumerate(room_writes(w, ledger))}
    writes = room_writes(w, ledger)
    found: list[str] = []
    for (a, seq_a, seg_a), (b, _, seg_b) in zip(w.stream, w.stream[1:], strict=False):
        upto = w.segments[seg_a]
        if seg_a != seg_b or (upto is not None and (seq_a is None or seq_a <= upto)):
            continue
        if a not in order or b not in order:
            found.append(f"a change no write made: {a if a not in order else b}")
        elif order[b] != order[a] + 1:
            skipped = writes[order[a] + 1 : order[b]] if order[b] > order[a] else []
            found.append(
                f"after {a} (seq {seq_a}) came {b}: {len(skipped)} writes skipped {skipped[:5]}"
                if skipped
                else f"after {a} (seq {seq_a}) came {b}: out of order"
            )
    return found


@dataclass
class Watched:
    """One subscription and what it told its application."""

    client: int
    kind: str  # table | filter | row
    sub: Any
    row: int | None = None
    said: Counter[str] = field(default_factory=Counter)
    last_seq: int | None = None
    skip_upto: int | None = None
    spoke: bool = True  # a snapshot or state since the last change: a jump in seq is explained
    holes: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    stream: list[tuple[tuple[Any, ...], int | None, int]] = field(default_factory=list)
    """The changes delivered: (write identity, seq, segment); a snapshot starts a segment."""
    segments: list[int | None] = field(default_factory=lambda: [None])
    """Per segment, its snapshot's `snapshot_upto` (numbers up to it may be skipped)."""

    @property
    def name(self) -> str:
        return f"client{self.client}/{self.kind}"

    def note(self, t: float, text: str) -> None:
        self.log.append(f"{t:7.2f} {text}")
        del self.log[:-200]


class Observer:
    """Every change a subscription takes in, by (room, epoch, seq), over all clients."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.seen: dict[tuple[str, str | None, int], tuple[str, str]] = {}
        self.conflicts: list[str] = []

    def now(self) -> float:
        return time.monotonic() - self.started

    def watch(self, w: Watched) -> None:
        sub = w.sub
        receive = sub._receive

        def recorded(change: dict[str, Any]) -> None:
            seq = change.get("seq")
            if sub._phase == "ready" and not sub._closed and isinstance(seq, int):
                where = (str(change.get("room")), sub.epoch, seq)
                mine = signature(change)
                had = self.seen.setdefault(where, (mine, w.name))
                if had[0] != mine:
                    self.conflicts.append(
                        f"{where}: {w.name} got {mine}, {had[1]} had got {had[0]}"
                    )
            receive(change)

        sub._receive = recorded

        def on_change(change: dict[str, Any]) -> None:
            seq = change.get("seq")
            if isinstance(seq, int) and w.last_seq is not None and seq != w.last_seq + 1:
                allowed = w.spoke and (w.skip_upto is None or seq <= w.skip_upto + 1)
                if not allowed:
                    w.holes.append(
                        f"{self.now():.2f}s seq {w.last_seq} then {seq} (epoch {sub.epoch})"
                        " with nothing said in between"
                    )
            w.last_seq = seq if isinstance(seq, int) else w.last_seq
            if not (w.skip_upto is not None and isinstance(seq, int) and seq <= w.skip_upto):
                w.spoke = False
            w.said["changes"] += 1
            w.stream.append(
                (identity(change), seq if isinstance(seq, int) else None, len(w.segments) - 1)
            )

        def on_state(state: str, info: dict[str, Any]) -> None:
            w.said[state] += 1
            w.spoke = True
            w.note(self.now(), f"state {state} {json.dumps(info, default=str)[:200]}")
            if state in ("live", "recovered"):
                w.last_seq = sub.seq

        def on_snapshot(rows: Any, info: Any) -> None:
            w.said["snapshot"] += 1
            w.spoke = True
            w.last_seq = sub.seq
            w.skip_upto = sub._skip_upto
            w.segments.append(sub._skip_upto)
            w.note(self.now(), f"snapshot {len(rows)} rows at seq {sub.seq} epoch {sub.epoch}")

        sub.on("change", on_change)
        sub.on("state", on_state)
        sub.on("snapshot", on_snapshot)


@dataclass
class Subscriber:
    index: int
    holes: list[Blackhole]
    feed: Any = None
    watched: list[Watched] = field(default_factory=list)
    said: Counter[str] = field(default_factory=Counter)

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{h.port}" for h in self.holes]

    async def start(self, observer: Observer, rng: random.Random) -> None:
        from dbfeed_client import FeedClient

        order = list(self.urls)
        rng.shuffle(order)
        self.feed = FeedClient(order, timeout=5.0)

        def on_status(status: dict[str, Any]) -> None:
            self.said[f"status {status.get('state')}"] += 1

        def on_gap(gap: dict[str, Any]) -> None:
            self.said["gap"] += 1

        self.feed.on("status", on_status)
        self.feed.on("gap", on_gap)
        await self.feed.connect()
        row = rng.randint(1, ROWS)
        for kind, room, filt in (
            ("table", TABLE_ROOM, None),
            ("filter", TABLE_ROOM, FILTER),
            ("row", f"{TABLE_ROOM}:{row}", None),
        ):
            sub = self.feed.subscribe(room, filter=filt, snapshot=True)
            w = Watched(self.index, kind, sub, row if kind == "row" else None)
            observer.watch(w)
            self.watched.append(w)
        for w in self.watched:
            await asyncio.wait_for(w.sub.ready(), 60)

    def hole_of_current(self) -> Blackhole | None:
        url = self.feed.url if self.feed is not None else None
        return next((h for h in self.holes if f"http://127.0.0.1:{h.port}" == url), None)


def expected(w: Watched, table: dict[int, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    if w.kind == "table":
        return {str(k): v for k, v in table.items()}
    if w.kind == "filter":
        return {str(k): v for k, v in table.items() if v["status"] == "paid"}
    assert w.row is not None
    return {str(w.row): table[w.row]} if w.row in table else {}


def difference(rows: dict[str, Any] | None, want: dict[str, Any]) -> str:
    rows = rows or {}
    missing = sorted(set(want) - set(rows), key=int)
    extra = sorted(set(rows) - set(want), key=int)
    wrong = sorted((k for k in want if k in rows and rows[k] != want[k]), key=int)
    parts = []
    for label, keys in (("missing", missing), ("extra", extra), ("stale", wrong)):
        if keys:
            parts.append(f"{len(keys)} {label} ({', '.join(keys[:8])})")
    if wrong:
        k = wrong[0]
        parts.append(f"e.g. row {k}: has {rows[k]}, table {want[k]}")
    return "; ".join(parts)


# -- the faults ----------------------------------------------------------------------------------


class Chaos:
    """The faults, each on a resource that no other fault holds at the time."""

    def __init__(
        self,
        rng: random.Random,
        nodes: list[FeedNode],
        redis: RedisServer,
        admin: asyncpg.Connection,
        database: str,
        subscribers: list[Subscriber],
        kinds: list[str],
        started: float,
    ) -> None:
        self.rng = rng
        self.nodes = nodes
        self.redis = redis
        self.admin = admin
        self.database = database
        self.subscribers = subscribers
        self.kinds = kinds
        self.started = started
        self.busy: set[str] = set()
        self.injected: Counter[str] = Counter()
        self.log: list[str] = []
        self.tasks: set[asyncio.Task[None]] = set()

    def say(self, text: str) -> None:
        line = f"{time.monotonic() - self.started:7.2f}s {text}"
        self.log.append(line)
        print(line, flush=True)

    def pick(self) -> None:
        """Start one fault now (its own task: faults overlap), on a resource that is free."""
        kind = self.rng.choice(self.kinds)
        hold = self.rng.uniform(1.0, 8.0)
        if kind in ("kill", "stop", "restart"):
            free = [n for n in self.nodes if n.name not in self.busy]
            # Keep one node running, or none reads the connector and nothing is said at all.
            if len(free) <= 1 or len(self.busy & {n.name for n in self.nodes}) >= 2:
                return
            target: Any = self.rng.choice(free)
            resource = target.name
        elif kind.startswith("redis"):
            resource, target = "redis", self.redis
        elif kind.startswith("pg"):
            resource, target = f"pg{self.rng.random()}", None  # instantaneous; may repeat
        else:
            subs = [s for s in self.subscribers if f"client{s.index}" not in self.busy]
            if not subs:
                return
            target = self.rng.choice(subs)
            resource = f"client{target.index}"
        if resource in self.busy:
            return
        self.busy.add(resource)
        self.injected[kind] += 1
        task = asyncio.create_task(self.run(kind, target, hold, resource))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run(self, kind: str, target: Any, hold: float, resource: str) -> None:
        try:
            await getattr(self, kind)(target, hold)
        except Exception as exc:
            self.say(f"fault {kind} failed: {exc!r}")
            raise
        finally:
            self.busy.discard(resource)

    async def kill(self, node: FeedNode, hold: float) -> None:
        self.say(f"kill -9 {node.name} for {hold:.1f}s")
        node.kill()
        if node.process is not None:
            await node.process.wait()
        await asyncio.sleep(hold)
        await node.start()
        self.say(f"{node.name} started again")

    async def stop(self, node: FeedNode, hold: float) -> None:
        assert node.process is not None
        self.say(f"SIGSTOP {node.name} for {hold:.1f}s")
        node.process.send_signal(signal.SIGSTOP)
        await asyncio.sleep(hold)
        node.process.send_signal(signal.SIGCONT)
        self.say(f"SIGCONT {node.name}")

    async def restart(self, node: FeedNode, hold: float) -> None:
        self.say(f"SIGTERM {node.name}, started again")
        await node.stop()
        await node.start()
        self.say(f"{node.name} started again")

    async def _redis_down(self, keep: bool, hold: float) -> None:
        import redis.asyncio as aioredis

        dump = Path(self.redis.dir) / "dump.rdb"
        client = aioredis.Redis.from_url(self.redis.url())
        try:
            with contextlib.suppress(Exception):
                await client.execute_command("SHUTDOWN", "SAVE" if keep else "NOSAVE")  # type: ignore[no-untyped-call]
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()
        await asyncio.to_thread(self.redis.stop)
        if not keep:
            dump.unlink(missing_ok=True)
        self.say(f"Redis down ({'data saved' if keep else 'data lost'}) for {hold:.1f}s")
        await asyncio.sleep(hold)
        await asyncio.to_thread(self.redis.start)
        self.say("Redis up again")

    async def redis_keep(self, _: Any, hold: float) -> None:
        await self._redis_down(True, hold)

    async def redis_lose(self, _: Any, hold: float) -> None:
        await self._redis_down(False, hold)

    async def redis_stale(self, _: Any, hold: float) -> None:
        """Redis saved, then killed a moment later, and back with the saved data: what it
        took meanwhile is lost, its epochs are not (an RDB restore, or a failover to a replica
        that lagged)."""
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(self.redis.url())
        try:
            await client.save()
        finally:
            await client.aclose()
        lag = self.rng.uniform(0.5, 3.0)
        await asyncio.sleep(lag)
        assert self.redis.proc is not None
        self.redis.proc.kill()
        await asyncio.to_thread(self.redis.stop)
        self.say(f"Redis killed {lag:.1f}s after a save, for {hold:.1f}s (comes back stale)")
        await asyncio.sleep(hold)
        await asyncio.to_thread(self.redis.start)
        self.say("Redis up again, with the saved data")

    async def _terminate(self, names: str) -> None:
        killed = await self.admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = $1 AND application_name LIKE $2",
            self.database,
            names,
        )
        self.say(f"pg_terminate_backend: {killed} sessions named {names}")

    async def pg_reader(self, _: Any, hold: float) -> None:
        await self._terminate("feed:main:reader")

    async def pg_all(self, _: Any, hold: float) -> None:
        await self._terminate("feed:main%")

    async def blackhole(self, sub: Subscriber, hold: float) -> None:
        hole = sub.hole_of_current()
        if hole is None:
            return
        self.say(f"blackhole client{sub.index} -> port {hole.target_port} for {hold:.1f}s")
        hole.blackhole()
        await asyncio.sleep(hold)
        await hole.heal()
        self.say(f"healed client{sub.index} -> port {hole.target_port}")

    async def reset(self, sub: Subscriber, hold: float) -> None:
        hole = sub.hole_of_current()
        if hole is None:
            return
        self.say(f"reset client{sub.index}'s connection to port {hole.target_port}")
        hole.drop()

    async def settle(self) -> None:
        """Let every fault end (each heals what it did), then check all runs."""
        while self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        for node in self.nodes:
            if node.process is None or node.process.returncode is not None:
                await node.start()
            else:
                node.process.send_signal(signal.SIGCONT)
        if self.redis.proc is None:
            await asyncio.to_thread(self.redis.start)


# -- the run -------------------------------------------------------------------------------------


async def table_rows(conn: asyncpg.Connection) -> dict[int, dict[str, Any]]:
    return {r["id"]: dict(r) for r in await conn.fetch("SELECT id, status, amount FROM orders")}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    base = os.environ.get(
        "FEED_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    tag = uuid.uuid4().hex[:8]
    database = f"feed_chaos_{tag}"
    admin = await asyncpg.connect(base)
    await admin.execute(f'CREATE DATABASE "{database}"')
    dsn = base.rpartition("/")[0] + "/" + database
    conn = await asyncpg.connect(dsn)
    redis = RedisServer()
    logs = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="bench-chaos-"))
    logs.mkdir(parents=True, exist_ok=True)
    nodes: list[FeedNode] = []
    holes: list[Blackhole] = []
    subscribers: list[Subscriber] = []
    ledger = Ledger()
    stop = asyncio.Event()
    writing: asyncio.Task[None] | None = None
    chaos: Chaos | None = None
    try:
        await conn.execute(
            "CREATE TABLE orders (id int PRIMARY KEY, status text NOT NULL, amount int NOT NULL)"
        )
        for i in range(1, ROWS + 1, 2):
            ledger.rows[i] = (STATUSES[i % 3], 0)
        await conn.executemany(
            "INSERT INTO orders VALUES ($1, $2, $3)", [(k, *v) for k, v in ledger.rows.items()]
        )
        await asyncio.to_thread(redis.start)
        config = logs / "feed.toml"
        config.write_text(node_config(dsn, redis.url(), f"chaos-{tag}"))
        nodes = [FeedNode(f"node{i}", config) for i in range(3)]
        for node in nodes:
            await node.start()
        for node in nodes:
            await node.wait_ready()
        started = time.monotonic()
        observer = Observer(started)
        for c in range(args.clients):
            mine = [await Blackhole(n.port).start() for n in nodes]
            holes += mine
            subscribers.append(Subscriber(c, mine))
        for s in subscribers:
            await s.start(observer, rng)
        writing = asyncio.create_task(
            writer(dsn, args.rate, random.Random(args.seed + 1), stop, ledger)
        )
        kinds = args.faults.split(",") if args.faults else list(FAULTS)
        chaos = Chaos(rng, nodes, redis, admin, database, subscribers, kinds, started)
        chaos.say(f"seed {args.seed}: {args.clients} clients, faults {','.join(kinds)}")
        end = started + 60 * args.minutes
        first = True
        while time.monotonic() < end:
            if writing.done():
                writing.result()
                raise RuntimeError("the writer stopped")
            wait = 0.5 if first else rng.expovariate(1 / args.every)
            await asyncio.sleep(min(wait, max(0.0, end - time.monotonic())))
            if time.monotonic() < end:
                chaos.pick()
                first = False
        chaos.say("faults over: healing")
        await chaos.settle()
        stop.set()
        await writing
        table = await table_rows(conn)
        ledger_ok = {k: (v["status"], v["amount"]) for k, v in table.items()} == ledger.rows
        chaos.say(
            f"writer stopped: {ledger.transactions} transactions, {dict(ledger.changes)};"
            f" ledger {'matches' if ledger_ok else 'DIFFERS FROM'} the table; quiet period"
        )
        watched = [w for s in subscribers for w in s.watched]
        quiet_end = time.monotonic() + args.quiet
        while time.monotonic() < quiet_end:
            if all(
                not difference(w.sub.rows, expected(w, table))
                and w.sub.state in ("live", "recovered")
                for w in watched
            ):
                break
            await asyncio.sleep(0.5)
        converged = round(args.quiet - (quiet_end - time.monotonic()), 1)
        violations: list[str] = []
        if not ledger_ok:
            violations.append("the writer's ledger differs from the table")
        for w in watched:
            diff = difference(w.sub.rows, expected(w, table))
            if diff:
                violations.append(
                    f"rows {w.name} (state {w.sub.state}, epoch {w.sub.epoch}, seq {w.sub.seq}):"
                    f" {diff}"
                )
            violations += [f"hole {w.name}: {h}" for h in w.holes]
            violations += [f"missed {w.name}: {m}" for m in missed(w, ledger)[:10]]
        violations += [f"conflict {c}" for c in observer.conflicts[:20]]
        result = {
            "seed": args.seed,
            "minutes": args.minutes,
            "clients": args.clients,
            "rate": args.rate,
            "faults": dict(chaos.injected),
            "faults_total": sum(chaos.injected.values()),
            "transactions": ledger.transactions,
            "row_changes": dict(ledger.changes),
            "changes_checked": len(observer.seen),
            "converged_s": converged,
            "subscribers": {w.name: dict(w.said) for w in watched},
            "clients_said": {f"client{s.index}": dict(s.said) for s in subscribers},
            "violations": violations,
            "fault_log": chaos.log,
        }
        if violations:
            for w in watched:
                (logs / f"{w.name.replace('/', '-')}.log").write_text("\n".join(w.log) + "\n")
        return result
    finally:
        stop.set()
        if chaos is not None:
            for task in list(chaos.tasks):
                task.cancel()
        if writing is not None and not writing.done():
            writing.cancel()
        for s in subscribers:
            if s.feed is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(s.feed.close(), 10)
        for hole in holes:
            await hole.close()
        for node in nodes:
            if node.process is not None:
                node.process.send_signal(signal.SIGCONT)
            with contextlib.suppress(Exception):
                await node.stop()
            (logs / f"{node.name}.log").write_text("".join(node.log))
        await asyncio.to_thread(redis.close)
        await conn.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()
        print(f"node logs in {logs}", flush=True)


def report(result: dict[str, Any]) -> str:
    lines = [
        f"chaos seed {result['seed']}: {result['minutes']:g} min, {result['clients']} clients,"
        f" {result['faults_total']} faults {json.dumps(result['faults'])},"
        f" {result['transactions']} transactions ({json.dumps(result['row_changes'])}),"
        f" {result['changes_checked']} (room, epoch, seq) checked,"
        f" rows right {result['converged_s']} s after the writer stopped",
    ]
    for name, said in result["subscribers"].items():
        lines.append(f"  {name}: {json.dumps(said, sort_keys=True)}")
    for name, said in result["clients_said"].items():
        lines.append(f"  {name}: {json.dumps(said, sort_keys=True)}")
    lines.append(f"violations: {len(result['violations'])}")
    lines += [f"  {v}" for v in result["violations"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rate", type=float, default=20.0, help="writer transactions a second")
    parser.add_argument("--every", type=float, default=6.0, help="mean seconds between faults")
    parser.add_argument(
        "--faults", default="", help=f"a comma-separated subset of {','.join(FAULTS)}"
    )
    parser.add_argument("--quiet", type=float, default=90.0, help="seconds to converge, at most")
    parser.add_argument("--json", default="", help="write the figures here")
    parser.add_argument("--logs", default="", help="keep node and subscriber logs here")
    args = parser.parse_args()
    unknown = set(filter(None, args.faults.split(","))) - set(FAULTS)
    if unknown:
        parser.exit(
            2, f"--faults: unknown {', '.join(sorted(unknown))}; known: {', '.join(FAULTS)}\n"
        )
    result = asyncio.run(run(args))
    print(report(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    sys.exit(1 if result["violations"] else 0)


if __name__ == "__main__":
    main()
