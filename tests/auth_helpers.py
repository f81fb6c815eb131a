"""Helpers for the auth and limits tests: configs, tokens, and connecting to hear a refusal."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import jwt
import socketio
from websockets.asyncio.client import ClientConnection, connect

from connectors.memory import MemoryConnector
from feed.security.auth import hash_token
from tests.support.server import WAIT, RunningFeed

SECRET = "s3cret-for-tests-only-0123456789abcdef"
ISSUER = "https://issuer.test"
AUDIENCE = "feed"
# Tenant claims the filter language could read as something other than their text (issue 18):
# "null" is refused; the others are tenants like any other and see exactly the rows with that text.
SPECIAL_CLAIMS = {
    "null": "null",
    "NULL": "NULL",
    "true": "true",
    "comma": "acme,globex",
    "inject": "acme&tenant_id=neq.acme",
    "paren": "(acme)",
    "percent": "%61cme",
}
TOKENS = {
    "ops": "ops-token-0001",
    "acme-svc": "acme-token-0002",
    "globex-svc": "globex-token-03",
    **{f"{who}-svc": f"{who}-token-0004" for who in SPECIAL_CLAIMS},
}

BASE = """
[server]
replay_buffer = 50
filter_room_grace = 0.2

[[connectors]]
name = "mem"
type = "memory"
targets = ["public.orders", "public.customers", "public.audit"]
"""


def static_tokens() -> str:
    """ops is an admin; the service tokens carry a tenant claim (SPECIAL_CLAIMS ones too)."""
    return f"""
[[auth.tokens]]
name = "ops"
sha256 = "{hash_token(TOKENS["ops"])}"
roles = ["admin"]

[[auth.tokens]]
name = "acme-svc"
sha256 = "{hash_token(TOKENS["acme-svc"])}"
roles = ["tenant"]
claims = {{ tenant = "acme" }}

[[auth.tokens]]
name = "globex-svc"
sha256 = "{hash_token(TOKENS["globex-svc"])}"
roles = ["tenant", "support"]
claims = {{ tenant = "globex" }}
""" + "".join(
        f"""
[[auth.tokens]]
name = "{who}-svc"
sha256 = "{hash_token(TOKENS[f"{who}-svc"])}"
roles = ["tenant"]
claims = {{ tenant = {json.dumps(claim)} }}
"""
        for who, claim in SPECIAL_CLAIMS.items()
    )


RULES = """
[[auth.rules]]
roles = ["admin"]
allow = ["*"]

[[auth.rules]]
roles = ["tenant"]
allow = ["mem:public.orders", "mem:public.customers"]
row_filter = "tenant_id=eq.{tenant}"

[[auth.masks]]
rooms = ["mem:public.customers"]
fields = ["password_hash", "profile.ssn"]
except_roles = ["admin"]

[[auth.masks]]
rooms = ["mem:*"]
fields = ["internal_note"]
roles = ["support"]
"""


def jwt_config(leeway: float = 0, extra: str = "") -> str:
    return (
        BASE
        + f"""
[auth]
mode = "jwt"
leeway = {leeway}

[auth.jwt]
algorithms = ["HS256"]
secret = "{SECRET}"
audience = "{AUDIENCE}"
issuer = "{ISSUER}"
{extra}
"""
        + static_tokens()
        + RULES
    )


def token_config() -> str:
    return BASE + '\n[auth]\nmode = "token"\n' + static_tokens() + RULES


def make_jwt(
    sub: str | None = "alice",
    *,
    ttl: float = 300,
    key: Any = SECRET,
    algorithm: str = "HS256",
    headers: dict[str, Any] | None = None,
    **claims: Any,
) -> str:
    now = time.time()
    body: dict[str, Any] = {
        "sub": sub,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": int(now),
        "exp": now + ttl,
        "roles": ["tenant"],
        "tenant": "acme",
    }
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    token: str = jwt.encode(body, key, algorithm=algorithm, headers=headers)
    return token


async def refusal(url: str, auth: Any) -> dict[str, Any]:
    """Connect expecting a refusal; return the reason the server sent."""
    client = socketio.AsyncClient(reconnection=False)
    reasons: asyncio.Queue[Any] = asyncio.Queue()
    client.on("connect_error", reasons.put_nowait)
    try:
        await client.connect(url, auth=auth, transports=["websocket"], wait_timeout=WAIT)
    except socketio.exceptions.ConnectionError:
        pass
    else:
        await client.disconnect()
        raise AssertionError(f"the server accepted auth={auth!r}")
    reason: dict[str, Any] = await asyncio.wait_for(reasons.get(), WAIT)
    return reason


def source(feed: RunningFeed) -> MemoryConnector:
    connector = feed.hub.connectors["mem"]
    assert isinstance(connector, MemoryConnector)
    return connector


def ws_url(feed: RunningFeed) -> str:
    return feed.url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"


async def raw_socketio(
    feed: RunningFeed, auth: dict[str, Any] | None = None, **options: Any
) -> tuple[ClientConnection, str]:
    """A bare websocket that speaks just enough Engine.IO/Socket.IO to subscribe.

    Its receive buffer is tiny and it reads only when told, so once the test stops reading,
    the server's writes back up exactly as with a client that froze.
    """
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    port = int(feed.url.rsplit(":", 1)[1])
    sock.connect(("127.0.0.1", port))
    ws = await connect(
        ws_url(feed), sock=sock, compression=None, proxy=None, max_queue=1, **options
    )
    opened = await asyncio.wait_for(ws.recv(), 5)
    assert isinstance(opened, str) and opened.startswith("0")
    eio_sid = json.loads(opened[1:])["sid"]
    await ws.send("40" + (json.dumps(auth) if auth else ""))
    connected = await asyncio.wait_for(ws.recv(), 5)
    assert isinstance(connected, str) and connected.startswith("40"), connected
    return ws, eio_sid


async def raw_subscribe(ws: ClientConnection, room: str) -> dict[str, Any]:
    await ws.send("420" + json.dumps(["subscribe", {"room": room}]))
    while True:
        frame = await asyncio.wait_for(ws.recv(), 5)
        if isinstance(frame, str) and frame.startswith("430"):
            ack: dict[str, Any] = json.loads(frame[3:])[0]
            return ack
