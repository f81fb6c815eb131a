"""/metrics as a scraper reads it: values exact, however large."""

from __future__ import annotations

import asyncio
import contextlib
import re

import aiohttp

from tests.auth_helpers import BASE, source
from tests.support.server import feed_client, running_feed
from tests.support.waiting import wait_until


async def test_large_counters_are_rendered_exactly() -> None:
    """A counter past a million was rendered with six significant digits (1.23457e+06): it
    moved only in steps of ten, of a hundred past ten million, so `rate()` of a busy feed's
    deliveries read as still, then as a burst."""
    async with running_feed(BASE) as feed, aiohttp.ClientSession() as http:
        feed.hub.metrics.inc("feed_changes_out_total", 1_234_567, connector="mem")
        feed.hub.metrics.inc("feed_changes_replayed_total", 123_456_789_012)
        async with http.get(feed.url + "/metrics") as response:
            text = await response.text()
        assert 'feed_changes_out_total{connector="mem"} 1234567\n' in text, text
        assert "feed_changes_replayed_total 123456789012\n" in text, text
        feed.hub.metrics.inc("feed_changes_out_total", 1, connector="mem")
        async with http.get(feed.url + "/metrics") as response:
            assert 'feed_changes_out_total{connector="mem"} 1234568\n' in await response.text()


async def test_replay_evictions_stay_counted_when_their_room_expires() -> None:
    """`feed_replay_evictions_total` summed the evictions of the rooms alive at the scrape, so
    it went down, a counter, whenever a busy row or filter room expired (seen in a 10-minute
    soak with clients churning through filters: 255,534 then 208,249 a second later), and
    `rate()` read every fall as a counter reset."""
    async with running_feed(BASE) as feed, aiohttp.ClientSession() as http:
        db = source(feed)

        async def evictions() -> int:
            async with http.get(feed.url + "/metrics") as response:
                text = await response.text()
            found = re.search(r"^feed_replay_evictions_total (\d+)$", text, re.M)
            assert found, text
            return int(found.group(1))

        async with feed_client(feed.url) as client:
            assert (await client.subscribe("mem:public.orders", filter="status=eq.paid"))["ok"]
            for n in range(60):  # replay_buffer = 50 in BASE: 10 fall out of the filter room
                db.write("public.orders", "insert", {"id": n, "status": "paid"})
            await client.take(60)
        before = await evictions()
        assert before >= 10, before
        # The client has left: the filter room expires after filter_room_grace (0.2 s).
        await wait_until(
            lambda: not any(room.filter for room in feed.hub.rooms.values()),
            what="the filter room to expire",
        )
        assert await evictions() >= before


async def test_task_count_returns_to_its_level_after_clients_leave() -> None:
    """`feed_tasks` is what an operator (and `python -m bench.soak`) watches for a task leak:
    it rises with clients, their catch-ups and snapshots, and once they have left and their
    rooms' grace has passed it is back where it was."""
    async with running_feed(BASE) as feed, aiohttp.ClientSession() as http:
        db = source(feed)
        for n in range(20):
            db.write("public.orders", "insert", {"id": n, "status": "paid"})

        async def tasks() -> int:
            async with http.get(feed.url + "/metrics") as response:
                text = await response.text()
            found = re.search(r"^feed_tasks (\d+)$", text, re.M)
            assert found, text
            return int(found.group(1))

        before = await tasks()
        async with contextlib.AsyncExitStack() as stack:
            for n in range(5):
                client = await stack.enter_async_context(feed_client(feed.url))
                ack = await client.subscribe(
                    "mem:public.orders", filter=f"id=gte.{n}", snapshot=True
                )
                assert ack["ok"], ack
            assert await tasks() > before  # the clients' connections are tasks of the server
        await wait_until(lambda: not feed.hub.clients, what="the clients to be gone")
        level = await tasks()
        async with asyncio.timeout(10):  # the grace is 0.2 s; a leftover task never ends
            while level > before:
                await asyncio.sleep(0.05)
                level = await tasks()
