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


def js_snippet(page: Path, first_line: str) -> str:
    """The ```js block of `page` that starts with `first_line`, as a reader would copy it."""
    text = page.read_text(encoding="utf-8")
    match = re.search(rf"```js\n({re.escape(first_line)}.*?)```", text, re.S)
    assert match, f"{page.name} has no ```js block starting with {first_line!r}"
    return match.group(1)


async def run_js_snippet(tmp_path: Path, code: str, feed_url: str, snippet_filter: str) -> Output:
    """Start `code` as subscribe.mjs in an app folder whose node_modules has dbfeed-client."""
    need_node()
    (tmp_path / "node_modules").symlink_to(NODE_DIR / "node_modules")
    script = tmp_path / "subscribe.mjs"
    script.write_text(
        code.replace("http://127.0.0.1:8000", feed_url)
        .replace("main:public.orders", "mem:public.orders")
        .replace("status=eq.paid", snippet_filter)
    )
    process = await asyncio.create_subprocess_exec(
        "node", str(script), cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    return Output(process)


@pytest.mark.parametrize("snippet_filter", ["status=eq.paid", "status=zz.paid"])
async def test_the_readmes_javascript_snippet_runs_as_written(
    tmp_path: Path, snippet_filter: str
) -> None:
    """README.md's subscribe.mjs: the current rows, then each change; a bad filter says why."""
    code = js_snippet(ROOT / "README.md", "// subscribe.mjs")
    async with running_feed(MEMORY_CONFIG) as feed:
        source = MemoryConnector.instances["mem"]
        source.write("public.orders", "insert", {"id": 1, "status": "paid"})
        out = await run_js_snippet(tmp_path, code, feed.url, snippet_filter)
        try:
            if snippet_filter.startswith("status=zz"):
                await out.expect(r"^subscribe failed: bad_filter: .*unknown operator 'zz'")
                assert await asyncio.wait_for(out.process.wait(), WAIT) == 0
                return
            await out.expect(r"^1 paid orders now$")
            source.write("public.orders", "insert", {"id": 2, "status": "paid"})
            source.write("public.orders", "delete", {"id": 2})
            await out.expect(r"^insert 2 \{ id: 2, status: 'paid' \}$")
            await out.expect(r"^delete 2 \{ id: 2, status: 'paid' \}$")
        finally:
            if out.process.returncode is None:
                out.process.kill()
                await out.process.wait()


async def test_clients_md_javascript_sample_runs_as_written(tmp_path: Path) -> None:
    """docs/clients.md's JavaScript sample, pasted into a module, runs to its end (no undefined
    name): the snapshot's rows, `live`, then it unsubscribes and closes, and Node exits."""
    code = js_snippet(ROOT / "docs" / "clients.md", "// an ES module")
    async with running_feed(MEMORY_CONFIG) as feed:
        MemoryConnector.instances["mem"].write(
            "public.orders", "insert", {"id": 1, "status": "paid"}
        )
        out = await run_js_snippet(tmp_path, code, feed.url, "status=eq.paid")
        try:
            await out.expect(r"^1 rows$")
            await out.expect(r"^live \{\}$")
            assert await asyncio.wait_for(out.process.wait(), WAIT) == 0, out.lines
        finally:
            if out.process.returncode is None:
                out.process.kill()
                await out.process.wait()


async def test_the_js_client_readmes_sample_runs_as_written(tmp_path: Path) -> None:
    """clients/js/README.md's sample runs as pasted; its empty loop is given a body to watch."""
    code = js_snippet(
        ROOT / "clients" / "js" / "README.md", 'import { FeedClient } from "dbfeed-client";'
    )
    loop = "for await (const change of sub) {}"
    assert loop in code
    code = code.replace(
        loop,
        "console.log(`${rows.size} rows`);\n"
        "for await (const change of sub) { console.log(change.op, change.key); break; }\n"
        "feed.close();",
    )
    async with running_feed(MEMORY_CONFIG) as feed:
        source = MemoryConnector.instances["mem"]
        source.write("public.orders", "insert", {"id": 1, "status": "paid"})
        out = await run_js_snippet(tmp_path, code, feed.url, "status=eq.paid")
        try:
            await out.expect(r"^1 rows$")
            source.write("public.orders", "insert", {"id": 2, "status": "paid"})
            await out.expect(r"^insert 2$")
            assert await asyncio.wait_for(out.process.wait(), WAIT) == 0, out.lines
        finally:
            if out.process.returncode is None:
                out.process.kill()
                await out.process.wait()


@pytest.mark.parametrize("client", ["python", "node"])
async def test_the_example_clients_say_when_a_row_leaves_a_filter(client: str) -> None:
    """An update that takes a row out of a filter room (`left: true`) was printed like any
    other, `update ... status=eq.paid ... "refunded"`: a reader took the filter for broken."""
    if client == "node":
        need_node()
        command, cwd = ["node", "client.mjs"], NODE_DIR
    else:
        command, cwd = [sys.executable, str(EXAMPLES / "python_client.py")], ROOT
    async with running_feed(MEMORY_CONFIG) as feed:
        process = await asyncio.create_subprocess_exec(
            *command, "--url", feed.url, "--room", "mem:public.orders",
            "--filter", "status=eq.paid", "--count", "2",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        out = Output(process)
        try:
            await out.expect(r"^live ")
            source = MemoryConnector.instances["mem"]
            source.write("public.orders", "insert", {"id": 1, "status": "paid"})
            source.write("public.orders", "update", {"id": 1, "status": "refunded"})
            entered = await out.expect(r"^insert ")
            left = await out.expect(r"^update ")
            assert await asyncio.wait_for(process.wait(), WAIT) == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert "left" not in entered
    assert left.endswith("(left the filter)"), left
