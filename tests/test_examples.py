"""The examples run as documented in examples/README.md, against a real feed server.

Each client is started as a user would start it, through a TCP proxy that the test can cut like
a dropped network: the client must print changes, notice the drop, reconnect, resume with
`since` and `epoch`, and print the changes made while it was away exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from connectors.memory import MemoryConnector
from feed.app.config import load_config
from tests.conftest import MEMORY_CONFIG
from tests.support.examples import EXAMPLES, NODE_DIR, ROOT, need_node
from tests.support.proxy import CuttableProxy
from tests.support.server import RunningFeed, running_feed

WAIT = 20.0


@contextlib.asynccontextmanager
async def feed_behind_proxy() -> AsyncIterator[tuple[RunningFeed, CuttableProxy]]:
    async with running_feed(MEMORY_CONFIG) as feed:
        proxy = CuttableProxy(int(feed.url.rsplit(":", 1)[1]))
        await proxy.start()
        try:
            yield feed, proxy
        finally:
            await proxy.close()


class Output:
    """A client's stdout, read line by line, waited on by pattern (never by sleeping)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []

    async def expect(self, pattern: str, timeout: float = WAIT) -> str:
        assert self.process.stdout is not None
        regex = re.compile(pattern)
        for line in self.lines:
            if regex.search(line):
                return line
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.process.stdout.readline()
                if not raw:
                    err = b""
                    if self.process.stderr is not None:
                        err = await self.process.stderr.read()
                    pytest.fail(
                        f"client exited before printing {pattern!r}:\n"
                        + "\n".join(self.lines)
                        + f"\n{err.decode(errors='replace')}"
                    )
                line = raw.decode().rstrip("\n")
                self.lines.append(line)
                if regex.search(line):
                    return line


async def follow_with_a_drop(command: list[str], cwd: Path) -> list[str]:
    """Run a client through a cut, return what it printed; it must exit 0 after 3 changes."""
    async with feed_behind_proxy() as (_feed, proxy):
        url = f"http://127.0.0.1:{proxy.port}"
        process = await asyncio.create_subprocess_exec(
            *command, "--url", url, "--room", "mem:public.orders", "--count", "3",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=cwd,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        out = Output(process)
        try:
            await out.expect(r"^live    mem:public\.orders at seq 0$")
            source = MemoryConnector.instances["mem"]
            source.write("public.orders", "insert", {"id": 1, "status": "new"})
            await out.expect(r"^insert  mem:public\.orders #1 key=1 ")

            proxy.cut()
            await out.expect(r"^disconnected; reconnecting")
            # Written while the client is away: it must get both on resume, once each.
            source.write("public.orders", "update", {"id": 1, "status": "paid"})
            source.write("public.orders", "insert", {"id": 2, "status": "new"})
            proxy.restore()

            await out.expect(r"^resumed mem:public\.orders: 2 missed change\(s\) replayed$")
            await out.expect(r"^insert  mem:public\.orders #3 key=2 ")
            assert await asyncio.wait_for(process.wait(), WAIT) == 0
            assert process.stdout is not None
            out.lines += (await process.stdout.read()).decode().splitlines()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    changes = [line for line in out.lines if re.match(r"^(insert|update|delete) ", line)]
    assert [c.split()[2] for c in changes] == ["#1", "#2", "#3"], out.lines
    assert changes[1].startswith("update  mem:public.orders #2 key=1 ")
    assert '"paid"' in changes[1]
    # Only the cut is a disconnect to report: leaving after --count is not one.
    assert [line for line in out.lines if line.startswith("disconnected")] == [
        "disconnected; reconnecting ..."
    ], out.lines
    return out.lines


async def test_python_client_prints_changes_and_resumes_after_a_drop() -> None:
    await follow_with_a_drop([sys.executable, str(EXAMPLES / "python_client.py")], ROOT)


async def test_node_client_prints_changes_and_resumes_after_a_drop() -> None:
    need_node()
    await follow_with_a_drop(["node", "client.mjs"], NODE_DIR)


async def test_python_client_reports_a_refused_subscribe() -> None:
    async with running_feed(MEMORY_CONFIG) as feed:
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(EXAMPLES / "python_client.py"),
            "--url", feed.url, "--room", "mem:no.such.table",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), WAIT)
    assert b"subscribe mem:no.such.table: unknown_target" in out, out + err
    assert b"Traceback" not in err


@pytest.mark.parametrize("name", ["postgres", "redis", "mongodb"])
def test_example_configs_load(name: str) -> None:
    env = {
        "DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/postgres",
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        "MONGODB_URL": "mongodb://127.0.0.1:27017/?replicaSet=rs0",
    }
    config = load_config(EXAMPLES / f"{name}.toml", env=env)
    assert [c.type for c in config.connectors] == [name]
    assert f"examples/{name}.toml" in (EXAMPLES / "README.md").read_text()


def readme_python_snippet() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"```python\n(# subscribe\.py.*?)```", readme, re.S)
    assert match, "README.md has no ```python block starting with '# subscribe.py'"
    return match.group(1)


@pytest.mark.parametrize("snippet_filter", ["status=eq.paid", "status=zz.paid"])
async def test_the_readmes_python_snippet_runs_as_written(
    tmp_path: Path, snippet_filter: str
) -> None:
    """The current rows, then each change (a delete's before image); a bad filter says why."""
    async with running_feed(MEMORY_CONFIG) as feed:
        source = MemoryConnector.instances["mem"]
        source.write("public.orders", "insert", {"id": 1, "status": "paid"})
        script = tmp_path / "subscribe.py"
        script.write_text(
            readme_python_snippet()
            .replace("http://127.0.0.1:8000", feed.url)
            .replace("main:public.orders", "mem:public.orders")
            .replace("status=eq.paid", snippet_filter)
        )
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(script),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out = Output(process)
        try:
            if snippet_filter.startswith("status=zz"):
                await out.expect(r"SubscribeError: bad_filter: .*unknown operator 'zz'")
                assert await asyncio.wait_for(process.wait(), WAIT) != 0
                return
            await out.expect(r"^1 paid orders now$")
            source.write("public.orders", "insert", {"id": 2, "status": "paid"})
            source.write("public.orders", "delete", {"id": 2})
            await out.expect(r"^insert 2 \{'id': 2, 'status': 'paid'\}$")
            await out.expect(r"^delete 2 \{'id': 2, 'status': 'paid'\}$")
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
