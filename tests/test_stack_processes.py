"""The compose stack's processes, run here without Docker.

What docker-compose.yml runs, run the same way against this suite's own servers: the Postgres
init script, `feed migrate` then `feed serve` with deploy/feed.toml and the environment compose
gives the feed, Redis with keyspace events on (as the compose command line sets them), and
`python -m feed.demo.demo_writer` as the writer service. A Socket.IO client must then see the
writer's changes from all three sources, and both processes must stop cleanly on SIGTERM (what
`docker compose stop` sends).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.support import postgres as pg_support
from tests.support.mongodb import MongoSource, db, mongodb  # noqa: F401
from tests.support.postgres import PgDatabase
from tests.support.redis import RedisTarget, open_private_redis
from tests.support.server import FeedClient, PortTaken, on_free_port

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
WAIT = 30.0

pg_server = pg_support.pg_server
pg = pg_support.pg

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.mongodb]


@pytest.fixture
async def keyspace_redis() -> AsyncIterator[RedisTarget]:
    # The compose service's own flags (docker-compose.yml: redis.command).
    async with open_private_redis("--notify-keyspace-events", "KEA") as target:
        yield target


async def run(*args: str, env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), WAIT)
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace")


async def serve(
    config: Path, env: dict[str, str], log: Path
) -> tuple[asyncio.subprocess.Process, str]:
    """`feed serve` on a free port, once ready; a port another process took before the child
    bound it is replaced by a fresh one (`on_free_port`)."""

    async def start(port: int) -> tuple[asyncio.subprocess.Process, str]:
        with log.open("wb") as stderr:  # the child has its own copy
            server = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "feed", "serve", "--config", str(config), "--port", str(port),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=stderr,
                env=env,
            )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            await wait_ready(url, server)
        except BaseException:
            if server.returncode is None:
                server.kill()
            await server.wait()
            text = await asyncio.to_thread(log.read_text, errors="replace")
            if "already in use" in text.lower():
                raise PortTaken(f"port {port} is taken:\n{text}") from None
            raise
        return server, url

    return await on_free_port(start)


async def wait_ready(url: str, server: asyncio.subprocess.Process) -> None:
    """The compose healthcheck's condition: /readyz answers 200."""
    async with aiohttp.ClientSession() as http, asyncio.timeout(WAIT):
        while True:
            assert server.returncode is None, "feed serve exited"
            try:
                async with http.get(f"{url}/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.2)


async def stop(process: asyncio.subprocess.Process) -> int:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(process.wait(), WAIT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise


@pytest.mark.timeout(180)
async def test_compose_processes_deliver_the_writers_changes_from_all_three_sources(
    tmp_path: Path,
    pg: PgDatabase,
    keyspace_redis: RedisTarget,
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    # The postgres service's init script, as its entrypoint runs it on an empty volume.
    await pg.conn.execute((DEPLOY / "postgres" / "init.sql").read_text())
    # deploy/feed.toml with this test's own MongoDB database instead of `shop`.
    namespace = f"{db}.orders"
    config = tmp_path / "feed.toml"
    config.write_text((DEPLOY / "feed.toml").read_text().replace('"shop.orders"', f'"{namespace}"'))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": pg.url,
        "REDIS_URL": keyspace_redis.url,
        "FEED_CLUSTER_URL": keyspace_redis.url.rpartition("/")[0] + "/1",
        "MONGODB_URL": mongodb.url,
        "FEED_HOST": "127.0.0.1",
    }

    code, out = await run("feed", "migrate", "--config", str(config), env=env)
    assert code == 0, out
    assert "main: applied" in out and "main: watching public.orders" in out, out

    writer_log = (tmp_path / "writer.log").open("wb")
    server, url = await serve(config, env, tmp_path / "serve.log")
    writer = None
    try:
        client = await FeedClient().connect(url)
        try:
            rooms = ["main:public.orders", f"shop:{namespace}", "cache:session:*"]
            for room in rooms:
                ack = await client.subscribe(room)
                assert ack["ok"], ack
            writer = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "feed.demo.demo_writer",
                "--interval", "0.2", "--mongodb-namespace", namespace,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=writer_log,
                env=env,
            )  # fmt: skip
            seen: dict[str, set[str]] = {room: set() for room in rooms}
            async with asyncio.timeout(WAIT):
                while not all(seen.values()):
                    change = await client.next_change(WAIT)
                    seen[change["room"]].add(change["op"])
            assert "insert" in seen["main:public.orders"]
            assert "insert" in seen[f"shop:{namespace}"]
            assert seen["cache:session:*"] & {"set", "expired", "del"}
        finally:
            await client.close()
        if writer is not None:
            assert await stop(writer) == 0
        assert await stop(server) == 0
        log = (tmp_path / "serve.log").read_text(errors="replace")
        assert "Traceback" not in log, log[-3000:]
        assert "Traceback" not in (tmp_path / "writer.log").read_text(errors="replace")
    finally:
        for process in (writer, server):
            if process is not None and process.returncode is None:
                process.kill()
                await process.wait()
        writer_log.close()
