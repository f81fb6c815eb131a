"""The feed's web-facing edge against a real server and raw HTTP/websocket requests, as an
attacker's browser would send them: DNS rebinding (a hostile name for the loopback feed), odd
dashboard paths, response headers."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import socketio

from tests.auth_helpers import BASE, TOKENS, token_config
from tests.support.server import RunningFeed, feed_client, read_answer, running_feed

POLL = "/socket.io/?EIO=4&transport=polling"
WS = "/socket.io/?EIO=4&transport=websocket"


def port_of(feed: RunningFeed) -> int:
    return int(feed.url.rsplit(":", 1)[1])


async def raw(feed: RunningFeed, request: str) -> tuple[str, dict[str, str], bytes]:
    """Send one request as written; its status line, headers and (what came of) its body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(feed))
    try:
        writer.write(request.encode("latin-1"))
        await writer.drain()
        return await read_answer(reader)
    finally:
        writer.close()


def get(path: str, host: str, origin: str | None = None) -> str:
    extra = f"Origin: {origin}\r\n" if origin else ""
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n"


def upgrade(host: str, origin: str) -> str:
    return (
        f"GET {WS} HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    )


# -- DNS rebinding -------------------------------------------------------------------------------


async def test_a_rebound_name_cannot_reach_a_feed_without_auth() -> None:
    """A page on evil.example whose name now resolves to 127.0.0.1: its browser sends
    `Host: evil.example:<port>` and the same Origin, which Engine.IO's same-origin check took
    for the feed's own page. It got an anonymous session (every change of every database),
    /readyz and /metrics; now every one of those is refused, on both transports."""
    async with running_feed(BASE) as feed:
        evil = f"evil.example:{port_of(feed)}"
        origin = f"http://{evil}"
        status, _, body = await raw(feed, get(POLL, evil, origin))
        assert status.startswith("HTTP/1.1 400"), (status, body)
        assert b"allowed_hosts" in body
        status, _, _ = await raw(feed, get(POLL, evil))  # a same-origin GET has no Origin
        assert status.startswith("HTTP/1.1 400"), status
        for path in ("/readyz", "/metrics", "/"):
            status, _, _ = await raw(feed, get(path, evil))
            assert status.startswith("HTTP/1.1 400"), (path, status)
        status, _, _ = await raw(feed, upgrade(evil, origin))
        assert not status.startswith("HTTP/1.1 101"), status
        assert status.startswith("HTTP/1.1 403"), status
        assert 'kind="bad_host"' in feed.hub.metrics.render()

        # What the feed is really reached by still works: IP addresses, localhost, health checks.
        for host in (f"127.0.0.1:{port_of(feed)}", f"localhost:{port_of(feed)}", "[::1]:1"):
            status, _, body = await raw(feed, get(POLL, host))
            assert status.startswith("HTTP/1.1 200"), (host, status)
            assert json.loads(body[1:])["sid"]
        local = f"localhost:{port_of(feed)}"
        status, _, _ = await raw(feed, upgrade(local, f"http://{local}"))
        assert status.startswith("HTTP/1.1 101"), status
        status, _, _ = await raw(feed, get("/healthz", evil))
        assert status.startswith("HTTP/1.1 200"), status


@pytest.mark.parametrize(
    ("exposure", "level"),
    [
        ("", logging.INFO),
        ('host = "0.0.0.0"\n', logging.WARNING),  # with allow_unauthenticated (below)
    ],
    ids=["loopback", "allow_unauthenticated"],
)
async def test_an_upgraded_feed_reached_by_name_says_why_it_refuses(
    exposure: str, level: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A feed without auth reached as `feed.internal` (a balancer passing the browser's Host,
    or a service's URL) worked with the build before `allowed_hosts`; after the upgrade every
    request is refused. The log says so at start, before any client complains (a WARNING when
    the feed listens beyond this machine: it is reached by some name then), and the refusal's
    line names the setting to change; the client's answer says the same."""
    caplog.set_level(logging.INFO, "feed.security")
    config = BASE.replace("[server]\n", f"[server]\n{exposure}", 1)
    if exposure:
        config += "\n[auth]\nallow_unauthenticated = true\n"
    async with running_feed(config) as feed:
        started = [r for r in caplog.records if "allowed_hosts" in r.getMessage()]
        assert [r.levelno for r in started] == [level], caplog.text
        assert "DNS name" in started[0].getMessage()
        status, _, body = await raw(feed, get(POLL, "feed.internal"))
        assert status.startswith("HTTP/1.1 400"), status
        assert b"'feed.internal' is not allowed" in body and b"[server] allowed_hosts" in body
    refused = [r.getMessage() for r in caplog.records if "bad_host" in r.getMessage()]
    assert len(refused) == 1 and "'feed.internal'" in refused[0], caplog.text
    assert "[server] allowed_hosts" in refused[0]


async def test_a_feed_with_allowed_hosts_or_auth_says_nothing_of_the_default(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "feed.security")
    for config in (
        BASE.replace("[server]", '[server]\nallowed_hosts = ["feed.internal"]'),
        token_config(),
    ):
        async with running_feed(config):
            pass
    assert not [r for r in caplog.records if "DNS name" in r.getMessage()], caplog.text


async def test_allowed_hosts_lists_the_names_a_feed_is_reached_by() -> None:
    config = BASE.replace("[server]", '[server]\nallowed_hosts = ["feed.example", "*.corp.test"]')
    async with running_feed(config) as feed:
        for host in ("feed.example", "FEED.example:8000", "a.corp.test"):
            status, _, _ = await raw(feed, get("/readyz", host))
            assert status.startswith("HTTP/1.1 200"), (host, status)
        for host in ("evil.example", "feed.example.evil.example", "corp.test.evil"):
            status, _, _ = await raw(feed, get("/readyz", host))
            assert status.startswith("HTTP/1.1 400"), (host, status)


async def test_with_auth_any_name_is_accepted_by_default() -> None:
    """A token protects the feed then, and the names it is reached by are the operator's."""
    async with running_feed(token_config()) as feed:
        status, _, _ = await raw(feed, get("/readyz", "feed.example.com"))
        assert status.startswith("HTTP/1.1 200"), status
        assert TOKENS  # the config has tokens: auth is on


def test_allowed_hosts_must_be_a_list_of_names() -> None:
    from feed.app.config import parse_config
    from feed.errors import ConfigError

    with pytest.raises(ConfigError, match="allowed_hosts"):
        parse_config(BASE.replace("[server]", '[server]\nallowed_hosts = "x"'), "t.toml", {})


class Collect(logging.Handler):
    """uvicorn's loggers do not propagate to the root, so caplog never sees their lines."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.lines.append(record.getMessage())


async def test_refused_websocket_requests_write_no_error_line() -> None:
    """A websocket for another path (404) or a host not allowed (403) is answered, yet
    uvicorn's default websocket protocol logged "ASGI callable returned without completing
    handshake" at ERROR for each: a line in the log per request, at any client's will."""
    collect = Collect()
    uvicorn_log = logging.getLogger("uvicorn.error")
    try:
        async with running_feed(BASE) as feed:
            uvicorn_log.addHandler(collect)  # after uvicorn has set its logging up
            here = f"127.0.0.1:{port_of(feed)}"
            status, _, body = await raw(feed, upgrade(here, f"http://{here}").replace(WS, "/", 1))
            assert b"/socket.io/" in body
            assert status.startswith("HTTP/1.1 404"), status
            status, _, _ = await raw(feed, upgrade("evil.example", "http://evil.example"))
            assert status.startswith("HTTP/1.1 403"), status
            status, _, _ = await raw(feed, upgrade(here, f"http://{here}"))
            assert status.startswith("HTTP/1.1 101"), status
    finally:
        uvicorn_log.removeHandler(collect)
    assert not collect.lines, collect.lines


# -- the dashboard's files and headers -----------------------------------------------------------


async def test_odd_dashboard_paths_are_404_without_a_traceback() -> None:
    """`/%00` (a NUL byte in a path) and a name longer than the file system takes made a 500
    and a traceback at ERROR with the whole path in it; traversal stays refused."""
    collect = Collect()
    uvicorn_log = logging.getLogger("uvicorn.error")
    try:
        async with running_feed(BASE) as feed:
            uvicorn_log.addHandler(collect)
            here = f"127.0.0.1:{port_of(feed)}"
            for path in (
                "/%00",
                "/index.html%00.js",
                "/" + "a" * 5000,
                "/" + "a/" * 3000,
                "/..%2f..%2f..%2fetc%2fpasswd",
                "/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
                "/../../../etc/passwd",
                "//etc/passwd",
            ):
                status, _, body = await raw(feed, get(path, here))
                assert status.startswith("HTTP/1.1 404"), (path[:40], status)
                assert b"root:" not in body
    finally:
        uvicorn_log.removeHandler(collect)
    assert not collect.lines, collect.lines[:1]


async def test_the_http_side_sends_hardening_headers_and_no_banner() -> None:
    async with running_feed(BASE) as feed:
        here = f"127.0.0.1:{port_of(feed)}"
        for path in ("/", "/readyz", "/metrics", "/healthz", "/nope.js"):
            _, headers, _ = await raw(feed, get(path, here))
            assert headers["x-content-type-options"] == "nosniff", path
            assert headers["x-frame-options"] == "DENY", path
            assert "frame-ancestors 'none'" in headers["content-security-policy"], path
            assert headers["referrer-policy"] == "no-referrer", path
            assert "server" not in headers, (path, headers.get("server"))
            assert "access-control-allow-origin" not in headers, path


# -- tokens in the URL ---------------------------------------------------------------------------


async def test_a_token_put_in_the_url_is_not_logged_and_the_refusal_says_where_it_goes() -> None:
    """`io(url, {query: {token}})`, as clients of other servers do: the feed does not read it
    (the connection is refused auth_required) but uvicorn logged it with every request line."""
    secret = "feed_SECRET_in_the_url_0123456789"
    lines = Lines()
    async with running_feed(token_config()) as feed:
        levels = {}
        for name in ("uvicorn.access", "uvicorn.error"):
            levels[name] = logging.getLogger(name).level
            logging.getLogger(name).setLevel(logging.INFO)  # `feed serve`'s level
            logging.getLogger(name).addHandler(lines)
        try:
            for transport in ("polling", "websocket"):
                client = socketio.AsyncClient(reconnection=False)
                reasons: asyncio.Queue[Any] = asyncio.Queue()
                client.on("connect_error", reasons.put_nowait)
                with contextlib.suppress(socketio.exceptions.ConnectionError):
                    await client.connect(
                        f"{feed.url}?token={secret}&access_token={secret}",
                        transports=[transport],
                        wait_timeout=10,
                    )
                reason = await asyncio.wait_for(reasons.get(), 10)
                await client.disconnect()
                assert reason["data"]["code"] == "auth_required"
                assert "auth payload" in reason["message"] and secret not in reason["message"]
        finally:
            for name, level in levels.items():
                logging.getLogger(name).removeHandler(lines)
                logging.getLogger(name).setLevel(level)
    logged = "\n".join(lines.lines)
    assert "token=***" in logged, logged[:300]
    assert secret not in logged


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


# -- what error messages tell a tenant -----------------------------------------------------------


async def test_an_unknown_room_is_explained_with_only_the_targets_the_identity_may_see() -> None:
    """The catalog hides public.audit from tenants, but `unknown_target` listed every target
    of the connector, so a typo told a tenant the names of tables it may not follow."""
    async with running_feed(token_config()) as feed:
        async with feed_client(feed.url, auth={"token": TOKENS["acme-svc"]}) as tenant:
            ack = await tenant.subscribe("mem:public.nope")
            assert ack["error"]["code"] == "unknown_target"
            assert "public.orders" in ack["error"]["message"]
            assert "public.audit" not in ack["error"]["message"], ack
            ack = await tenant.subscribe("nope:public.orders")
            assert ack["error"]["code"] == "unknown_connector"
            assert "(connectors: mem)" in ack["error"]["message"]
        async with feed_client(feed.url, auth={"token": TOKENS["ops"]}) as operator:
            ack = await operator.subscribe("mem:public.nope")
            assert "public.audit" in ack["error"]["message"]  # the admin may follow it


# -- settings that open the feed to other sites' pages -------------------------------------------


@pytest.mark.parametrize(
    ("setting", "warning"),
    [("cors_allowed_origins", "any web page"), ("allowed_hosts", "DNS rebinding")],
)
async def test_opening_a_feed_without_auth_to_any_page_is_said_at_start(
    setting: str, warning: str, caplog: pytest.LogCaptureFixture
) -> None:
    """`cors_allowed_origins = ["*"]` without auth let any page in the user's browser read
    every change of the loopback feed (a cross-site WebSocket), and nothing said so."""
    caplog.set_level(logging.WARNING, "feed.security")
    async with running_feed(BASE.replace("[server]", f'[server]\n{setting} = ["*"]')) as feed:
        here = f"127.0.0.1:{port_of(feed)}"
        if setting == "cors_allowed_origins":
            status, _, _ = await raw(feed, upgrade(here, "http://evil.example"))
        else:
            status, _, _ = await raw(feed, upgrade("evil.example", "http://evil.example"))
        assert status.startswith("HTTP/1.1 101"), status  # what the setting asks for
    assert any(warning in r.getMessage() for r in caplog.records), caplog.text


# -- /metrics and /readyz ------------------------------------------------------------------------


def bearing(path: str, token: str | None) -> str:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n"


async def test_protect_status_keeps_metrics_and_readiness_details_for_operators() -> None:
    """With auth on, /metrics and /readyz (connector names, status details naming hosts and
    databases, cluster nodes) were open to anyone who could reach the port, and the deploy
    files put that port on the Internet. `protect_status` keeps them for operators; probes
    still read /readyz's status code."""
    config = token_config().replace('mode = "token"', 'mode = "token"\nprotect_status = true')
    async with running_feed(config) as feed:
        for token in (None, TOKENS["acme-svc"], "not-a-token"):
            status, headers, body = await raw(feed, bearing("/metrics", token))
            assert status.startswith("HTTP/1.1 401"), (token, status)
            assert headers["www-authenticate"].startswith("Bearer")
            assert b"feed_" not in body
            status, _, body = await raw(feed, bearing("/readyz", token))
            assert status.startswith("HTTP/1.1 200"), status
            assert json.loads(body) == {"ready": True}
        status, _, body = await raw(feed, bearing("/metrics", TOKENS["ops"]))
        assert status.startswith("HTTP/1.1 200") and b"feed_connector_up" in body
        status, _, body = await raw(feed, bearing("/readyz", TOKENS["ops"]))
        assert json.loads(body)["connectors"]["mem"]["state"] == "up"
        status, _, _ = await raw(feed, bearing("/healthz", None))
        assert status.startswith("HTTP/1.1 200")
    async with running_feed(token_config()) as feed:  # the default: open, as documented
        status, _, body = await raw(feed, bearing("/metrics", None))
        assert status.startswith("HTTP/1.1 200") and b"feed_connector_up" in body


async def test_an_html_page_may_run_only_its_own_scripts(tmp_path: Path) -> None:
    """The dashboard keeps an operator's token in the tab: a page policy allows the feed's
    own script files and, by hash, the page's inline scripts and handlers, and nothing else
    (no 'unsafe-inline'). tests/test_dashboard_browser.py runs the real page under it."""
    page = (
        b'<!doctype html><script type="importmap">{"imports": {}}</script>'
        b'<script src="app.js" onerror="notLoaded()"></script><script>\nfunction notLoaded() {}\n'
        b"</script><p>hi</p>"
    )
    (tmp_path / "index.html").write_bytes(page)
    async with running_feed(BASE) as feed:
        http = feed.app.asgi.app.app.other_asgi_app  # HostCheck > InboundLimit > Socket.IO
        http.dashboard_dir = tmp_path
        here = f"127.0.0.1:{port_of(feed)}"
        status, _, body = await raw(feed, get("/", here))
        assert status.startswith("HTTP/1.1 200") and body == page
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(feed))
        writer.write(get("/", here).encode())
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        writer.close()
    policies = [
        line.split(":", 1)[1]
        for line in head.splitlines()
        if line.startswith("content-security-policy:")
    ]
    script = next(p for p in policies if "script-src" in p)
    for source in (b'{"imports": {}}', b"\nfunction notLoaded() {}\n", b"notLoaded()"):
        digest = base64.b64encode(hashlib.sha256(source).digest()).decode().lower()
        assert f"'sha256-{digest}'" in script, (source, script)
    assert "'unsafe-inline'" not in script and "'unsafe-eval'" not in script
    assert any("frame-ancestors 'none'" in p for p in policies)
