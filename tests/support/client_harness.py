"""A real feed server for the client libraries' tests: restartable, behind a cuttable proxy.

The Python client's tests use `Harness` directly; the JavaScript client's tests (Node's test
runner, clients/js/test) start `python -m tests.support.client_harness` and drive the same
`Harness` with one JSON command per line on stdin, one JSON answer per line on stdout:

    {"cmd": "start", "config": "<extra TOML>", "auth": false}  -> {"ok": true, "url": ..., "direct": ...}
    {"cmd": "write", "target": "public.orders", "op": "insert", "row": {...}}
        (with "connector": "skus" or "lines", a table keyed by `sku` or by (order_id, line);
        with "moved_from": {<the key fields before>}, an update that changes the row's key)
    {"cmd": "burst", "target": "public.orders", "start": 1, "count": 300, "pad": 0}
        (with "spread": true, written 50 at a time in the background, 10 ms apart)
    {"cmd": "truncate", "target": "public.orders"} / {"cmd": "gap", "reason": "..."}
    {"cmd": "redeliver", "id": "mem:3"}  (a change written before, sent again with its id)
    {"cmd": "delivered", "connector": "mem"}  (until the hub routed every change written)
    {"cmd": "rows", "target": "public.orders"}                 -> {"ok": true, "rows": {...}}
        (with "connector" as for write)
    {"cmd": "cut"} / {"cmd": "restore"} / {"cmd": "restart"} / {"cmd": "stop"}
    {"cmd": "rename", "headers": {"Host": "feed.internal"}}
        (requests through the proxy carry these headers from now on: a DNS name, an Origin)
    {"cmd": "cut_polls"}                                       -> {"ok": true, "cut": 1}
        (drops only the connections of long-poll GETs waiting for their answer, once one waits)
    {"cmd": "cut_answer", "target": "public.customers", "row": {..., "status": "cut-here"}}
        (writes the row; the answer carrying `"status":"cut-here"` is cut mid-body: waits for it)
    {"cmd": "pg_start", "setup": "<SQL>", "tables": ["public.t"], "mode": "notify"}
                                                               -> {"ok": true, "url": ...}
        (a feed on a real Postgres, database of its own: see tests/support/pg_harness.py)
    {"cmd": "pg_sql", "sql": "<SQL>"} / {"cmd": "pg_stop"}
    {"cmd": "token", "ttl": 3}                                 -> {"ok": true, "token": "..."}
    {"cmd": "cluster_start"}          -> {"ok": true, "urls": [<node 0 via a proxy>, <node 1>]}
        (with "server": "<lines>", added to both nodes' [server] table)
    {"cmd": "cluster_write", "op": "insert", "row": {...}} / {"cmd": "cluster_cut"} / ..._restore
        (cluster_write takes "connector" and "target" too: "lines", "public.lines")

The server is the real FeedApp under uvicorn with the in-memory connector. A restart starts a new
FeedApp (a new epoch, empty replay buffers) on the same port, carrying the stored rows and the
positions over (so change ids go on, never repeat), as a database outlives the feed. The harness holds that port's listening socket from start to stop
and hands uvicorn a copy of it each time, so no other process can take the port (not even during
a restart, when connections wait in the socket's backlog for the new server).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from typing import TYPE_CHECKING, Any

import uvicorn

from connectors.memory import MemoryConnector
from feed.app.config import parse_config
from feed.app.server import FeedApp, QuietServer
from tests.support.pg_harness import PgFeed
from tests.support.proxy import CuttableProxy
from tests.support.redis import open_redis_target
from tests.support.server import RunningFeed, listening_socket, port_of, running_feed

if TYPE_CHECKING:
    import itertools

    from dbfeed_client import FeedClient

    from feed.core.change import Change

WAIT = 10.0
GRACE = 3
"""Seconds a stop or restart waits for running requests before it cancels them."""
SECRET = "harness-secret-for-client-tests-0123456789"
TARGETS = ["public.orders", "public.customers"]
KEYED = (
    # Tables keyed by something else than `id`: the clients' `rows` must use the server's keys.
    '\n[[connectors]]\nname = "skus"\ntype = "memory"\ntargets = ["public.products"]\n'
    'key = "sku"\n'
    '\n[[connectors]]\nname = "lines"\ntype = "memory"\ntargets = ["public.lines"]\n'
    'key = ["order_id", "line"]\n'
)


def config_text(extra: str = "", auth: bool = False) -> str:
    """The harness's feed: one memory connector `mem`; `extra` adds settings (whole tables)."""
    server = "[server]\nreplay_buffer = 5000\nfilter_room_grace = 5\n"
    if extra.lstrip().startswith("[server]"):
        server = ""  # the caller's own [server] table
    text = server + extra + '\n[[connectors]]\nname = "mem"\ntype = "memory"\n'
    text += f"targets = {json.dumps(TARGETS)}\n" + KEYED
    if auth:
        text += (
            '\n[auth]\nmode = "jwt"\nleeway = 0\n\n[auth.jwt]\nalgorithms = ["HS256"]\n'
            f'secret = "{SECRET}"\naudience = "feed"\n\n'
            '[[auth.rules]]\nroles = ["admin"]\nallow = ["*"]\n'
        )
    return text


def make_token(ttl: float, name: str = "client-test") -> str:
    import time

    import jwt

    now = time.time()
    body = {"sub": name, "aud": "feed", "iat": int(now), "exp": now + ttl, "roles": ["admin"]}
    token: str = jwt.encode(body, SECRET, algorithm="HS256")
    return token


def rows_of(source: MemoryConnector, target: str) -> dict[str, dict[str, Any]]:
    """`target`'s rows in a memory connector, by row key: what a client's `rows` must equal."""
    return {k: dict(v) for k, v in source._tables[target].items()}


def snapshot_chunks(feed: FeedClient) -> list[Any]:
    """Every `snapshot` chunk event `feed` gets from now on, each still handled by the client.

    For tests that show the server really sent a snapshot in chunks before checking the rows
    the client assembled from them.
    """
    chunks: list[Any] = []
    assert feed._sio is not None
    library = feed._on_chunk

    async def spy(chunk: Any) -> None:
        chunks.append(chunk)
        await library(chunk)

    feed._sio.on("snapshot", spy)
    return chunks


class Harness:
    """One feed server on a fixed port, a proxy in front of it, and its memory source."""

    def __init__(self) -> None:
        self.listener = listening_socket()
        self.port = port_of(self.listener)
        self.proxy = CuttableProxy(self.port)
        self.app: FeedApp | None = None
        self.server: uvicorn.Server | None = None
        self.task: asyncio.Task[None] | None = None
        self.config = ""
        self.tables: dict[str, dict[str, dict[str, Any]]] | None = None
        self.positions: itertools.count[int] | None = None
        self.written: dict[str, Change] = {}
        """Changes written through `write`, by id, for `redeliver`."""
        self._source: MemoryConnector | None = None

    @property
    def url(self) -> str:
        """Through the proxy: what clients use, so tests can cut them off."""
        return f"http://127.0.0.1:{self.proxy.port}"

    @property
    def direct(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def source(self) -> MemoryConnector:
        """This server's memory connector (instances register by name, so keep our own)."""
        assert self._source is not None
        return self._source

    async def start(self, extra: str = "", auth: bool = False) -> None:
        self.config = config_text(extra, auth)
        await self.proxy.start()
        await self._serve()

    async def _serve(self) -> None:
        config = parse_config(self.config, "harness.toml", dict(os.environ))
        connectors = config.build_connectors()
        self._source = next(c for c in connectors if isinstance(c, MemoryConnector))
        if self.tables is not None:  # the "database" outlives the feed
            self._source._tables = self.tables
        if self.positions is not None:  # and so do its positions, which change ids are made of
            self._source._positions = self.positions
        self.app = FeedApp(config, connectors=connectors)
        # A long-poll whose connection was cut stays a running request until its session's next
        # ping (up to 25 s): past GRACE a stop cancels it, as `feed serve` does after 10 s.
        self.server = QuietServer(
            self.app.uvicorn_config(
                "127.0.0.1", self.port, log_level="warning", timeout_graceful_shutdown=GRACE
            )
        )
        # A copy: uvicorn closes the socket it served when it stops; the port stays ours.
        self.task = asyncio.create_task(self.server.serve(sockets=[self.listener.dup()]))
        async with asyncio.timeout(WAIT):
            while not self.server.started:
                if self.task.done():
                    self.task.result()
                    raise RuntimeError("uvicorn exited before it started")
                await asyncio.sleep(0.01)

    async def _halt(self) -> None:
        if self.server is not None and self.task is not None:
            self.tables = self.source._tables
            self.positions = self.source._positions
            self.server.should_exit = True
            await asyncio.wait_for(self.task, WAIT)
            self.server = self.task = None

    async def restart(self) -> None:
        """A new server process in all but name: new epoch, empty buffers, the same rows."""
        await self._halt()
        await self._serve()

    async def stop(self) -> None:
        try:
            await self._halt()
            await self.proxy.close()
        finally:
            self.listener.close()

    def connector(self, name: str = "mem") -> MemoryConnector:
        """One of this server's memory connectors: `mem`, or `skus` / `lines` (KEYED)."""
        if name == "mem":
            return self.source
        return MemoryConnector.instances[name]

    def write(
        self,
        target: str,
        op: str,
        row: dict[str, Any],
        connector: str = "mem",
        moved_from: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        change = self.connector(connector).write(target, op, row, moved_from)
        self.written[change.id] = change
        return change.wire

    def redeliver(self, change_id: str) -> None:
        """The change written with this id, sent again by the current server with its id (as a
        source read again from an older position after a crash sends it)."""
        self.source.redeliver(self.written[change_id])

    def burst(self, target: str, start: int, count: int, pad: int = 0) -> None:
        """`count` inserts in one go: the server sends them as `changes` frames."""
        for i in range(start, start + count):
            row: dict[str, Any] = {"id": i, "status": "new", "amount": i}
            if pad:  # incompressible, so that websocket compression cannot shrink it
                row["pad"] = os.urandom(pad // 2).hex()
            self.source.write(target, "insert", row)

    async def spread_burst(self, target: str, start: int, count: int, pad: int = 0) -> None:
        """The same inserts, 50 at a time with a pause between: a burst that takes a while."""
        for first in range(start, start + count, 50):
            self.burst(target, first, min(50, start + count - first), pad)
            await asyncio.sleep(0.01)

    def rows(self, target: str, connector: str = "mem") -> dict[str, dict[str, Any]]:
        return rows_of(self.connector(connector), target)

    async def delivered(self, connector: str = "mem") -> None:
        """Until the hub has routed every change written so far."""
        source = self.connector(connector)
        async with asyncio.timeout(WAIT):
            await source.routed()


class ClusterHarness:
    """Two nodes of one feed on one Redis (the suite's), the first behind a cuttable proxy.

    The memory connector is per node: changes are written on the node that holds the lease.
    """

    def __init__(self) -> None:
        self.stack = contextlib.AsyncExitStack()
        self.nodes: list[RunningFeed] = []
        self.proxy: CuttableProxy | None = None

    async def start(self, server: str = "") -> list[str]:
        """Start both nodes; `server` adds lines to their [server] table."""
        target = self.target = await self.stack.enter_async_context(open_redis_target())
        config = (
            f'[server]\nfilter_room_grace = 5\n{server}\n[cluster]\nurl = "{target.url}"\n'
            f'prefix = "{target.prefix.rstrip(":")}"\nlease = 1.0\nhistory = 1000\n'
            '\n[[connectors]]\nname = "mem"\ntype = "memory"\ntargets = ["public.orders"]\n' + KEYED
        )
        for i in range(2):
            node = config.replace("[cluster]\n", f'[cluster]\nnode = "node{i}"\n')
            self.nodes.append(await self.stack.enter_async_context(running_feed(node)))
        self.proxy = CuttableProxy(int(self.nodes[0].url.rsplit(":", 1)[1]))
        await self.proxy.start()
        self.stack.push_async_callback(self.proxy.close)
        return [f"http://127.0.0.1:{self.proxy.port}", self.nodes[1].url]

    async def lose_history(self) -> None:
        """Delete every room's numbers and history from Redis, as a Redis restarted without
        persistence would have (the suite's Redis may be shared: only this feed's keys go)."""
        keys = [key async for key in self.target.admin.scan_iter(f"{self.target.prefix}room:*")]
        if keys:
            await self.target.admin.delete(*keys)

    async def reader(self, name: str = "mem") -> MemoryConnector:
        """The memory connector of the node that reads it (once one holds the lease)."""
        async with asyncio.timeout(WAIT):
            while True:
                for node in self.nodes:
                    connector = node.hub.connectors[name]
                    leased = name in node.engine._leases
                    if leased and connector.status.state.value == "up":
                        assert isinstance(connector, MemoryConnector)
                        return connector
                await asyncio.sleep(0.05)  # no event for a lease taken in another node

    async def follower(self, name: str = "mem") -> str:
        """The URL of a node that does not read connector `name`: its snapshots come over Redis
        from the reader."""
        reader = await self.reader(name)
        node = next(n for n in self.nodes if n.hub.connectors[name] is not reader)
        return node.url

    async def stop(self) -> None:
        await self.stack.aclose()


@contextlib.asynccontextmanager
async def harness(extra: str = "", auth: bool = False) -> Any:
    h = Harness()
    try:
        await h.start(extra, auth)
        yield h
    finally:
        await h.stop()


async def serve_commands() -> None:
    """The JSON-lines loop the Node tests drive."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    h = Harness()
    cluster: ClusterHarness | None = None
    pg = PgFeed()
    background: set[asyncio.Task[None]] = set()

    def answer(body: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(body) + "\n")
        sys.stdout.flush()

    try:
        while line := await reader.readline():
            command = json.loads(line)
            cmd = command.get("cmd")
            try:
                reply: dict[str, Any] = {"ok": True}
                if cmd == "start":
                    await h.start(command.get("config", ""), bool(command.get("auth")))
                    reply.update(url=h.url, direct=h.direct)
                elif cmd == "write":
                    reply["change"] = h.write(
                        command["target"],
                        command["op"],
                        command["row"],
                        command.get("connector", "mem"),
                        command.get("moved_from"),
                    )
                elif cmd == "redeliver":
                    h.redeliver(command["id"])
                elif cmd == "burst" and command.get("spread"):
                    task = asyncio.create_task(
                        h.spread_burst(
                            command.get("target", "public.orders"),
                            command["start"],
                            command["count"],
                            command.get("pad", 0),
                        )
                    )
                    background.add(task)
                    task.add_done_callback(background.discard)
                elif cmd == "burst":
                    h.burst(
                        command.get("target", "public.orders"),
                        command["start"],
                        command["count"],
                        command.get("pad", 0),
                    )
                elif cmd == "truncate":
                    h.source.truncate(command.get("target", "public.orders"))
                elif cmd == "gap":
                    h.source.announce_gap(command.get("reason", "test gap"))
                elif cmd == "delivered":
                    await h.delivered(command.get("connector", "mem"))
                elif cmd == "rows":
                    reply["rows"] = h.rows(
                        command.get("target", "public.orders"), command.get("connector", "mem")
                    )
                elif cmd == "cut":
                    h.proxy.cut()
                elif cmd == "cut_polls":
                    reply["cut"] = await h.proxy.cut_waiting_polls(WAIT)
                elif cmd == "cut_answer":
                    h.proxy.answer_cut.clear()
                    h.proxy.truncate_marker = b'"status":"cut-here"'
                    h.write(command["target"], "insert", command["row"])
                    await asyncio.wait_for(h.proxy.answer_cut.wait(), WAIT)
                elif cmd == "restore":
                    h.proxy.restore()
                elif cmd == "rename":
                    h.proxy.rename(command.get("headers", {}))
                elif cmd == "restart":
                    await h.restart()
                elif cmd == "pg_start":
                    reply["url"] = await pg.start(
                        command["setup"], command["tables"], command.get("mode", "notify")
                    )
                elif cmd == "pg_sql":
                    reply["status"] = await pg.sql(command["sql"])
                elif cmd == "pg_stop":
                    await pg.stop()
                elif cmd == "token":
                    reply["token"] = make_token(float(command.get("ttl", 300)))
                elif cmd == "cluster_start":
                    cluster = ClusterHarness()
                    reply["urls"] = await cluster.start(command.get("server", ""))
                elif cmd == "cluster_write":
                    assert cluster is not None
                    source = await cluster.reader(command.get("connector", "mem"))
                    source.write(
                        command.get("target", "public.orders"), command["op"], command["row"]
                    )
                elif cmd == "cluster_follower":
                    assert cluster is not None
                    reply["url"] = await cluster.follower(command.get("connector", "mem"))
                elif cmd == "cluster_rows":
                    assert cluster is not None
                    source = await cluster.reader(command.get("connector", "mem"))
                    reply["rows"] = rows_of(source, command.get("target", "public.orders"))
                elif cmd == "cluster_lose_history":
                    assert cluster is not None
                    await cluster.lose_history()
                elif cmd in ("cluster_cut", "cluster_restore"):
                    assert cluster is not None and cluster.proxy is not None
                    if cmd == "cluster_cut":
                        cluster.proxy.cut()
                    else:
                        cluster.proxy.restore()
                elif cmd == "stop":
                    break
                else:
                    reply = {"ok": False, "error": f"unknown command {cmd!r}"}
            except Exception as exc:
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            answer(reply)
    finally:
        if cluster is not None:
            await cluster.stop()
        await pg.stop()
        await h.stop()
        answer({"ok": True, "stopped": True})


if __name__ == "__main__":
    asyncio.run(serve_commands())
