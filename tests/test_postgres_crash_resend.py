"""`kill -9` of a real `feed serve` while it delivers a large transaction, with real clients.

After a crash the Postgres connector sends again what it routed since its last saved
position. The saves were by time only (`save_interval`), so how much came again grew with the
write rate: 17,001 changes (notify mode) and 10,001 (logical mode) in the probes, more than the
client libraries' duplicate window of 4,096 ids per subscription, so the application got them
twice. Now a save also comes every `save_every` changes (2,000 by default), whatever the rate:
what comes again fits the window. The tests set `save_interval` to 30 s, i.e. a write rate at
which half a second is already too long, so the old code fails whatever the machine's speed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dbfeed_client import FeedClient, Subscription

from connectors.postgres_tables import READER_LOCK_CLASS
from tests.support import postgres as pg_support
from tests.support.cluster import FeedNode, Tally
from tests.support.postgres import PgDatabase

pg_server = pg_support.pg_server
pg = pg_support.pg

ROWS = 50_000
SAVE_EVERY = 2000  # the default of `save_every`
WINDOW = 4096  # the client libraries' duplicate window (clients/python MAX_IDS, clients/js)
WAIT = 60.0


def config(db: PgDatabase, mode: str) -> str:
    return f"""
[[connectors]]
name = "main"
type = "postgres"
dsn = "{db.url}"
tables = ["public.orders"]
mode = "{mode}"
auto_migrate = true
save_interval = 30.0
standby_interval = 0.1
"""


async def app_changes(url: str, got: list[dict[str, Any]], subs: list[Subscription]) -> None:
    """What an application using the Python client library is handed, in order."""
    async with (
        FeedClient(url, reconnection_delay=0.1, reconnection_delay_max=0.5) as feed,
        feed.subscribe("main:public.orders", max_queue=100_000) as sub,
    ):
        subs.append(sub)
        async for change in sub:
            got.append(change)


async def until(check: Callable[[], bool], what: str) -> None:
    """Wait for what a client of its own reaches (no event to await: polled)."""
    try:
        async with asyncio.timeout(WAIT):
            while not check():  # noqa: ASYNC110 - no event for it
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"waited {WAIT:g}s for {what}") from None


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["notify", "logical"])
async def test_a_kill_during_a_large_transaction_sends_again_at_most_save_every(
    pg: PgDatabase, tmp_path: Path, mode: str
) -> None:
    if mode == "logical" and await pg.server.wal_level() != "logical":
        pytest.skip("the server's wal_level is not logical")
    await pg.conn.execute("CREATE TABLE public.orders (id int PRIMARY KEY, amount int)")
    await pg.conn.execute(f"INSERT INTO orders SELECT g, 0 FROM generate_series(1, {ROWS}) g")
    path = tmp_path / "feed.toml"
    path.write_text(config(pg, mode))
    node = await FeedNode("feed", path).start()
    tally = Tally("main:public.orders", lambda: [node.url])
    app: list[dict[str, Any]] = []
    subs: list[Subscription] = []
    listener: asyncio.Task[None] | None = None
    try:
        await node.wait_ready(timeout=WAIT)
        await tally.start()
        listener = asyncio.create_task(app_changes(node.url, app, subs))
        await until(lambda: bool(subs) and subs[0].state == "live", "the library live")
        await pg.conn.execute("UPDATE orders SET amount = amount + 1")  # one transaction
        await tally.wait_for(11_234, timeout=WAIT)  # not at a save
        epoch = subs[0].epoch
        node.kill()  # kill -9: no position saved at stop
        assert node.process is not None
        await asyncio.wait_for(node.process.wait(), WAIT)
        at_kill = len(tally.seqs)
        assert at_kill < ROWS, "the kill came after the whole transaction was delivered"
        await node.stop()
        # The restarted feed waits as a standby (the reader's lock held here) until both
        # clients are subscribed again: without a cluster a room's history dies with the
        # process, so what it routed before a client came back would be a `reload`'s loss,
        # not the connector's.
        await pg.conn.execute(
            "SELECT pg_advisory_lock($1, hashtext('feed/main'))", READER_LOCK_CLASS, timeout=WAIT
        )
        await node.start()
        await until(lambda: len(tally.resumes) == 1, "the tally subscribed again")
        await until(
            lambda: subs[0].epoch != epoch and subs[0].state != "pending", "the library again"
        )
        await pg.conn.execute(
            "SELECT pg_advisory_unlock($1, hashtext('feed/main'))", READER_LOCK_CLASS
        )
        await tally.wait_for(ROWS, timeout=WAIT)
        await until(lambda: len({c["id"] for c in app}) >= ROWS, "the library's changes")
    finally:
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(BaseException):
                await listener
        await tally.close()
        await node.stop()
    sent = Counter(c["id"] for kind, c in tally.events if kind == "change")
    again = sum(1 for n in sent.values() if n > 1)
    print(f"{mode}: killed with {at_kill} delivered; {again} sent again")  # shown with -s
    assert sorted(tally.keys) == list(range(1, ROWS + 1))  # none missing
    assert len(sent) == ROWS and tally.gaps == []
    assert again <= SAVE_EVERY < WINDOW, (
        f"{again} changes sent again after a kill -9 at {at_kill} delivered (save_every is "
        f"{SAVE_EVERY}, the client libraries' window {WINDOW})"
    )
    passed = Counter(c["id"] for c in app)
    twice = sum(1 for n in passed.values() if n > 1)
    assert twice == 0, f"the client library passed {twice} changes on twice"
    assert len(passed) == ROWS
