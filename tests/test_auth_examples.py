"""The example clients work with auth on: a token from --token, only the tenant's own rows."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from tests.auth_helpers import TOKENS, source, token_config
from tests.support.examples import EXAMPLES, NODE_DIR, need_node
from tests.support.server import RunningFeed, running_feed

WAIT = 20.0


def commands() -> list[tuple[list[str], Path]]:
    # The Node case is always collected: it installs the example's dependencies itself
    # (need_node), so a fresh checkout runs it rather than leaving it out unseen.
    return [([sys.executable, "python_client.py"], EXAMPLES), (["node", "client.mjs"], NODE_DIR)]


async def run(
    feed: RunningFeed, command: list[str], cwd: Path, token: str | None
) -> asyncio.subprocess.Process:
    args = [*command, "--url", feed.url, "--room", "mem:public.orders", "--count", "2"]
    if token is not None:
        args += ["--token", token]
    return await asyncio.create_subprocess_exec(
        *args,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(EXAMPLES.parent)},
    )


@pytest.mark.parametrize(("command", "cwd"), commands(), ids=lambda c: str(c)[:20])
async def test_example_client_with_a_token_sees_only_its_tenant(
    command: list[str], cwd: Path
) -> None:
    if command[0] == "node":
        need_node()
    async with running_feed(token_config()) as feed:
        db = source(feed)
        refused = await run(feed, command, cwd, None)
        _, err = await asyncio.wait_for(refused.communicate(), WAIT)
        assert refused.returncode == 1 and b"cannot connect" in err

        process = await run(feed, command, cwd, TOKENS["acme-svc"])
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), WAIT)
            assert b"mem:public.orders?tenant_id=eq.acme@" in line, line
            db.write("public.orders", "insert", {"id": 1, "tenant_id": "globex", "secret": 1})
            db.write("public.orders", "insert", {"id": 2, "tenant_id": "acme"})
            db.write("public.orders", "update", {"id": 1, "tenant_id": "acme"})
            out, err = await asyncio.wait_for(process.communicate(), WAIT)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        printed = [
            line for line in out.decode().splitlines() if line.startswith(("insert", "update"))
        ]
        assert process.returncode == 0, err
        assert [line.split()[0] for line in printed] == ["insert", "update"]
        assert "key=2" in printed[0] and "key=1" in printed[1]
        assert "globex" not in out.decode()
