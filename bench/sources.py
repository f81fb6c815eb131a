"""Commit-to-client latency and ingest for real sources (Postgres, Redis, MongoDB), with baselines.

A writer process commits at a paced rate, each row (or Redis key) carrying `time.time()` taken
just before its statement; Socket.IO clients in other processes time every change they get.
Baselines in the same run: a minimal relay (asyncpg LISTEN -> python-socketio emit, same uvicorn
stack) for latency, and a bare asyncpg listener for ingest.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any

from bench.fanout import percentile
from bench.procs import Child, raise_nofile, serve_commands
from bench.servers import feed_main, free_port, server_section
from bench.swarm import Swarm

TABLE = "public.bench_events"
CHANNEL = "bench_raw"
PG_ROOM = f"pg:{TABLE}"
REDIS_ROOM = "rd:bench:*"
MONGO_DB = "dbfeed_bench"
MONGO_NAMESPACE = f"{MONGO_DB}.events"
MONGO_ROOM = f"mg:{MONGO_NAMESPACE}"

SETUP = f"""
CREATE TABLE {TABLE} (id bigserial PRIMARY KEY, t double precision NOT NULL, pad text);
CREATE FUNCTION bench_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('{CHANNEL}', row_to_json(NEW)::text); RETURN NEW; END $$;
CREATE TRIGGER bench_notify AFTER INSERT ON {TABLE} FOR EACH ROW EXECUTE FUNCTION bench_notify();
"""


@dataclass
class LatencyResult:
    source: str
    server: str
    rate: float
    achieved_rate: float
    committed: int
    delivered_per_client: float
    delivered_ratio: float
    clients: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    server_cpu_per_change_us: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- Postgres database for one run -----------------------------------------------------------


class BenchDatabase:
    """A fresh database on the server at `url`, dropped afterwards."""

    def __init__(self, url: str) -> None:
        self.admin_url = url
        self.name = f"bench_{uuid.uuid4().hex[:8]}"
        base, _, _ = url.rpartition("/")
        self.url = f"{base}/{self.name}"

    def __enter__(self) -> BenchDatabase:
        asyncio.run(self._create())
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run(self._drop())

    async def _create(self) -> None:
        import asyncpg

        admin = await asyncpg.connect(self.admin_url, timeout=10)
        try:
            await admin.execute(f'CREATE DATABASE "{self.name}"')
        finally:
            await admin.close()
        conn = await asyncpg.connect(self.url, timeout=10)
        try:
            await conn.execute(SETUP)
        finally:
            await conn.close()

    async def _drop(self) -> None:
        import asyncpg

        admin = await asyncpg.connect(self.admin_url, timeout=10)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        finally:
            await admin.close()


def pg_config(dsn: str, port: int) -> str:
    return (
        server_section(port)
        + f"""
[[connectors]]
name = "pg"
type = "postgres"
dsn = {json.dumps(dsn)}
tables = [{json.dumps(TABLE)}]
auto_migrate = true
"""
    )


def redis_config(url: str, port: int) -> str:
    return (
        server_section(port)
        + f"""
[[connectors]]
name = "rd"
type = "redis"
url = {json.dumps(url)}
patterns = ["bench:*"]
configure = true
"""
    )


def mongodb_config(uri: str, port: int) -> str:
    return (
        server_section(port)
        + f"""
[[connectors]]
name = "mg"
type = "mongodb"
uri = {json.dumps(uri)}
watch = [{json.dumps(MONGO_NAMESPACE)}]
resume_store = "none"
"""
    )


class BenchMongo:
    """The bench's own database on the MongoDB at `uri`: created empty, dropped afterwards.

    The bench's feed keeps no resume token (`resume_store = "none"`): each run starts from now.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def __enter__(self) -> BenchMongo:
        with self._client() as client:
            client.drop_database(MONGO_DB)
            client[MONGO_DB].create_collection("events")
        return self

    def __exit__(self, *exc: object) -> None:
        with self._client() as client:
            client.drop_database(MONGO_DB)

    def _client(self) -> Any:
        from pymongo import MongoClient

        return MongoClient(self.uri, serverSelectionTimeoutMS=10_000)


# -- the writer ------------------------------------------------------------------------------


def writer_main(conn: Connection, kind: str, url: str) -> None:
    asyncio.run(_writer(conn, kind, url))


async def _writer(conn: Connection, kind: str, url: str) -> None:
    """Paced writers: 8 lanes, each change stamped with `time.time()` as it is written.

    Postgres commits one INSERT per transaction, so every change is its own commit. A Redis lane
    that has fallen behind its schedule sends the SETs now due in one pipeline (each key still
    stamped on its own): one awaited round trip per SET caps redis-py near 2,500 SET/s on a
    shared 2-core machine, which measured the writer rather than the feed. A MongoDB lane does
    the same with insert_many (each document still stamped on its own).
    """
    lanes = 8
    batch_max = 1
    if kind == "postgres":
        import asyncpg

        pool = [
            await asyncpg.connect(url, server_settings={"synchronous_commit": "off"})
            for _ in range(lanes)
        ]
        insert = f"INSERT INTO {TABLE} (t) VALUES ($1)"

        async def write(lane: int, numbers: range) -> None:
            await pool[lane].execute(insert, time.time())

    elif kind == "mongodb":
        from pymongo import AsyncMongoClient

        batch_max = 64  # as for Redis: a lane behind its schedule inserts what is due at once
        mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(url)
        events = mongo[MONGO_DB]["events"]

        async def write(lane: int, numbers: range) -> None:
            if len(numbers) == 1:
                await events.insert_one({"n": numbers[0], "t": time.time()})
                return
            await events.insert_many([{"n": n, "t": time.time()} for n in numbers], ordered=True)

    else:
        import redis.asyncio as aioredis

        batch_max = 64
        clients = [aioredis.Redis.from_url(url) for _ in range(lanes)]

        async def write(lane: int, numbers: range) -> None:
            if len(numbers) == 1:
                await clients[lane].set(f"bench:{numbers[0]}:{time.time()!r}", "x")
                return
            pipe = clients[lane].pipeline(transaction=False)
            for n in numbers:
                pipe.set(f"bench:{n}:{time.time()!r}", "x")
            await pipe.execute()

    counter = 0

    async def handle(request: tuple[Any, ...]) -> Any:
        nonlocal counter
        _, rate, seconds = request
        loop = asyncio.get_running_loop()
        start = loop.time()
        end = start + seconds
        done = 0

        async def lane(k: int) -> None:
            nonlocal done, counter
            i = k
            while True:
                now = loop.time()
                batch = 1
                if rate:
                    due = start + i / rate
                    if due >= end:
                        return
                    if due > now:
                        await asyncio.sleep(due - now)
                        now = loop.time()
                    while batch < batch_max:
                        following = start + (i + batch * lanes) / rate
                        if following > now or following >= end:
                            break
                        batch += 1
                elif now >= end:
                    return
                else:  # flat out: as many per round trip as a lane that is behind would send
                    batch = batch_max
                numbers = range(counter + 1, counter + 1 + batch)
                counter += batch
                await write(k, numbers)
                done += batch
                i += batch * lanes

        await asyncio.gather(*(lane(k) for k in range(lanes)))
        return ("written", done, loop.time() - start)

    conn.send(("ready",))
    await serve_commands(conn, handle)


# -- baselines -------------------------------------------------------------------------------


def relay_main(conn: Connection, dsn: str, port: int) -> None:
    """The minimal relay: asyncpg LISTEN straight to python-socketio emit, under uvicorn."""
    raise_nofile()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_relay(conn, dsn, port))


async def _relay(conn: Connection, dsn: str, port: int) -> None:
    import asyncpg
    import socketio
    import uvicorn

    from feed.app.server import QuietServer

    sio = socketio.AsyncServer(async_mode="asgi", logger=False, engineio_logger=False)
    seq = 0

    @sio.on("subscribe")  # type: ignore[untyped-decorator]
    async def subscribe(sid: str, data: dict[str, Any]) -> dict[str, Any]:
        await sio.enter_room(sid, data["room"])
        return {"ok": True, "room": data["room"], "seq": seq, "recovered": None}

    async def forward(payload: str) -> None:
        nonlocal seq
        seq += 1
        change = {"room": PG_ROOM, "seq": seq, "op": "insert", "after": json.loads(payload)}
        await sio.emit("change", change, room=PG_ROOM)

    listener = await asyncpg.connect(dsn)
    await listener.add_listener(
        CHANNEL, lambda c, pid, ch, payload: asyncio.ensure_future(forward(payload))
    )
    server = QuietServer(
        uvicorn.Config(socketio.ASGIApp(sio), host="127.0.0.1", port=port, log_level="warning")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn offers no event for this
        await asyncio.sleep(0.01)
    conn.send(("ready", port))
    try:
        await serve_commands(conn, lambda request: ("clients", 0))
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)
        await listener.close()


def listener_main(conn: Connection, source: str, url: str) -> None:
    """The bare listener: counts notifications, nothing else."""
    asyncio.run(_listener(conn, source, url))


async def _listener(conn: Connection, source: str, url: str) -> None:
    received = 0
    last = 0.0

    def count(*_: Any) -> None:
        nonlocal received, last
        received += 1
        last = time.monotonic()

    def count_many(n: int) -> None:
        nonlocal received, last
        if n:
            received += n
            last = time.monotonic()

    if source == "postgres":
        import asyncpg

        listener = await asyncpg.connect(url)
        await listener.add_listener(CHANNEL, count)
        close = listener.close
    else:
        close = await _keyspace_counter(url, count_many)

    async def handle(request: tuple[Any, ...]) -> Any:
        nonlocal received
        if request[0] == "reset":
            received = 0
            return ("ok",)
        # ("wait", expected, timeout): seconds until `expected` arrived, from this request.
        _, expected, timeout = request
        started = time.monotonic()
        while received < expected and time.monotonic() - started < timeout:  # noqa: ASYNC110
            await asyncio.sleep(0.002)
        return ("received", received, last)

    conn.send(("ready",))
    await serve_commands(conn, handle)
    await close()


async def _keyspace_counter(url: str, count_many: Callable[[int], None]) -> Callable[[], Any]:
    """A raw socket PSUBSCRIBEd to the bench keys' keyspace channel, counting `pmessage`s.

    No RESP parsing at all (one C-level count per read, carrying the last 7 bytes over so a
    word split by a read is still found): the most any Python subscriber could receive, where
    redis-py's own pub/sub parser would have measured itself.
    """
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    db = int(parts.path.strip("/") or 0)
    reader, writer = await asyncio.open_connection(
        parts.hostname or "127.0.0.1", parts.port or 6379
    )

    def command(*args: str) -> bytes:
        out = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg.encode()
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
        return b"".join(out)

    if parts.password:
        auth = [parts.username, parts.password] if parts.username else [parts.password]
        writer.write(command("AUTH", *auth))
        reply = await reader.readline()
        if not reply.startswith(b"+"):
            raise RuntimeError(f"redis AUTH failed: {reply!r}")
    writer.write(command("PSUBSCRIBE", f"__keyspace@{db}__:bench:*"))

    async def pump() -> None:
        tail = b""
        while data := await reader.read(1 << 16):
            chunk = tail + data
            count_many(chunk.count(b"pmessage"))
            tail = chunk[-7:]

    task = asyncio.create_task(pump())

    async def close() -> None:
        task.cancel()
        writer.close()

    return close


# -- phases ----------------------------------------------------------------------------------


def start_server(kind: str, source: str, url: str) -> tuple[Child, int, str]:
    port = free_port()
    if kind == "relay":
        child = Child(relay_main, url, port, name="relay")
        room = PG_ROOM
    else:
        config, room = {
            "postgres": (pg_config, PG_ROOM),
            "redis": (redis_config, REDIS_ROOM),
            "mongodb": (mongodb_config, MONGO_ROOM),
        }[source]
        child = Child(feed_main, config(url, port), name=f"feed-{source}")
    child.recv(120)
    return child, port, room


def latency_phase(
    source: str,
    kind: str,
    url: str,
    rates: list[float],
    seconds: float,
    clients: int = 20,
) -> list[LatencyResult]:
    from bench.procs import Usage

    results: list[LatencyResult] = []
    server, port, room = start_server(kind, source, url)
    writer = Child(writer_main, source, url, name="writer")
    try:
        writer.recv(60)
        swarm = Swarm(port, [room], clients, processes=2, probes=clients)
        try:
            # Warm up (connections, table shapes, caches), and let every warm-up change arrive.
            _, warm, _ = writer.ask("write", 200, 1.0, timeout=60)
            swarm.wait(warm, timeout=30, quiet=2.0)
            for rate in rates:
                swarm.reset()
                before = Usage.of(server.pid)
                _, written, took = writer.ask("write", rate, seconds, timeout=seconds * 3 + 60)
                counts = swarm.wait(written, timeout=30, quiet=3.0)
                cpu = Usage.of(server.pid).cpu - before.cpu
                lat = counts.latencies
                per_client = counts.changes / clients
                results.append(
                    LatencyResult(
                        source=source,
                        server=kind,
                        rate=rate,
                        achieved_rate=written / took,
                        committed=written,
                        delivered_per_client=per_client,
                        delivered_ratio=per_client / written if written else float("nan"),
                        clients=clients,
                        p50_ms=_ms(percentile(lat, 0.50)),
                        p95_ms=_ms(percentile(lat, 0.95)),
                        p99_ms=_ms(percentile(lat, 0.99)),
                        server_cpu_per_change_us=cpu / counts.changes * 1e6
                        if counts.changes
                        else float("nan"),
                    )
                )
        finally:
            swarm.stop()
    finally:
        writer.stop()
        server.stop()
    return results


@dataclass
class IngestResult:
    committed: int
    write_seconds: float
    write_rate: float
    feed_rate: float
    listener_rate: float
    ratio: float
    feed_delivered: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def ingest_phase(source: str, url: str, seconds: float) -> IngestResult:
    """Writers flat out; the feed (to one client) and a bare listener consume the same commits.

    The bare listener is an asyncpg connection LISTENing to the bench trigger's NOTIFYs for
    Postgres, and a raw pub/sub socket counting keyspace notifications for Redis. Each
    consumer's ingest rate is what it received divided by the time from the first write until it
    had everything the writers committed.
    """
    server, port, room = start_server("feed", source, url)
    writer = Child(writer_main, source, url, name="writer")
    listener = Child(listener_main, source, url, name="listener")
    try:
        writer.recv(60)
        listener.recv(60)
        swarm = Swarm(port, [room], 1, processes=1, probes=0)
        try:
            _, warm, _ = writer.ask("write", 200, 1.0, timeout=60)
            swarm.wait(warm, timeout=30, quiet=2.0)
            listener.ask("wait", warm, 10.0, timeout=30)
            listener.ask("reset")
            swarm.reset()
            started = time.monotonic()
            _, written, took = writer.ask("write", 0, seconds, timeout=seconds * 3 + 60)
            _, got, listener_last = listener.ask("wait", written, 60.0, timeout=90)
            counts = swarm.wait(written, timeout=60, quiet=5.0)
            listener_done = listener_last - started
            feed_done = counts.last_receive - started
        finally:
            swarm.stop()
    finally:
        listener.stop()
        writer.stop()
        server.stop()
    # Both from the same start to the moment each had its last change (CLOCK_MONOTONIC is one
    # clock for every process on the machine).
    feed_rate = counts.changes / feed_done
    listener_rate = got / listener_done
    return IngestResult(
        committed=written,
        write_seconds=took,
        write_rate=written / took,
        feed_rate=feed_rate,
        listener_rate=listener_rate,
        ratio=feed_rate / listener_rate if listener_rate else float("nan"),
        feed_delivered=counts.changes,
    )


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000


def postgres_url() -> str:
    return os.environ.get(
        "FEED_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
    )


def redis_url() -> str:
    return os.environ.get("FEED_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
