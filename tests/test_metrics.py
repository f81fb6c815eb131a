"""/metrics as a scraper reads it: values exact, however large."""

from __future__ import annotations

import aiohttp

from tests.auth_helpers import BASE
from tests.support.server import running_feed


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
