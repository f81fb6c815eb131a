"""Authentication at connect: static tokens, JWTs (HS256, RS256/ES256 via JWKS), expiry, refresh."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import socketio
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from feed.app.config import parse_config
from feed.app.server import EXPIRY_GRACE, FeedApp
from feed.errors import ConfigError
from feed.security.auth import JWKS_TIMEOUT, MAX_JWKS_BYTES, hash_token
from tests.auth_helpers import (
    AUDIENCE,
    BASE,
    ISSUER,
    RULES,
    SECRET,
    TOKENS,
    jwt_config,
    make_jwt,
    raw_socketio,
    raw_subscribe,
    refusal,
    source,
    token_config,
    ws_url,
)
from tests.support.server import WAIT, RunningFeed, feed_client, running_feed
from tests.support.waiting import wait_until


@pytest.fixture
async def jwt_feed() -> AsyncIterator[RunningFeed]:
    async with running_feed(jwt_config()) as feed:
        yield feed


# -- static tokens -----------------------------------------------------------------------------


async def test_static_tokens() -> None:
    async with running_feed(token_config()) as feed:
        assert (await refusal(feed.url, None)) == {
            "message": 'send the auth payload {"token": "<your token>"} when connecting',
            "data": {"code": "auth_required"},
        }
        assert (await refusal(feed.url, {"token": "guess"}))["data"]["code"] == "invalid_token"
        assert (await refusal(feed.url, {"token": 42}))["data"]["code"] == "bad_auth"
        assert (await refusal(feed.url, "ops-token-0001"))["data"]["code"] == "bad_auth"
        assert (await refusal(feed.url, {"token": "x" * 17_000})) == {
            "message": "token is longer than 16384 characters",
            "data": {"code": "bad_auth"},
        }
        async with feed_client(feed.url, auth={"token": TOKENS["ops"]}) as ops:
            assert (await ops.subscribe("mem:public.audit"))["ok"]
        async with feed_client(feed.url, auth={"token": "Bearer " + TOKENS["ops"]}) as ops:
            assert (await ops.call("catalog"))["ok"]
        assert feed.hub.metrics.render().count("feed_auth_refused_total") >= 3


def test_config_stores_only_hashes_and_refuses_malformed_ones() -> None:
    text = token_config()
    assert TOKENS["ops"] not in text and hash_token(TOKENS["ops"]) in text
    bad = BASE + '[auth]\nmode = "token"\n[[auth.tokens]]\nname = "x"\nsha256 = "abc"\n'
    with pytest.raises(ConfigError, match=r"auth\.tokens\[0\]\.sha256: must be 64 hex digits"):
        parse_config(bad, "feed.toml", {})
    with pytest.raises(ConfigError, match=r'mode "token" needs at least one'):
        parse_config(BASE + '[auth]\nmode = "token"\n', "feed.toml", {})
    with pytest.raises(ConfigError, match=r"auth\.jwt\.algorithms: 'none' is not accepted"):
        parse_config(
            BASE + '[auth]\nmode = "jwt"\n[auth.jwt]\nalgorithms = ["none"]\n', "feed.toml", {}
        )
    mixed = (
        f'[auth]\nmode = "jwt"\n[auth.jwt]\nalgorithms = ["HS256", "RS256"]\nsecret = "{SECRET}"\n'
    )
    with pytest.raises(ConfigError, match="do not mix HS"):
        parse_config(BASE + mixed, "feed.toml", {})
    short = '[auth]\nmode = "jwt"\n[auth.jwt]\nalgorithms = ["HS256"]\nsecret = "short"\n'
    with pytest.raises(ConfigError, match="at least 32 characters"):
        parse_config(BASE + short, "feed.toml", {})
    rule = '[auth]\nmode = "token"\n[[auth.rules]]\nallow = ["*"]\nrow_filter = "tenant_id={t}"\n'
    with pytest.raises(ConfigError, match=r"auth\.rules\[0\]\.row_filter"):
        parse_config(BASE + rule, "feed.toml", {})
    typo = '[[auth.rules]]\nallow = ["*"]\nrow_filer = "a=eq.1"\n'
    with pytest.raises(ConfigError, match=r"auth\.rules\[0\]\.row_filer: is not a known setting"):
        parse_config(BASE + typo, "feed.toml", {})


def test_hash_token_cli() -> None:
    run = [sys.executable, "-m", "feed", "hash-token"]
    out = subprocess.run(run, input="ops-token-0001\n", capture_output=True, text=True, check=True)
    assert out.stdout.strip() == hash_token("ops-token-0001")
    generated = subprocess.run([*run, "--generate"], capture_output=True, text=True, check=True)
    token_line, hash_line = generated.stdout.splitlines()
    token = token_line.split()[1]
    assert len(token) > 40 and hash_line.split()[1] == hash_token(token)


def test_no_auth_only_on_localhost_unless_forced(caplog: pytest.LogCaptureFixture) -> None:
    public = BASE.replace("[server]", '[server]\nhost = "0.0.0.0"')
    with pytest.raises(
        ConfigError, match=r"refusing to serve without authentication on 0\.0\.0\.0"
    ):
        FeedApp(parse_config(public, "feed.toml", {}))
    FeedApp(parse_config(public, "feed.toml", {}), host="127.0.0.1")  # --host overrides
    forced = parse_config(public + "[auth]\nallow_unauthenticated = true\n", "feed.toml", {})
    FeedApp(forced)
    assert "AUTHENTICATION IS OFF" in caplog.text
    FeedApp(parse_config(public + token_config().removeprefix(BASE), "feed.toml", {}))


# -- JWT ---------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
async def test_valid_jwt_is_accepted_and_bad_ones_refused_with_reasons(
    jwt_feed: RunningFeed,
) -> None:
    url = jwt_feed.url
    async with feed_client(url, auth={"token": make_jwt()}) as client:
        assert (await client.subscribe("mem:public.orders"))["ok"]
    cases: list[tuple[str, str]] = [
        (make_jwt(ttl=-5), "token_expired"),
        (make_jwt(nbf=int(time.time()) + 60), "token_not_yet_valid"),
        (make_jwt(key="another-secret-of-at-least-32-chars!!"), "bad_signature"),
        (make_jwt(aud="someone-else"), "wrong_audience"),
        (make_jwt(aud=None), "invalid_token"),
        (make_jwt(iss="https://evil.test"), "wrong_issuer"),
        (make_jwt(exp=None), "invalid_token"),
        # PyJWT reads a numeric string as a time; the expiry timer would not, and never fire.
        (make_jwt(exp=str(int(time.time()) + 300)), "invalid_token"),
        (make_jwt(nbf=str(int(time.time()) - 5)), "invalid_token"),
        (make_jwt(sub=None), "invalid_token"),
        (unsigned(make_jwt()), "invalid_token"),
        (make_jwt(key=SECRET, algorithm="HS512"), "invalid_token"),
        ("not.a.jwt", "invalid_token"),
        (make_jwt()[:-4] + "AAAA", "bad_signature"),
    ]
    for token, code in cases:
        reason = await refusal(url, {"token": token})
        assert reason["data"]["code"] == code, (token, reason)
        assert reason["message"]


def unsigned(token: str) -> str:
    """The same claims with `alg: none` and no signature."""
    _, body, _ = token.split(".")
    header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    return f"{header}.{body}."


async def test_leeway_tolerates_clock_skew() -> None:
    async with running_feed(jwt_config(leeway=30)) as feed:
        async with feed_client(feed.url, auth={"token": make_jwt(ttl=-10)}) as client:
            assert (await client.call("catalog"))["ok"]
        assert (await refusal(feed.url, {"token": make_jwt(ttl=-40)}))["data"]["code"] == (
            "token_expired"
        )


async def test_expiry_ends_a_live_connection_in_bounded_time(jwt_feed: RunningFeed) -> None:
    db = source(jwt_feed)
    # Long enough that a busy CI host still connects before the token runs out; the bound is
    # measured from the token's own expiry, not from the connect.
    ttl = 3.0
    expires_at = time.time() + ttl
    async with feed_client(jwt_feed.url, auth={"token": make_jwt(ttl=ttl)}) as client:
        expired: asyncio.Queue[Any] = asyncio.Queue()
        gone = asyncio.Event()
        client.sio.on("auth_expired", expired.put_nowait)
        client.sio.on("disconnect", lambda *a: gone.set())
        assert (await client.subscribe("mem:public.orders"))["ok"]
        notice = await asyncio.wait_for(expired.get(), ttl + 5)
        assert time.time() >= expires_at - 0.05
        await asyncio.wait_for(gone.wait(), 5)
        assert notice["code"] == "token_expired"
        assert time.time() - expires_at < 2
        db.write("public.orders", "insert", {"id": 1, "tenant_id": "acme"})
        await asyncio.sleep(0)
    assert not jwt_feed.hub.clients and not jwt_feed.app.sessions


async def test_refresh_extends_the_connection_but_not_the_grants(jwt_feed: RunningFeed) -> None:
    db = source(jwt_feed)
    first_expiry = time.time() + 3.0
    async with feed_client(jwt_feed.url, auth={"token": make_jwt(ttl=3.0)}) as client:
        expired: asyncio.Queue[Any] = asyncio.Queue()
        client.sio.on("auth_expired", expired.put_nowait)
        assert (await client.subscribe("mem:public.orders"))["ok"]
        assert (await client.call("refresh"))["error"] == {
            "code": "bad_request",
            "message": 'refresh takes {"token": "<the new token>"}',
        }
        other_tenant = await client.call("refresh", {"token": make_jwt(tenant="globex")})
        assert other_tenant["error"]["code"] == "identity_changed"
        other_role = await client.call("refresh", {"token": make_jwt(roles=["tenant", "admin"])})
        assert other_role["error"]["code"] == "identity_changed"
        # Claims no rule reads may differ: identity providers put per-token values in some
        # (Azure AD's uti, aio and rh), and every refresh was refused identity_changed.
        per_token = make_jwt(ttl=3.0, uti="AbC123", aio="E2ZgYJjv", rh="0.AR8A")
        assert (await client.call("refresh", {"token": per_token}))["ok"]
        bad = await client.call("refresh", {"token": make_jwt(ttl=-5)})
        assert bad["error"]["code"] == "token_expired"
        ack = await client.call("refresh", {"token": make_jwt(ttl=60)})
        assert ack["ok"] and 50 < ack["expires_in"] <= 60
        # Past the first token's expiry, with the checker's time to act: nothing must happen.
        await asyncio.sleep(max(0.0, first_expiry - time.time()) + 1.0)
        assert expired.empty()
        db.write("public.orders", "insert", {"id": 1, "tenant_id": "acme"})
        assert (await client.next_change())["key"] == 1


async def test_static_tokens_also_work_in_jwt_mode(jwt_feed: RunningFeed) -> None:
    async with feed_client(jwt_feed.url, auth={"token": TOKENS["ops"]}) as ops:
        assert (await ops.subscribe("mem:public.audit"))["ok"]


# -- JWKS (RS256, ES256) -----------------------------------------------------------------------


def jwk_of(private: Any, kid: str, alg: str) -> dict[str, Any]:
    algorithm = jwt.algorithms.RSAAlgorithm if alg.startswith("RS") else jwt.algorithms.ECAlgorithm
    data: dict[str, Any] = json.loads(algorithm.to_jwk(private.public_key()))
    return {**data, "kid": kid, "alg": alg, "use": "sig"}


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ec": ec.generate_private_key(ec.SECP256R1()),
        "stranger": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }


def jwks_config(source_line: str) -> str:
    return (
        BASE
        + f"""
[auth]
mode = "jwt"
leeway = 5

[auth.jwt]
algorithms = ["RS256", "ES256"]
{source_line}
audience = "{AUDIENCE}"
issuer = "{ISSUER}"
"""
        + RULES
    )


@pytest.fixture
def jwks_document(keys: dict[str, Any]) -> dict[str, Any]:
    return {"keys": [jwk_of(keys["rsa"], "r1", "RS256"), jwk_of(keys["ec"], "e1", "ES256")]}


async def check_jwks_feed(feed: RunningFeed, keys: dict[str, Any]) -> None:
    def pem(private: Any) -> bytes:
        return bytes(
            private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    rs = make_jwt(key=keys["rsa"], algorithm="RS256", headers={"kid": "r1"})
    es = make_jwt(key=keys["ec"], algorithm="ES256", headers={"kid": "e1"})
    for token in (rs, es):
        async with feed_client(feed.url, auth={"token": token}) as client:
            assert (await client.subscribe("mem:public.orders"))["ok"]
    stranger = make_jwt(key=keys["stranger"], algorithm="RS256", headers={"kid": "r1"})
    assert (await refusal(feed.url, {"token": stranger}))["data"]["code"] == "bad_signature"
    unknown_kid = make_jwt(key=keys["rsa"], algorithm="RS256", headers={"kid": "zz"})
    assert (await refusal(feed.url, {"token": unknown_kid}))["data"]["code"] == "invalid_token"
    # RS256/HS256 confusion: an HMAC token keyed with the public key itself.
    confused = jwt.api_jws.PyJWS()
    # PyJWT refuses a PEM public key as an HMAC secret; this forger's copy is patched to allow it.
    confused._algorithms["HS256"].prepare_key = lambda key: key  # type: ignore[method-assign]
    body = json.loads(base64.urlsafe_b64decode(rs.split(".")[1] + "=="))
    forged = confused.encode(
        json.dumps(body).encode(), pem(keys["rsa"]), algorithm="HS256", headers={"kid": "r1"}
    )
    assert (await refusal(feed.url, {"token": forged}))["data"]["code"] == "invalid_token"
    wrong_alg_for_key = make_jwt(key=keys["rsa"], algorithm="RS256", headers={"kid": "e1"})
    assert (await refusal(feed.url, {"token": wrong_alg_for_key}))["data"]["code"] == (
        "invalid_token"
    )
    assert (await refusal(feed.url, {"token": unsigned(rs)}))["data"]["code"] == "invalid_token"


async def test_rs256_and_es256_from_a_jwks_file(
    tmp_path: Path, keys: dict[str, Any], jwks_document: dict[str, Any]
) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks_document))
    async with running_feed(jwks_config(f'jwks_file = "{path}"')) as feed:
        await check_jwks_feed(feed, keys)


@pytest.fixture
def fetches() -> list[str]:
    return []


@pytest.fixture
def jwks_url(jwks_document: dict[str, Any], fetches: list[str]) -> Iterator[str]:
    body = json.dumps(jwks_document).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            fetches.append(self.path)
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
    finally:
        server.shutdown()
        server.server_close()


async def test_rs256_and_es256_from_a_jwks_url(
    keys: dict[str, Any], jwks_url: str, fetches: list[str]
) -> None:
    async with running_feed(jwks_config(f'jwks_url = "{jwks_url}"')) as feed:
        await check_jwks_feed(feed, keys)
        for n in range(5):  # forged kids must not turn into requests to the identity provider
            token = make_jwt(key=keys["stranger"], algorithm="RS256", headers={"kid": f"x{n}"})
            assert (await refusal(feed.url, {"token": token}))["data"]["code"] == "invalid_token"
    assert fetches == ["/.well-known/jwks.json"]


async def test_unreachable_jwks_url_refuses_with_a_retryable_reason(keys: dict[str, Any]) -> None:
    async with running_feed(jwks_config('jwks_url = "http://127.0.0.1:9/jwks.json"')) as feed:
        token = make_jwt(key=keys["rsa"], algorithm="RS256", headers={"kid": "r1"})
        assert (await refusal(feed.url, {"token": token}))["data"]["code"] == "auth_unavailable"


async def test_a_client_that_ignores_expiry_loses_its_connection(jwt_feed: RunningFeed) -> None:
    """A hostile client that never leaves on `auth_expired` is dropped after a short grace."""
    expires_at = time.time() + 3.0
    ws, _ = await raw_socketio(jwt_feed, auth={"token": make_jwt(ttl=3.0)})
    assert (await raw_subscribe(ws, "mem:public.orders"))["ok"]
    frames: list[str] = []
    with pytest.raises(websockets.ConnectionClosed):
        async with asyncio.timeout(10):
            while True:
                frame = await ws.recv()
                frames.append(str(frame))
    assert any("auth_expired" in f for f in frames)
    assert time.time() - expires_at < EXPIRY_GRACE + 2
    assert not jwt_feed.hub.clients


async def test_events_named_connect_or_disconnect_end_the_connection(
    jwt_feed: RunningFeed, caplog: pytest.LogCaptureFixture
) -> None:
    """python-socketio ran its connect or disconnect handler for a client *event* of that name:
    a `disconnect` event dropped the session (its expiry timer and its connection count with
    it) and kept the connection open past the token's expiry; a `connect` event swapped in
    another identity without the refresh checks, or logged a traceback at ERROR."""
    caplog.set_level(logging.INFO)
    events: list[list[Any]] = [
        ["disconnect"],
        ["connect", {}, {"token": make_jwt(sub="mallory")}],
        ["connect", {}],
    ]
    for event in events:
        ws, _ = await raw_socketio(jwt_feed, auth={"token": make_jwt(ttl=60)})
        assert (await raw_subscribe(ws, "mem:public.orders"))["ok"]
        await ws.send("421" + json.dumps(event))
        with pytest.raises(websockets.ConnectionClosed):
            async with asyncio.timeout(5):
                while True:
                    await ws.recv()
        await wait_until(lambda: not jwt_feed.app.sessions, 5, "the session ended")
        assert not jwt_feed.app.connections.counts, event
    metrics = jwt_feed.hub.metrics.render()
    assert 'feed_client_errors_total{kind="bad_packet"} 3' in metrics, metrics
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def test_request_lines_in_the_log_do_not_carry_session_ids(jwt_feed: RunningFeed) -> None:
    """uvicorn logs every request line at INFO, and a long-polling client's name its Engine.IO
    session: whoever read the log could poll that session (its changes) or post in its name."""
    lines = Lines()
    loggers = [logging.getLogger(name) for name in ("uvicorn.access", "uvicorn.error")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(lines)
        logger.setLevel(logging.INFO)
    token = make_jwt()
    client = socketio.AsyncClient(reconnection=False)
    try:
        await client.connect(jwt_feed.url, auth={"token": token}, transports=["polling"])
        sid = client.eio.sid
        assert (await client.call("subscribe", {"room": "mem:public.orders"}, timeout=10))["ok"]
        await client.disconnect()
        async with websockets.connect(ws_url(jwt_feed) + f"&sid={sid}") as ws:
            await ws.recv()  # refused (the session is gone), and its path logged all the same
        raise AssertionError("a websocket for a closed session was accepted")
    except websockets.InvalidStatus as refused:
        assert refused.response.status_code == 403
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(lines)
            logger.setLevel(level)
    assert sum("sid=***" in line for line in lines.lines) >= 3, lines.lines
    assert not [line for line in lines.lines if sid in line or token in line]


@contextlib.contextmanager
def serving(answer: Callable[[BaseHTTPRequestHandler], None]) -> Iterator[tuple[str, list[str]]]:
    """An HTTP server answering every GET with `answer`; its URL and the paths asked for."""
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            answer(self)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json", asked
    finally:
        server.shutdown()
        server.server_close()


async def test_a_hanging_jwks_url_is_asked_once_for_all_the_clients_waiting(
    keys: dict[str, Any],
) -> None:
    """Clients queue behind a JWKS fetch; each fetched again when its turn came, so behind a
    provider that does not answer the fifth client waited 25 s (past its own timeout and the
    handshake timeout) and the provider was asked once per client."""
    release = threading.Event()

    def hang(handler: BaseHTTPRequestHandler) -> None:
        release.wait(30)

    with serving(hang) as (url, asked):
        try:
            async with running_feed(jwks_config(f'jwks_url = "{url}"')) as feed:
                token = make_jwt(key=keys["rsa"], algorithm="RS256", headers={"kid": "r1"})
                started = time.monotonic()
                reasons = await asyncio.gather(
                    *(refusal(feed.url, {"token": token}) for _ in range(4))
                )
                assert {r["data"]["code"] for r in reasons} == {"auth_unavailable"}
                assert time.monotonic() - started < JWKS_TIMEOUT + 3
                assert len(asked) == 1, asked
        finally:
            release.set()


async def test_a_failing_jwks_url_is_not_asked_once_per_client(keys: dict[str, Any]) -> None:
    def fail(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(500)
        handler.send_header("content-length", "0")
        handler.end_headers()

    with serving(fail) as (url, asked):
        async with running_feed(jwks_config(f'jwks_url = "{url}"')) as feed:
            token = make_jwt(key=keys["rsa"], algorithm="RS256", headers={"kid": "r1"})
            for _ in range(5):
                reason = await refusal(feed.url, {"token": token})
                assert reason["data"]["code"] == "auth_unavailable"
            assert len(asked) == 1, asked


async def test_an_oversized_jwks_document_is_not_read(
    keys: dict[str, Any], jwks_document: dict[str, Any]
) -> None:
    """PyJWKClient read any answer whole into memory (50 MB cost the feed 150 MB)."""
    body = json.dumps({**jwks_document, "padding": "x" * (2 * MAX_JWKS_BYTES)}).encode()

    def huge(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("content-type", "application/json")
        handler.send_header("content-length", str(len(body)))
        handler.end_headers()
        with contextlib.suppress(OSError):  # the feed stops reading
            handler.wfile.write(body)

    with serving(huge) as (url, _):
        async with running_feed(jwks_config(f'jwks_url = "{url}"')) as feed:
            token = make_jwt(key=keys["rsa"], algorithm="RS256", headers={"kid": "r1"})
            reason = await refusal(feed.url, {"token": token})
            assert reason["data"]["code"] == "auth_unavailable"


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://idp.example/jwks.json", "jwks.json"])
def test_a_jwks_url_must_be_http(url: str) -> None:
    with pytest.raises(ConfigError, match="jwks_url"):
        parse_config(jwks_config(f'jwks_url = "{url}"'), "t.toml", {})


async def test_a_session_closed_while_its_token_is_checked_holds_no_connection(
    keys: dict[str, Any],
) -> None:
    """A JWT connect waits for the JWKS fetch; a long-polling session closed meanwhile (here by
    a second POST while the connect's was under way) has its disconnect handled before the
    connect is. The connect, let through once the keys came, kept a session and counted the
    identity for a connection that no longer existed, until the token expired: at
    `connections_per_identity = 1` the identity was refused all that time."""
    release = threading.Event()
    document = json.dumps({"keys": [jwk_of(keys["rsa"], "r1", "RS256")]}).encode()

    def slow(handler: BaseHTTPRequestHandler) -> None:
        release.wait(30)
        handler.send_response(200)
        handler.send_header("content-type", "application/json")
        handler.send_header("content-length", str(len(document)))
        handler.end_headers()
        handler.wfile.write(document)

    token = make_jwt(key=keys["rsa"], algorithm="RS256", headers={"kid": "r1"})
    limits = "\n[limits]\nconnections_per_identity = 1\n"
    with serving(slow) as (url, asked):
        try:
            async with (
                running_feed(jwks_config(f'jwks_url = "{url}"') + limits) as feed,
                aiohttp.ClientSession() as http,
            ):
                polling = feed.url + "/socket.io/?EIO=4&transport=polling"
                async with http.get(polling) as opened:
                    sid = json.loads((await opened.text())[1:])["sid"]
                session = f"{polling}&sid={sid}"
                connect = asyncio.create_task(
                    http.post(session, data="40" + json.dumps({"token": token}))
                )
                await wait_until(lambda: len(asked) == 1, what="the JWKS asked for")
                async with http.post(session, data="1") as second:
                    assert second.status == 400
                await wait_until(lambda: not feed.app.sio.eio.sockets, what="the session gone")
                release.set()
                (await asyncio.wait_for(connect, WAIT)).release()
                assert feed.app.sessions == {}, feed.app.sessions
                # The same identity: its one connection is free.
                async with feed_client(feed.url, auth={"token": token}):
                    assert len(feed.app.sessions) == 1, feed.app.sessions
                await wait_until(
                    lambda: not feed.app.sessions and not feed.app.connections.counts,
                    what="no session nor count left",
                )
        finally:
            release.set()
