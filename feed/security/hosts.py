"""The `Host` a request names, checked against the names the feed is served under.

DNS rebinding: a page on `http://evil.example:8000` makes its name resolve to 127.0.0.1 once
loaded, and from then on the victim's browser treats the feed on the victim's own machine as the
page's origin. The page's requests carry `Host: evil.example:8000` and, where they carry one, the
same `Origin`, so Engine.IO's same-origin check (which rebuilds the feed's own origin from
`Host`) accepts them, and a feed without authentication, safe only because it "listens on
loopback", hands every change of every database to a page on the Internet.

A browser always sends the name from the page's address as `Host` and a page cannot change it,
so the name is what gives the page away. An IP address in `Host` cannot be rebound (there is no
name to resolve again), and neither can `localhost` (browsers resolve it to loopback
themselves), so those are always accepted; a DNS name must be listed in `[server]
allowed_hosts`. Without authentication only those are accepted by default; with it, any name
(a token is what protects the feed then, and the names it is reached by are the operator's).
`/healthz` answers whatever the name: it says nothing but "ok", and health checkers name the
host in many ways.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import logging
from collections.abc import Sequence
from typing import Any

from feed.security.answers import answer
from feed.security.guard import ClientErrors, deny_websocket

log = logging.getLogger("feed.security")

ANY = "*"
EXEMPT_PATHS = frozenset({"/healthz"})


def default_allowed_hosts(auth_enabled: bool) -> tuple[str, ...]:
    """Without authentication only IP addresses and localhost; with it, any name."""
    return () if not auth_enabled else (ANY,)


def host_name(header: str) -> str:
    """The name in a `Host` header, without its port and in lower case (`[::1]:80` -> `::1`)."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def cannot_be_rebound(name: str) -> bool:
    """An IP address, or localhost (and its subdomains, RFC 6761): names no page can rebind."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostCheck:
    """ASGI middleware: a request naming a host not allowed gets 400 (a websocket 403)."""

    def __init__(self, app: Any, allowed: Sequence[str], errors: ClientErrors) -> None:
        self.app = app
        self.patterns = tuple(p.lower() for p in allowed)
        self.any = ANY in self.patterns
        self.errors = errors

    def allows(self, name: str) -> bool:
        if self.any or cannot_be_rebound(name):
            return True
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.patterns)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.any or scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = None
        for key, value in scope.get("headers", ()):
            if key == b"host":
                host = value.decode("latin-1")
                break
        # No Host at all (HTTP/1.0 tools): not a browser, which always sends one.
        if host is None or scope.get("path") in EXEMPT_PATHS or self.allows(host_name(host)):
            await self.app(scope, receive, send)
            return
        name = host_name(host)[:100]
        self.errors.report(
            "bad_host",
            f"a request for host {name!r} refused: not in [server] allowed_hosts (list the"
            " name there if clients reach the feed by it)",
        )
        body = (
            f"host {name!r} is not allowed: reach the feed by IP address or localhost, or add "
            "the name to [server] allowed_hosts\n"
        ).encode()
        if scope["type"] == "websocket":
            await deny_websocket(scope, send, 403, body)
            return
        # The request is whole (uvicorn drains a body left unread): the connection may go on.
        await answer(send, 400, body)


def say_default_hosts(auth_enabled: bool, loopback: bool) -> None:
    """Without authentication and without `allowed_hosts`, say at start which names requests
    may use: a deployment reached by a DNS name (through a balancer that passes the browser's
    `Host`, or a service connecting to `http://feed.internal:8000`) worked before this default
    came in (2026-12-07), and after an upgrade its every request is refused. The first such
    refusal is logged too, but a feed that nobody reaches yet says nothing until then, and an
    operator reading the log of a node just upgraded should find the reason without a
    client's complaint. A WARNING when the feed listens beyond this machine
    (`allow_unauthenticated`): it is then certainly reached by some name; else INFO."""
    if auth_enabled:
        return
    (log.info if loopback else log.warning)(
        "authentication is off: requests must name this feed by IP address or localhost"
        " (Host); one naming a DNS name, through a balancer or a client's URL, is refused"
        " (400, a websocket 403) unless [server] allowed_hosts lists that name"
    )


def warn_open_to_pages(auth_enabled: bool, origins: Sequence[str], hosts: Sequence[str]) -> None:
    """Without authentication, what keeps other sites' pages out is the origin and host
    checks: a config that opens either says so loudly at start."""
    if auth_enabled:
        return
    if ANY in origins:
        log.warning(
            '[server] cors_allowed_origins = ["*"] with authentication off: any web page '
            "open in a browser that can reach this feed can subscribe and receive every "
            "change; list the pages' origins, or turn [auth] on"
        )
    if ANY in hosts:
        log.warning(
            '[server] allowed_hosts = ["*"] with authentication off: a web page can reach '
            "this feed through a name of its own (DNS rebinding) and receive every change; "
            "list the names the feed is reached by, or turn [auth] on"
        )
