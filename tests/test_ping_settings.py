"""`[server] ping_interval` / `ping_timeout`: told to clients at connect, and enforced."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import websockets

from feed.app.config import parse_config
from feed.errors import ConfigError
from tests.support.server import running_feed

CONFIG = """
[server]
ping_interval = {interval}
ping_timeout = {timeout}

[[connectors]]
name = "mem"
type = "memory"
targets = ["public.things"]
"""


async def test_the_handshake_advertises_the_configured_ping_and_a_silent_client_is_dropped() -> (
    None
):
    async with running_feed(CONFIG.format(interval=1, timeout=2)) as feed:
        url = feed.url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket"
        async with websockets.connect(url) as ws:
            opened = await asyncio.wait_for(ws.recv(), 10)
            assert isinstance(opened, str) and opened.startswith("0")
            handshake = json.loads(opened[1:])
            assert (handshake["pingInterval"], handshake["pingTimeout"]) == (1000, 2000)
            await ws.send("40")  # join the default namespace, then never answer a ping
            started = time.monotonic()
            pings = 0
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    frame = await asyncio.wait_for(ws.recv(), 15)
                    pings += frame == "2"
        # Pinged after about 1 s, dropped once the pong is 2 s late.
        assert pings >= 1
        assert time.monotonic() - started < 15


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("ping_interval", "0.5", "server.ping_interval: must be a whole number, not 0.5"),
        ("ping_timeout", "0", "server.ping_timeout: must be from 1 to 3600, not 0"),
    ],
)
def test_ping_settings_are_whole_seconds(key: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse_config(f"[server]\n{key} = {value}\n", "feed.toml", {})


def test_defaults_are_engine_io_s() -> None:
    server = parse_config("", "feed.toml", {}).server
    assert (server.ping_interval, server.ping_timeout) == (25, 20)
