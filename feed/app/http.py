"""The plain HTTP side of the ASGI app: health, readiness, metrics and the dashboard's files.

Small enough that a framework would be the larger part; Socket.IO traffic never reaches it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import mimetypes
import re
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from feed.routing.hub import Hub
from feed.security.answers import answer
from feed.security.guard import deny_websocket

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

DASHBOARD_DIR = Path(__file__).parent.parent / "dashboard"
"""feed/dashboard/, where setup.py's build hook puts the built dashboard (package data of feed)."""
NOT_BUILT = b"""<!doctype html><title>dbfeed</title>
<h1>dbfeed is running</h1>
<p>The dashboard has not been built in this install: in a checkout, run <code>make dashboard</code>
(<code>pip install .</code> builds it into the package; it needs npm).
Socket.IO clients can connect at this address.</p>"""


StatusAccess = Callable[[str | None], Awaitable[bool]]
"""Whether a request's `Authorization` header (None: it sent none) may read /metrics and
/readyz's details ([auth] protect_status)."""

NO_STATUS = b"""/metrics needs an operator's token: Authorization: Bearer <token>
([auth] protect_status)
"""


INLINE_SCRIPT = re.compile(rb"<script\b(?![^>]*\bsrc\s*=)[^>]*>(.*?)</script>", re.S | re.I)
EVENT_HANDLER = re.compile(rb"""\son[a-z]+\s*=\s*"([^"]*)\"""", re.I)


def page_policy(html: bytes) -> bytes:
    """The Content-Security-Policy of an HTML page: scripts from the feed itself, plus the
    page's own inline scripts and event handlers by hash (the dashboard has an import map, a
    fallback script and an `onerror`). A script injected into the page, by a row value that
    slipped past the dashboard's escaping, does not run, and cannot read the token it keeps."""

    def digest(source: bytes) -> bytes:
        return b"'sha256-" + base64.b64encode(hashlib.sha256(source).digest()) + b"'"

    sources = [b"'self'", *(digest(s) for s in INLINE_SCRIPT.findall(html))]
    handlers = [digest(h) for h in EVENT_HANDLER.findall(html)]
    if handlers:
        sources += [b"'unsafe-hashes'", *handlers]
    return b"script-src " + b" ".join(sources) + b"; base-uri 'self'; form-action 'self'"


class HttpApp:
    def __init__(
        self,
        hub: Hub,
        dashboard: bool = True,
        dashboard_dir: Path = DASHBOARD_DIR,
        status_access: StatusAccess | None = None,
    ):
        self.hub = hub
        self.dashboard = dashboard
        self.dashboard_dir = dashboard_dir.resolve()
        self.status_access = status_access

    async def _may_read_status(self, scope: Scope) -> bool:
        if self.status_access is None:
            return True
        header = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), None)
        return await self.status_access(None if header is None else header.decode("latin-1"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await refuse_websocket(scope, send)
            return
        if scope["type"] != "http":
            return
        path = scope.get("path", "/")
        if scope.get("method") not in ("GET", "HEAD"):
            await respond(send, 405, b"method not allowed\n", "text/plain")
        elif path == "/healthz":
            await respond_json(send, 200, {"status": "ok"})
        elif path == "/readyz":
            ready = self.hub.ready()
            if not await self._may_read_status(scope):
                # Probes read the status code; the details are for operators.
                await respond_json(send, 200 if ready else 503, {"ready": ready})
                return
            body = {
                "ready": ready,
                "connectors": {
                    c.name: {**c.status.to_json(), **self.hub._reader(c.name)}
                    for c in self.hub.connectors.values()
                },
            }
            if self.hub.engine is not None:
                body["cluster"] = self.hub.engine.describe()
            await respond_json(send, 200 if ready else 503, body)
        elif path == "/metrics":
            if not await self._may_read_status(scope):
                www = ((b"www-authenticate", b'Bearer realm="feed"'),)
                await respond(send, 401, NO_STATUS, "text/plain", headers=www)
                return
            text = self.hub.metrics.render().encode()
            await respond(send, 200, text, "text/plain; version=0.0.4; charset=utf-8")
        elif self.dashboard:
            await self.static(path, send)
        else:
            await respond(send, 404, b"not found\n", "text/plain")

    async def static(self, path: str, send: Send) -> None:
        relative = path.lstrip("/") or "index.html"
        try:
            file = (self.dashboard_dir / relative).resolve()
            found = file.is_relative_to(self.dashboard_dir) and file.is_file()
        except (OSError, ValueError):
            # A NUL byte (`/%00`: ValueError) or a name longer than the file system takes
            # (ENAMETOOLONG, which is_file does not swallow) made a 500 and a traceback at
            # ERROR, a few kilobytes of log per request at any client's will: not found.
            found = False
        if not found:
            if relative == "index.html":
                await respond(send, 200, NOT_BUILT, "text/html; charset=utf-8")
            else:
                await respond(send, 404, b"not found\n", "text/plain")
            return
        kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        if kind.startswith("text/") or kind.endswith("javascript"):
            kind += "; charset=utf-8"
        body = file.read_bytes()
        policy = ((b"content-security-policy", page_policy(body)),) if "html" in kind else ()
        await respond(send, 200, body, kind, cache="no-cache", headers=policy)


async def refuse_websocket(scope: Scope, send: Send) -> None:
    """A websocket request for a path that is not Socket.IO's (`ws://host:8000/`): 404.

    Returning without an answer made uvicorn log "ASGI callable returned without completing
    handshake" at ERROR and answer 500, for a client's wrong URL. Where the server cannot send
    an HTTP answer to a websocket request (the ASGI extension), the request is refused (403).
    """
    await deny_websocket(scope, send, 404, b"not found: Socket.IO clients connect at /socket.io/\n")


async def respond_json(send: Send, status: int, body: Any) -> None:
    await respond(send, status, json.dumps(body).encode(), "application/json")


async def respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: str,
    cache: str = "no-store",
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> None:
    await answer(send, status, body, content_type, cache=cache, extra=headers)
