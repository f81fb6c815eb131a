"""`python -m bench.chaos`, run for a few seconds with one kind of fault: the cluster, the
writer, the subscribers and the checks work end to end, and a run without a fault that loses
anything quietly reports no violation."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from tests.support import postgres as pg_support
from tests.support.postgres import PgServer
from tests.support.redis import find_redis_server

pg_server = pg_support.pg_server
ROOT = Path(__file__).parent.parent

pytestmark = pytest.mark.skipif(find_redis_server() is None, reason="no redis-server binary")


async def test_a_short_chaos_run_with_a_node_killed_reports_its_figures_and_no_violation(
    pg_server: PgServer, tmp_path: Path
) -> None:
    out = tmp_path / "chaos.json"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.chaos", "--seed", "3", "--minutes", "0.15",
        "--clients", "2", "--rate", "10", "--every", "100", "--faults", "kill",
        "--quiet", "60", "--json", str(out), "--logs", str(tmp_path / "logs"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={
            **os.environ,
            "PYTHONPATH": f"{ROOT}:{ROOT / 'clients' / 'python'}",
            "FEED_BENCH_POSTGRES_URL": pg_server.admin_url,
        },
    )  # fmt: skip
    async with asyncio.timeout(150):  # 9 s of faults, the start, and the quiet period
        printed, _ = await process.communicate()
    assert process.returncode == 0, printed.decode()[-3000:]
    result = json.loads(out.read_text())
    assert result["faults"] == {"kill": 1}, result["fault_log"]  # the first comes at 0.5 s
    assert result["transactions"] > 0 and result["changes_checked"] > 0
    assert result["violations"] == []
    assert set(result["subscribers"]) == {
        f"client{c}/{kind}" for c in range(2) for kind in ("table", "filter", "row")
    }
    assert b"violations: 0" in printed
