"""The headers of every answer the feed writes itself, and its plain-text refusals.

A refusal (a host not allowed, a POST too large, the connection cap, a websocket request that
cannot be served) used to be built by hand where it was made, each with its own headers: some
said `text/plain` without a charset, some had `X-Content-Type-Options` and others
`Connection: close`, and none had the rest of the hardening headers that the plain HTTP side
sends (feed.app.http). They are built here now, the same way, for all of them.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

Headers = list[tuple[bytes, bytes]]

PLAIN_TEXT = "text/plain; charset=utf-8"

SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    # Clickjacking: no other site may frame the dashboard (it holds an operator's token in
    # the tab) and trick clicks on its buttons. Both spellings, for older browsers.
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"frame-ancestors 'none'; object-src 'none'"),
    # The dashboard's address is the feed's, which links followed from it need not learn.
    (b"referrer-policy", b"no-referrer"),
)
"""Sent with every answer the feed writes itself: the plain HTTP side's and the refusals."""


def answer_headers(
    body: bytes,
    content_type: str,
    *,
    cache: str = "no-store",
    close: bool = False,
    extra: tuple[tuple[bytes, bytes], ...] = (),
) -> Headers:
    """An answer's headers: its type and length, caching, the security headers, and
    `Connection: close` when the connection is to end with it."""
    return [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", cache.encode()),
        *SECURITY_HEADERS,
        *extra,
        *([(b"connection", b"close")] if close else []),
    ]


async def answer(
    send: Any,
    status: int,
    body: bytes,
    content_type: str = PLAIN_TEXT,
    *,
    cache: str = "no-store",
    close: bool = False,
    websocket: bool = False,
    extra: tuple[tuple[bytes, bytes], ...] = (),
) -> None:
    """An answer through ASGI `send`, with `answer_headers`: plain text unless told, ending the
    connection if `close` (a refused request whose body is left unread, a connection over the
    cap).

    `websocket`: the answer to a websocket request (the `websocket.http.response` extension;
    `feed.security.guard.deny_websocket` checks the server has it). The server ends the
    connection after it by itself, with its own `Connection: close` (uvicorn's)."""
    kind = "websocket.http.response" if websocket else "http.response"
    headers = answer_headers(body, content_type, cache=cache, close=close, extra=extra)
    await send({"type": f"{kind}.start", "status": status, "headers": headers})
    await send({"type": f"{kind}.body", "body": body})


def answer_bytes(status: int, body: bytes) -> bytes:
    """The same answer as HTTP/1.1 bytes, for a connection refused before any request of it is
    read (the connection cap): it always ends the connection."""
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode()]
    head += [name + b": " + value for name, value in answer_headers(body, PLAIN_TEXT, close=True)]
    return b"\r\n".join(head) + b"\r\n\r\n" + body
