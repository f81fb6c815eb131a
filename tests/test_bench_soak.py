"""`python -m bench.soak`, run for a few seconds: it works end to end, and what a node held for
its clients is let go once they have left. No figure is judged (they are a soak's to report)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from tests.support import postgres as pg_support
from tests.support.postgres import PgServer

pg_server = pg_support.pg_server
ROOT = Path(__file__).parent.parent


async def test_a_short_soak_runs_and_its_node_lets_go_of_what_clients_held(
    pg_server: PgServer, tmp_path: Path
) -> None:
    out = tmp_path / "soak.json"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.soak", "--minutes", "0.2", "--sessions", "4",
        "--rate", "5", "--grace", "1", "--every", "2", "--json", str(out),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "FEED_BENCH_POSTGRES_URL": pg_server.admin_url},
    )  # fmt: skip
    async with asyncio.timeout(110):  # 12 s of soak, the start, and the wait for the grace
        printed, _ = await process.communicate()
    assert process.returncode == 0, printed.decode()[-3000:]
    result = json.loads(out.read_text())
    assert {"node0.rss_kib", "node0.fds", "node0.tasks", "pg.journal_bytes"} <= {
        row["series"] for row in result["growth"]
    }
    assert result["clients"]["connects"] > 0, result["clients"]
    assert result["transactions"] > 0
    after = result["after_clients_left"]
    # Everyone left and the grace passed: no clients, no row or filter rooms, two target rooms.
    assert (after["node0.clients"], after["node0.rooms_row"], after["node0.rooms_filter"]) == (
        0,
        0,
        0,
    ), after
    assert after["node0.rooms_target"] == 2
    assert b"/min 2nd half" in printed
