"""Client failover: how long a subscription takes to be live again on another node.

    python -m bench.failover [--runs 3] [--libraries python,js] [--faults kill,blackhole]
                             [--clients DIR]

Three `feed serve` processes on one Redis (a private redis-server), Postgres as the source
(FEED_BENCH_POSTGRES_URL, default the local server; a database of the run's own), a writer
committing one row every 20 ms. A client of each library (`dbfeed_client` in a process of its
own, and the JS `dbfeed-client` under node) follows `main:public.orders` with the three nodes'
URLs and the libraries' default options, starting on the first. Its node is not the one reading
Postgres, so no connector handover blurs the figure. Then, either:

- kill: the client's node gets SIGKILL (its port refuses connections at once), or
- blackhole: the client reaches every node through tests/support/proxy.py's `Blackhole`, and
  the one to its node starts dropping every packet without closing anything (the nodes run
  with ping_interval = ping_timeout = 2, so both sides notice the silence within about 4 s).

Measured from the fault: `lost` (the subscription says `pending`) and `recovered` (the
subscribe answer on another node says `recovered`); then every committed row must have arrived
once and in order, or the run fails. The median of each case is printed, and `--json` writes
every run. `--clients DIR`: the client libraries of another checkout (DIR/clients; its
clients/js needs `npm ci`), to compare builds; the servers are always this checkout's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from bench.cluster import postgres_config
from bench.servers import BENCH_LIMITS
from tests.support.cluster import FeedNode, reading_node
from tests.support.proxy import Blackhole
from tests.support.redis import open_private_redis

ROOT = Path(__file__).parent.parent
ROOM = "main:public.orders"
WRITE_EVERY = 0.02
WAIT = 60.0


def node_config(dsn: str, redis_url: str, prefix: str) -> str:
    """Pings every 2 s, so that both sides notice a blackholed node within about 4 s."""
    return postgres_config(
        dsn,
        redis_url,
        prefix,
        server={"ping_interval": 2, "ping_timeout": 2},
        cluster={"lease": 2.0},
        connector={"heartbeat_interval": 0.5, "save_interval": 0.2},
        limits=BENCH_LIMITS,
    )


# -- the client side: one process per run, printing what its subscription does --------------


async def python_client(urls: list[str]) -> None:
    """`dbfeed_client` with its default options; one JSON line per event on stdout."""
    from dbfeed_client import FeedClient

    def out(**fields: Any) -> None:
        print(json.dumps({"t": time.time(), **fields}), flush=True)

    async with FeedClient(urls) as feed:
        sub = feed.subscribe(ROOM)
        sub.on(
            "state", lambda state, info: out(event="state", state=state, info=info, url=feed.url)
        )
        sub.on("change", lambda c: out(event="change", key=c.get("key"), seq=c.get("seq")))
        await asyncio.Event().wait()  # until terminated


JS_CLIENT = """
import { FeedClient } from "%s";
const out = (fields) => console.log(JSON.stringify({ t: Date.now() / 1000, ...fields }));
const feed = new FeedClient(JSON.parse(process.argv[2]));
const sub = feed.subscribe("%s");
sub.on("state", (state, info) => out({ event: "state", state, info, url: feed.url }));
sub.on("change", (c) => out({ event: "change", key: c.key, seq: c.seq }));
"""


class Client:
    """A client process of one library, and what it printed."""

    def __init__(self, library: str, urls: list[str], source: Path) -> None:
        self.library = library
        self.source = source
        self.urls = urls
        self.events: list[dict[str, Any]] = []
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._script: Path | None = None

    async def start(self) -> Client:
        env = {**os.environ, "PYTHONPATH": f"{self.source / 'clients' / 'python'}:{ROOT}"}
        if self.library == "python":
            args = [sys.executable, "-m", "bench.failover", "--client", json.dumps(self.urls)]
        else:
            fd, name = tempfile.mkstemp(suffix=".mjs")
            os.close(fd)
            self._script = Path(name)
            index = (self.source / "clients" / "js" / "index.js").as_uri()
            self._script.write_text(JS_CLIENT % (index, ROOM))
            args = ["node", str(self._script), json.dumps(self.urls)]
        self.process = await asyncio.create_subprocess_exec(
            *args, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.events.append(json.loads(line))

    def keys(self) -> list[Any]:
        return [e["key"] for e in self.events if e["event"] == "change"]

    def first(self, state: str, after: float) -> dict[str, Any] | None:
        for event in self.events:
            if event["event"] == "state" and event["state"] == state and event["t"] >= after:
                return event
        return None

    async def until(self, predicate: Any, what: str, timeout: float = WAIT) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():  # polls another process's output
                if self.process is not None and self.process.returncode is not None:
                    raise RuntimeError(f"the {self.library} client exited waiting for {what}")
                await asyncio.sleep(0.02)

    async def close(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()
        if self._reader is not None:
            await self._reader
        if self._script is not None:
            self._script.unlink(missing_ok=True)


# -- the measuring side ----------------------------------------------------------------------


class Writer:
    """One row per transaction every WRITE_EVERY seconds; `committed` lists their ids."""

    def __init__(self, conn: asyncpg.Connection, start: int) -> None:
        self.conn = conn
        self.next = start
        self.committed: list[int] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._stopping = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stopping.is_set():
            await self.conn.execute("INSERT INTO orders (id, status) VALUES ($1, 'new')", self.next)
            self.committed.append(self.next)
            self.next += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), WRITE_EVERY)

    async def stop(self) -> None:
        """Stop after the insert under way, so that `committed` is every row committed."""
        if self._task is not None:
            self._stopping.set()
            await self._task
            self._task = None


async def one_run(
    library: str, fault: str, config: Path, conn: asyncpg.Connection, source: Path
) -> dict[str, Any]:
    nodes = [FeedNode(f"node{i}", config) for i in range(3)]
    holes: list[Blackhole] = []
    client: Client | None = None
    writer = Writer(conn, await conn.fetchval("SELECT coalesce(max(id), 0) + 1 FROM orders"))
    try:
        await asyncio.gather(*(n.start() for n in nodes))
        for node in nodes:
            await node.wait_ready()
        reader = await reading_node(nodes)
        order = [
            *(n for n in nodes if n is not reader),
            reader,
        ]  # the client's node: not the reader
        urls = [n.url for n in order]
        if fault == "blackhole":
            holes = [await Blackhole(n.port).start() for n in order]
            urls = [f"http://127.0.0.1:{h.port}" for h in holes]
        writer.start()
        client = await Client(library, urls, source).start()
        await client.until(lambda: len(client.keys()) >= 25, "25 changes on the first node")
        live = client.first("live", 0)
        assert live is not None and live["url"] == urls[0], live
        fault_at = time.time()
        if fault == "kill":
            order[0].kill()
        else:
            holes[0].blackhole()
        await client.until(lambda: client.first("recovered", fault_at) is not None, "recovered")
        await asyncio.sleep(1.0)  # changes go on arriving on the new node
        await writer.stop()
        committed = writer.committed
        await client.until(lambda: client.keys()[-1:] == committed[-1:], "every change", 30)
        keys = client.keys()
        first = committed.index(keys[0])
        once_in_order = keys == committed[first:]
        lost = client.first("pending", fault_at)
        recovered = client.first("recovered", fault_at)
        assert recovered is not None
        reloads = [e for e in client.events if e["event"] == "state" and e["state"] == "reload"]
        result = {
            "library": library,
            "fault": fault,
            "lost_s": round(lost["t"] - fault_at, 3) if lost else None,
            "recovered_s": round(recovered["t"] - fault_at, 3),
            "recovered_on": urls.index(recovered["url"]),
            "replayed": recovered["info"].get("replayed"),
            "once_in_order": once_in_order,
            "reloads": len(reloads),
            "changes": len(keys),
        }
        return result
    finally:
        await writer.stop()
        if client is not None:
            await client.close()
        for hole in holes:
            await hole.close()
        for node in nodes:
            await node.stop()


async def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    admin_dsn = os.environ.get(
        "FEED_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    database = f"failover_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'CREATE DATABASE "{database}"')
    dsn = admin_dsn.rsplit("/", 1)[0] + f"/{database}"
    results: list[dict[str, Any]] = []
    try:
        conn = await asyncpg.connect(dsn)
        await conn.execute("CREATE TABLE public.orders (id int PRIMARY KEY, status text)")
        async with open_private_redis() as redis:
            with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp:
                config = Path(tmp) / "feed.toml"
                config.write_text(node_config(dsn, redis.url, redis.prefix.rstrip(":")))
                for _ in range(args.runs):
                    for fault in args.faults.split(","):
                        for library in args.libraries.split(","):
                            result = await one_run(library, fault, config, conn, args.clients)
                            print(json.dumps(result), flush=True)
                            results.append(result)
        await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()
    return results


def summary(results: list[dict[str, Any]]) -> None:
    cases = sorted({(r["library"], r["fault"]) for r in results})
    for library, fault in cases:
        runs = [r for r in results if (r["library"], r["fault"]) == (library, fault)]
        lost = [r["lost_s"] for r in runs if r["lost_s"] is not None]
        recovered = [r["recovered_s"] for r in runs]
        good = all(r["once_in_order"] and not r["reloads"] for r in runs)
        print(
            f"{library:6} {fault:9} lost {statistics.median(lost):6.2f} s  recovered "
            f"{statistics.median(recovered):6.2f} s (runs {', '.join(f'{x:.2f}' for x in recovered)})"
            f"  on url #{sorted({r['recovered_on'] for r in runs})}"
            f"  {'every change once, in order' if good else 'CHANGES WRONG'}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--libraries", default="python,js")
    parser.add_argument("--faults", default="kill,blackhole")
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    parser.add_argument("--clients", type=Path, default=ROOT, help="the client libraries' checkout")
    parser.add_argument("--client", help=argparse.SUPPRESS)  # the Python client's process
    args = parser.parse_args()
    if args.client:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(python_client(json.loads(args.client)))
        return
    results = asyncio.run(measure(args))
    summary(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
