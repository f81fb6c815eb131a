"""Cluster tests: `feed serve` nodes as real processes, and clients that count what they get.

A `FeedNode` is one `feed serve` process with its own port and node name (the config reads it
from FEED_NODE); it can be stopped with SIGTERM, killed with SIGKILL, and started again on the
same port. A `Tally` is a Socket.IO client that follows one room across nodes: when its node
goes away it reconnects to the next one and resumes with `since` and `epoch`, and it records
every anomaly a user would notice (a seq out of order, a duplicate, a gap, a failed resume).
The last part starts nodes inside the test process instead (`start_nodes`), for the engine's
faster tests, on the Redis every test shares (tests/support/redis.py's `redis_target`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import socketio
from dbfeed_client.client import drop_wedged, transport_wedged

from bench.cluster import postgres_config
from connectors.memory import MemoryConnector
from tests.support.server import (
    PORT_TRIES,
    FeedClient,
    PortTaken,
    RunningFeed,
    free_port,
    on_free_port,
    running_feed,
)
from tests.support.waiting import wait_until

ROOT = Path(__file__).parent.parent.parent
WAIT = 30.0


class FeedNode:
    """One `feed serve` process of a cluster."""

    def __init__(
        self,
        name: str,
        config: Path,
        port: int | None = None,
        env: dict[str, str] | None = None,
        stdout: Path | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.env = env or {}
        """More environment for the process (PYTHONPATH is put before the project's)."""
        self.stdout = stdout
        """Where the process's standard output goes (uvicorn's request lines), else nowhere."""
        self.port = port or free_port()
        self._port_movable = port is None
        """True until the node first runs: until then nobody knows its port, so a port another
        process took in the meantime is replaced by a fresh one (see `start`)."""
        self.process: asyncio.subprocess.Process | None = None
        self.log: list[str] = []
        self._drain: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FeedNode:
        """Start `feed serve` and wait until it listens.

        `feed serve` must be told its port, picked free a moment before it binds: on a busy
        machine another process can take it in between ("address already in use"). Before the
        node first ran, it then retries with a fresh port, PORT_TRIES times in all; once it ran,
        clients know its port, so a restart on a port taken meanwhile fails, saying so.
        """
        for attempt in range(1, PORT_TRIES + 1):
            try:
                await self._start_once()
            except PortTaken as exc:
                if not self._port_movable:
                    raise PortTaken(
                        f"{exc} (its port is fixed: given, or known from a run)"
                    ) from None
                if attempt == PORT_TRIES:
                    raise PortTaken(f"{exc} (the last of {PORT_TRIES} ports tried)") from None
                self.port = free_port()
                continue
            self._port_movable = False
            return self
        raise AssertionError("unreachable")

    async def _start_once(self) -> None:
        first = len(self.log)  # this run's lines: the log spans restarts
        with contextlib.ExitStack() as files:
            stdout = (
                files.enter_context(self.stdout.open("ab"))
                if self.stdout is not None
                else asyncio.subprocess.DEVNULL
            )
            self.process = await self._spawn(stdout)
        assert self.process.stderr is not None
        async with asyncio.timeout(WAIT):
            while True:
                line = (await self.process.stderr.readline()).decode(errors="replace")
                if not line:
                    await self.process.wait()
                    self.process = None
                    text = "".join(self.log[first:])
                    if "already in use" in text.lower():
                        raise PortTaken(f"{self.name}: port {self.port} is taken:\n{text}")
                    raise AssertionError(f"{self.name} exited at start:\n{text}")
                self.log.append(line)
                if "Uvicorn running" in line:
                    break
        self._drain = asyncio.create_task(self._read_log())

    async def _spawn(self, stdout: Any) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "feed", "serve",
            "--config", str(self.config), "--port", str(self.port),
            stderr=asyncio.subprocess.PIPE,
            stdout=stdout,
            env={
                **os.environ, **self.env, "FEED_NODE": self.name,
                "PYTHONPATH": os.pathsep.join(filter(None, [self.env.get("PYTHONPATH"), str(ROOT)])),
            },
        )  # fmt: skip

    async def _read_log(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        while line := await self.process.stderr.readline():
            self.log.append(line.decode(errors="replace"))

    def kill(self) -> None:
        """kill -9: no lease released, no position saved, connections simply gone."""
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)

    async def stop(self) -> int | None:
        process = self.process
        if process is None:
            return None
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(process.wait(), WAIT)
        except TimeoutError:
            process.kill()
            code = await process.wait()
        if self._drain is not None:
            await asyncio.wait_for(self._drain, WAIT)
        self.process = None
        return code

    async def readyz(self) -> tuple[int, dict[str, Any]]:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{self.url}/readyz", timeout=aiohttp.ClientTimeout(total=5)) as response,
        ):
            return response.status, await response.json()

    async def wait_ready(self, status: int = 200, timeout: float = WAIT) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    code, body = await self.readyz()
                    if code == status:
                        return body
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)


@dataclass
class Tally:
    """A client following one room over a list of nodes; it resumes on the next node."""

    room: str
    urls: Callable[[], list[str]]
    name: str = "client"
    seqs: list[int] = field(default_factory=list)
    keys: list[Any] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    duplicates: int = 0
    disorder: list[tuple[int, int]] = field(default_factory=list)
    gaps: list[dict[str, Any]] = field(default_factory=list)
    resumes: list[dict[str, Any]] = field(default_factory=list)
    epoch: str | None = None
    node: int = 0
    errors: list[str] = field(default_factory=list)
    transports: tuple[str, ...] = ("websocket",)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    """Everything in arrival order: ("change", c), ("gap", g), ("resume", ack)."""
    wedges: int = 0
    """Transports found dead without a disconnect (see `_until_lost`)."""
    _sio: socketio.AsyncClient | None = None
    _task: asyncio.Task[None] | None = None
    _progress: asyncio.Event = field(default_factory=asyncio.Event)
    _lost: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def last(self) -> int | None:
        return self.seqs[-1] if self.seqs else None

    def _take(self, change: dict[str, Any]) -> None:
        self.events.append(("change", change))
        if change["id"] in self.ids:
            self.duplicates += 1
            return
        self.ids.add(change["id"])
        if self.seqs and change["seq"] != self.seqs[-1] + 1:
            self.disorder.append((self.seqs[-1], change["seq"]))
        self.seqs.append(change["seq"])
        self.keys.append(change["key"])
        self._progress.set()

    async def start(self) -> Tally:
        await self._connect()
        self._task = asyncio.create_task(self._follow())
        return self

    def _client(self) -> socketio.AsyncClient:
        sio = socketio.AsyncClient(reconnection=False)

        async def on_change(data: dict[str, Any]) -> None:
            self._take(data)

        async def on_changes(batch: list[dict[str, Any]]) -> None:
            for data in batch:
                self._take(data)

        async def on_gap(data: dict[str, Any]) -> None:
            self.gaps.append(data)
            self.events.append(("gap", data))

        async def on_disconnect(*args: Any) -> None:
            if self._sio is sio:
                self._lost.set()

        sio.on("change", on_change)
        sio.on("changes", on_changes)
        sio.on("gap", on_gap)
        sio.on("disconnect", on_disconnect)
        return sio

    async def _connect(self) -> None:
        """Connect to the next node that answers and subscribe (resuming when it has a seq)."""
        self._sio = None
        for _ in range(300):
            urls = self.urls()
            url = urls[self.node % len(urls)]
            sio = self._client()
            try:
                self._lost.clear()
                self._sio = sio
                await sio.connect(url, transports=list(self.transports), wait_timeout=5)
                request: dict[str, Any] = {"room": self.room}
                if self.last is not None:
                    request.update(since=self.last, epoch=self.epoch)
                ack = await sio.call("subscribe", request, timeout=10)
                if not ack.get("ok"):
                    raise RuntimeError(f"subscribe refused: {ack}")
                if self.last is not None:
                    self.resumes.append({"url": url, **ack})
                    self.events.append(("resume", ack))
                self.epoch = ack["epoch"]
                return
            except Exception as exc:
                self.errors.append(f"{url}: {type(exc).__name__}: {exc}")
                self._sio = None
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await sio.disconnect()
                self.node += 1
                await asyncio.sleep(0.2)
        raise AssertionError(f"{self.name} could not reconnect: {self.errors[-3:]}")

    async def _follow(self) -> None:
        while True:
            await self._until_lost()
            self.node += 1
            await self._connect()

    async def _until_lost(self) -> None:
        """The disconnect handler, or a wedged transport: python-engineio's long-polling
        client loses its read loop without a disconnect when a poll answer is cut mid-body (a
        node killed while its answer crosses the balancer), and would wait forever. Reconnecting
        then resumes with `since`, so a change the server lost still fails the test."""
        while not self._lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), 1.0)
            sio = self._sio
            if not self._lost.is_set() and sio is not None and transport_wedged(sio):
                self.errors.append(f"{self.name}: transport wedged without a disconnect")
                self.wedges += 1
                await drop_wedged(sio)
                self._lost.set()

    async def wait_for(self, count: int, timeout: float = WAIT) -> None:
        try:
            async with asyncio.timeout(timeout):
                while len(self.seqs) < count:
                    self._progress.clear()
                    await self._progress.wait()
        except TimeoutError:
            raise AssertionError(
                f"{self.name}: {len(self.seqs)} of {count} changes after {timeout}s; last seq "
                f"{self.last}, duplicates {self.duplicates}, jumps {self.disorder[:5]}, "
                f"gaps {self.gaps[:3]}, resumes {self.resumes[-3:]}, errors {self.errors[-3:]}, "
                f"follower {self._task}"
            ) from None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._task
        if self._sio is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._sio.disconnect()


@contextlib.asynccontextmanager
async def running_cluster(
    config: Path, count: int = 3, logs: Path | None = None
) -> AsyncIterator[list[FeedNode]]:
    """`count` nodes of one config (node0, node1, ...), ready; every one stopped at the end.
    With `logs`, each writes its standard output to `<logs>/<name>.out`."""
    nodes = [
        FeedNode(f"node{i}", config, stdout=None if logs is None else logs / f"node{i}.out")
        for i in range(count)
    ]
    try:
        await asyncio.gather(*(n.start() for n in nodes))
        for node in nodes:
            await node.wait_ready()
        yield nodes
    finally:
        for node in nodes:
            await node.stop()


@contextlib.asynccontextmanager
async def tallies_on(room: str, nodes: list[FeedNode]) -> AsyncIterator[list[Tally]]:
    """One `Tally` per node, each starting on its own node and resuming on the next ones
    (the same ports across restarts); all closed at the end."""
    urls = [n.url for n in nodes]
    tallies: list[Tally] = []
    try:
        for i, node in enumerate(nodes):
            tally = Tally(room, lambda: urls, name=f"client-on-{node.name}", node=i)
            tallies.append(await tally.start())
        yield tallies
    finally:
        for tally in tallies:
            await tally.close()


async def reading_node(nodes: list[FeedNode], connector: str = "main") -> FeedNode:
    """The node whose /readyz says it reads `connector`, once that connector is up there."""
    async with asyncio.timeout(WAIT):
        while True:
            for node in nodes:
                if node.process is None:
                    continue
                try:
                    _, body = await node.readyz()
                except Exception:
                    continue
                reading = connector in body.get("cluster", {}).get("reading", [])
                if reading and body["connectors"][connector]["state"] == "up":
                    return node
            await asyncio.sleep(0.1)


def haproxy_binary() -> str | None:
    """Debian's haproxy (`apt-get install haproxy`; .ci/run installs it)."""
    return shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None
    )


FAST_CHECKS = "check inter 300ms fall 2 rise 1"
"""Health checks that notice a dead node within a second, for tests that wait for that."""


def deploy_checks() -> str:
    """The health-check options of deploy/haproxy.cfg's servers (its `server-template` line)."""
    template = (ROOT / "deploy" / "haproxy.cfg").read_text()
    line = next(x for x in template.splitlines() if x.strip().startswith("server-template"))
    words = line.split()[4:]  # server-template <prefix> <count> <address> <options...>
    return " ".join(words[: words.index("resolvers")])


def haproxy_config(
    port: int,
    backends: list[tuple[str, int]],
    checks: str = FAST_CHECKS,
    binds: tuple[str, ...] = (),
) -> str:
    """deploy/haproxy.cfg's balancing and checks, with this test's nodes as the servers (checked
    with `checks`), listening on 127.0.0.1:`port` and on each of `binds` (`bind` lines' rest)."""
    template = (ROOT / "deploy" / "haproxy.cfg").read_text()
    head, _, _ = template.partition("    # servers\n")
    servers = "".join(f"    server {name} 127.0.0.1:{p} {checks}\n" for name, p in backends)
    text = head + servers
    more = "".join(f"\n    bind {bind}" for bind in binds)
    text = text.replace("    bind :8000", f"    bind 127.0.0.1:{port}{more}")
    # Docker's DNS resolver is for the compose network only.
    start = text.index("resolvers docker")
    end = text.index("\n\n", start)
    return text[:start] + text[end + 2 :]


def listens_on(pid: int, port: int) -> bool:
    """Process `pid` holds a TCP socket listening on `port` (Linux: /proc/net/tcp's listening
    sockets matched by inode against the process's file descriptors)."""
    listening = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:
            listening.add(f"socket:[{fields[9]}]")
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(fd) in listening:
                return True
    return False


class LoadBalancer:
    """HAProxy in front of the nodes, as docker-compose.yml runs it."""

    def __init__(
        self,
        config_dir: Path,
        backends: list[tuple[str, int]],
        checks: str = FAST_CHECKS,
        binds: tuple[str, ...] = (),
    ) -> None:
        self.port = 0  # picked by `start`
        self.path = config_dir / "haproxy.cfg"
        self.backends = backends
        self.checks = checks
        self.binds = binds
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> LoadBalancer:
        """Start HAProxy on a free port and wait until it accepts; a port another process took
        before HAProxy bound it is replaced by a fresh one (`on_free_port`)."""
        await on_free_port(self._start_once)
        return self

    async def _start_once(self, port: int) -> None:
        self.port = port
        self.path.write_text(haproxy_config(port, self.backends, self.checks, self.binds))
        binary = haproxy_binary()
        assert binary is not None
        check = await asyncio.create_subprocess_exec(
            binary, "-c", "-f", str(self.path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await check.communicate()
        assert check.returncode == 0, out.decode()
        log = self.path.with_name("haproxy.log")
        with log.open("wb") as stderr:
            process = self.process = await asyncio.create_subprocess_exec(
                binary, "-db", "-f", str(self.path),
                stdout=asyncio.subprocess.DEVNULL, stderr=stderr,
            )  # fmt: skip
        async with asyncio.timeout(WAIT):
            while True:
                if process.returncode is not None:
                    text = log.read_text(errors="replace")
                    self.process = None
                    if "cannot bind" in text.lower() or "already in use" in text.lower():
                        raise PortTaken(f"haproxy: port {port} is taken:\n{text}")
                    raise AssertionError(f"haproxy exited at start:\n{text}")
                # Its own socket, not merely something accepting there: a process that took the
                # port would accept too, while HAProxy is about to exit on "cannot bind".
                if listens_on(process.pid, port):
                    return
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await asyncio.wait_for(self.process.wait(), WAIT)


# -- nodes in this process (tests/test_cluster.py, tests/test_client_cluster.py) -------------
# The real app under uvicorn per node, each with its own memory connector: a test writes to the
# connector of the node that holds the lease (the reader).


def cluster_config(url: str, prefix: str, lease: float = 1.0, history: int = 50) -> str:
    return f"""
[server]
filter_room_grace = 0.5

[cluster]
url = "{url}"
prefix = "{prefix.rstrip(":")}"
lease = {lease}
history = {history}

[[connectors]]
name = "mem"
type = "memory"
targets = ["public.orders"]
"""


async def start_nodes(
    stack: AsyncExitStack, config: str, count: int, names: list[str] | None = None
) -> list[RunningFeed]:
    nodes = []
    for i in range(count):
        node_config = config.replace("[cluster]\n", f'[cluster]\nnode = "node{i}"\n')
        if names:
            node_config = config.replace("[cluster]\n", f'[cluster]\nnode = "{names[i]}"\n')
        nodes.append(await stack.enter_async_context(running_feed(node_config)))
    return nodes


def write_postgres_config(
    path: Path, dsn: str, redis_url: str, prefix: str, lease: float = 2.0, history: int = 1000
) -> Path:
    """A cluster config for `feed serve` processes reading `public.orders` from Postgres (its
    `node` from FEED_NODE; bench/cluster.py's writer, which the benches use too), with short
    intervals so that tests notice faults quickly."""
    path.write_text(
        postgres_config(
            dsn,
            redis_url,
            prefix,
            server={"filter_room_grace": 2},
            cluster={"lease": lease, "history": history},
            connector={
                "heartbeat_interval": 0.5,
                "reconnect_max": 0.5,
                "standby_interval": 0.2,
                "save_interval": 0.2,
            },
        )
    )
    return path


async def reader_of(nodes: list[RunningFeed], connector: str = "mem") -> RunningFeed:
    found: list[RunningFeed] = []

    def one_reads() -> bool:
        found[:] = [n for n in nodes if connector in n.engine._leases]
        return len(found) == 1 and found[0].hub.connectors[connector].status.state.value == "up"

    await wait_until(one_reads, 15, "one node to read the connector")
    return found[0]


def routes(engine: Any, room: str, connector: str = "mem", target: str = "public.orders") -> bool:
    """Whether the reader's routing index holds the filter room `room`."""
    index = engine._index.get(connector, {}).get(target)
    return index is not None and room in index.filtered


async def confirmed_reader(
    nodes: list[RunningFeed], admin: Any, connector: str = "mem"
) -> RunningFeed:
    """The node that reads `connector` by Redis's own account: its token is the current fence.

    After Redis restarted or froze, a node may still believe it reads (until its renewal fails)
    while another took the connector over; a change written to the old one's in-memory connector
    would be lost. The fence in Redis names exactly one reading, so the node holding that token
    is the reader until its lease lapses.
    """
    key = nodes[0].engine.fence_key(connector)
    try:
        async with asyncio.timeout(20):
            while True:
                fence = await admin.get(key)
                found = [
                    n for n in nodes
                    if fence is not None and n.engine._leases.get(connector) == fence.decode()
                    and n.hub.connectors[connector].status.state.value == "up"
                ]  # fmt: skip
                if found:
                    return found[0]
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"no node holds the current fencing token of {connector}") from None


async def reader_and_other(stack: AsyncExitStack, config: str) -> tuple[RunningFeed, RunningFeed]:
    """Two nodes of `config`: the one that reads the memory connector, and the other one."""
    nodes = await start_nodes(stack, config, 2)
    reader = await reader_of(nodes)
    return reader, next(n for n in nodes if n is not reader)


def memory(node: RunningFeed) -> MemoryConnector:
    connector = node.hub.connectors["mem"]
    assert isinstance(connector, MemoryConnector)
    return connector


async def subscribed(client: FeedClient, room: str, **fields: Any) -> dict[str, Any]:
    ack = await client.subscribe(room, **fields)
    assert ack["ok"], ack
    return ack
