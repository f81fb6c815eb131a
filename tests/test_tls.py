"""TLS to the sources and to the cluster's Redis, against real servers that insist on it.

Managed Redis and Postgres speak TLS and often ask for a client certificate. Each path a user
configures is checked here against a server that refuses what it should: a Redis that listens
for TLS only (with and without `tls-auth-clients`), a Postgres whose pg_hba.conf takes TLS
connections with a client certificate for the user (`clientcert=verify-full`) and rejects
everything else. Certificates are made by `openssl` once per session (tests/support/tls.py).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest
from redis.asyncio import Redis

from connectors.redis import RedisConnector
from feed.app.config import parse_config
from feed.core.change import Change
from feed.engine.resp import Caller
from feed.errors import ConfigError, FeedError
from feed.options import Options
from tests.postgres_helpers import make_connector, streaming
from tests.support import tls as tls_support
from tests.support.cluster import cluster_config, memory, reader_and_other, subscribed
from tests.support.postgres import (
    EmbeddedPostgres,
    PgDatabase,
    PgServer,
    _install,
    create_database,
    drop_database,
    start_embedded,
)
from tests.support.redis import unique_prefix
from tests.support.server import feed_client, running_feed
from tests.support.tls import Certs, TlsRedis
from tests.support.waiting import wait_until

certs = tls_support.certs
tls_redis = tls_support.tls_redis
mtls_redis = tls_support.mtls_redis

pytestmark = [pytest.mark.timeout(60)]

ROOT = Path(__file__).parent.parent


# -- the cluster's own connections --------------------------------------------------------------


async def test_the_engines_own_connection_presents_the_client_certificate(
    mtls_redis: TlsRedis,
) -> None:
    """The engine's pub/sub and script connection (feed.engine.resp) read the same `rediss://`
    query as redis-py's pools: a Redis that asks for a client certificate answers it."""
    caller = await Caller.open(mtls_redis.url(), answer=5)
    try:
        assert await caller.call(["PING"]) == b"PONG"
    finally:
        caller.close()


async def test_the_engines_own_connection_refuses_a_server_its_ca_did_not_sign(
    certs: Certs, tls_redis: TlsRedis
) -> None:
    url = f"rediss://127.0.0.1:{tls_redis.port}/0?{certs.redis_query(client=False, ca=certs.other_ca)}"
    with pytest.raises(OSError, match="certificate verify failed"):
        await Caller.open(url, answer=5)


@pytest.mark.redis
async def test_cluster_nodes_deliver_and_replay_over_mutual_tls(mtls_redis: TlsRedis) -> None:
    """Leases, the publishing script, pub/sub and history reads, all over mutual TLS."""
    config = cluster_config(mtls_redis.url(), unique_prefix())
    async with AsyncExitStack() as stack:
        reader, other = await reader_and_other(stack, config)
        async with feed_client(other.url) as live:
            ack = await subscribed(live, "mem:public.orders")
            for i in range(1, 4):
                memory(reader).write("public.orders", "insert", {"id": i})
            got = await live.take(3)
            assert [c["seq"] for c in got] == [1, 2, 3]
        async with feed_client(other.url) as late:
            resumed = await subscribed(late, "mem:public.orders", since=1, epoch=ack["epoch"])
            assert resumed["recovered"] is True
            assert [c["seq"] for c in await late.take(2)] == [2, 3]
        assert reader.engine.describe()["redis"] == "up"
        assert other.engine.describe()["redis"] == "up"


@pytest.mark.redis
async def test_cluster_nodes_deliver_over_tls_checking_the_server_only(
    tls_redis: TlsRedis,
) -> None:
    config = cluster_config(tls_redis.url(), unique_prefix())
    async with AsyncExitStack() as stack:
        reader, other = await reader_and_other(stack, config)
        async with feed_client(other.url) as live:
            await subscribed(live, "mem:public.orders")
            memory(reader).write("public.orders", "insert", {"id": 1})
            assert (await live.next_change())["key"] == 1


@pytest.mark.redis
async def test_a_node_without_the_client_certificate_says_what_to_give(
    mtls_redis: TlsRedis,
) -> None:
    config = cluster_config(mtls_redis.url(client=False), unique_prefix())
    async with running_feed(config) as node:

        def explained() -> bool:
            return "client certificate" in str(node.engine.describe()["detail"])

        await wait_until(explained, 15, "the node's cluster status to name the certificate")
        described = node.engine.describe()
    assert described["redis"] == "down"
    assert "ssl_certfile=" in described["detail"] and "ssl_keyfile=" in described["detail"]


# -- the Redis connector ------------------------------------------------------------------------


def redis_connector(url: str, prefix: str, **extra: Any) -> RedisConnector:
    table: dict[str, Any] = {
        "url": url,
        "patterns": [prefix + "*"],
        "configure": True,  # a server of the session's own
        "health_check_interval": 0.5,
        **extra,
    }
    return RedisConnector("cache", Options(table, "connectors[0]"))


@pytest.fixture
async def mtls_admin(mtls_redis: TlsRedis) -> AsyncIterator[Redis]:
    admin = Redis.from_url(mtls_redis.url())
    try:
        yield admin
    finally:
        await admin.aclose()


@pytest.mark.redis
@pytest.mark.parametrize("mutual", [True, False], ids=["client-certificate", "server-only"])
async def test_keyspace_mode_reads_over_tls(
    mutual: bool, tls_redis: TlsRedis, mtls_redis: TlsRedis
) -> None:
    server = mtls_redis if mutual else tls_redis
    prefix = unique_prefix()
    admin = Redis.from_url(server.url())
    try:
        async with redis_connector(server.url(), prefix, fetch_values=True) as source:
            stream = aiter(source.changes())
            await admin.set(prefix + "a", "1")
            async with asyncio.timeout(10):
                change = await anext(stream)
        assert isinstance(change, Change)
        assert (change.op, change.key) == ("set", prefix + "a")
        assert change.after is not None and change.after["value"] == "1"
    finally:
        await admin.aclose()


@pytest.mark.redis
async def test_streams_mode_reads_over_mutual_tls(mtls_redis: TlsRedis, mtls_admin: Redis) -> None:
    prefix = unique_prefix()
    table = {"mode": "streams", "patterns": [prefix + "orders"], "offsets_key": prefix + "offsets"}
    connector = redis_connector(mtls_redis.url(), prefix, **table)
    async with connector as source:
        stream = aiter(source.changes())
        await mtls_admin.xadd(prefix + "orders", {"id": "7"})
        async with asyncio.timeout(10):
            change = await anext(stream)
    assert isinstance(change, Change)
    assert change.target == prefix + "orders" and change.after is not None
    assert change.after["id"] == "7"


@pytest.mark.redis
async def test_a_missing_client_certificate_is_named(mtls_redis: TlsRedis) -> None:
    connector = redis_connector(mtls_redis.url(client=False), unique_prefix())
    with pytest.raises(FeedError) as info:
        await asyncio.wait_for(connector.check(), 15)
    assert "asks for a client certificate" in str(info.value)
    assert "ssl_certfile" in str(info.value)


# -- Postgres -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tls_postgres(certs: Certs) -> Iterator[EmbeddedPostgres]:
    """Postgres that takes TLS connections with a client certificate only (pg_hba.conf)."""
    binaries = tls_support.tls_postgres_bin()
    tls_support.server_key_for(_install().user, certs)
    settings = tls_support.pg_tls_settings(certs, tls_support.pg_tls_hba(certs))
    server = start_embedded(binaries, **settings)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def tls_pg(certs: Certs, tls_postgres: EmbeddedPostgres) -> AsyncIterator[PgDatabase]:
    server = PgServer(f"{tls_postgres.url()}?{certs.pg_query()}", tls_postgres)
    db = await create_database(server)
    try:
        yield db
    finally:
        await drop_database(db)


SSL_SESSIONS = """
SELECT a.application_name, s.ssl, s.client_dn FROM pg_stat_activity a
JOIN pg_stat_ssl s USING (pid) WHERE a.application_name LIKE 'feed:%'
"""


@pytest.mark.postgres
@pytest.mark.parametrize("mode", ["notify", "logical"])
async def test_postgres_reads_over_tls_with_a_client_certificate(
    mode: str, tls_pg: PgDatabase
) -> None:
    db = tls_pg
    await db.conn.execute("CREATE TABLE public.orders (id int PRIMARY KEY, status text)")
    async with streaming(make_connector(db.url, ["public.orders"], mode=mode)) as stream:
        await db.conn.execute("INSERT INTO orders VALUES (1, 'new')")
        [change] = await stream.take(1)
        sessions = await db.conn.fetch(SSL_SESSIONS)
    assert (change.op, change.key) == ("insert", 1)
    # Every connection the connector holds (its reader's among them) is TLS with the certificate.
    assert sessions
    assert {(row["ssl"], row["client_dn"]) for row in sessions} == {(True, "/CN=postgres")}


@pytest.mark.postgres
async def test_postgres_without_the_client_certificate_is_refused_in_words(
    certs: Certs, tls_postgres: EmbeddedPostgres
) -> None:
    connector = make_connector(
        f"{tls_postgres.url()}?{certs.pg_query(client=False)}", ["public.orders"]
    )
    with pytest.raises(FeedError) as info:
        await asyncio.wait_for(connector.check(), 15)
    assert "requires a valid client certificate" in str(info.value)
    assert "sslcert" in str(info.value)


# -- configuration mistakes: one line at start, naming the parameter ------------------------------


def config_with(where: str, query: str) -> str:
    if where == "redis":
        return (
            "[[connectors]]\nname = 'r'\ntype = 'redis'\n"
            f"url = 'rediss://127.0.0.1:6390/0?{query}'\npatterns = ['x:*']\n"
        )
    if where == "cluster":
        return (
            f"[cluster]\nurl = 'rediss://127.0.0.1:6390/0?{query}'\n"
            "[[connectors]]\nname = 'm'\ntype = 'memory'\ntargets = ['t']\n"
        )
    return (
        "[[connectors]]\nname = 'p'\ntype = 'postgres'\n"
        f"dsn = 'postgresql://u@127.0.0.1:5432/db?sslmode=verify-full&{query}'\n"
        "tables = ['public.t']\n"
    )


NAMES = {
    "redis": ("ssl_certfile", "ssl_keyfile", "ssl_ca_certs", "ssl_password"),
    "cluster": ("ssl_certfile", "ssl_keyfile", "ssl_ca_certs", "ssl_password"),
    "postgres": ("sslcert", "sslkey", "sslrootcert", "sslpassword"),
}
KEYS = {"redis": "connectors[0].url", "cluster": "cluster.url", "postgres": "connectors[0].dsn"}


@pytest.fixture(scope="module")
def bad_files(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("bad-tls")
    junk = directory / "junk.pem"
    junk.write_text("not a certificate\n")
    encrypted = directory / "encrypted.key"
    subprocess.run(
        ["openssl", "pkey", "-in", str(certs.client_key), "-out", str(encrypted),
         "-aes256", "-passout", "pass:hunter2"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return {"junk": junk, "encrypted": encrypted}


def tls_mistakes(certs: Certs, bad: dict[str, Path]) -> list[tuple[str, dict[str, Path], str]]:
    """(name, files by role, what the refusal says), roles: cert, key, ca."""
    good = {"cert": certs.client_cert, "key": certs.client_key, "ca": certs.ca}
    return [
        ("key-without-cert", {"key": certs.client_key, "ca": certs.ca}, "without {cert}"),
        ("cert-without-key", {"cert": certs.client_cert, "ca": certs.ca}, "holds no private key"),
        ("junk-cert", {**good, "cert": bad["junk"]}, "{cert}=" + str(bad["junk"]) + ": holds no"),
        ("junk-key", {**good, "key": bad["junk"]}, "{key}=" + str(bad["junk"]) + ": holds no"),
        ("key-of-another-cert", {**good, "key": certs.server_key}, "is not the key of"),
        ("junk-ca", {**good, "ca": bad["junk"]}, "{ca}=" + str(bad["junk"]) + ": holds no"),
        ("encrypted-key", {**good, "key": bad["encrypted"]}, "is encrypted: give its passphrase"),
    ]


@pytest.mark.parametrize("where", ["redis", "cluster", "postgres"])
def test_unusable_certificate_files_are_a_config_error_naming_them(
    where: str, certs: Certs, bad_files: dict[str, Path]
) -> None:
    """Each used to be found at connect, as "[SSL] PEM lib (_ssl.c:3926)", reported as an
    unreachable server and retried forever; an encrypted key without its passphrase made
    OpenSSL ask for one on the terminal."""
    cert, key, ca, password = NAMES[where]
    roles = {"cert": cert, "key": key, "ca": ca}
    for name, files, expected in tls_mistakes(certs, bad_files):
        query = "&".join(f"{roles[r]}={quote(str(p))}" for r, p in files.items())
        with pytest.raises(ConfigError) as info:
            parse_config(config_with(where, query), "feed.toml", {}).build_connectors()
        message = str(info.value)
        assert message.startswith(f"feed.toml: {KEYS[where]}: "), (name, message)
        assert expected.format(**roles) in message, (name, message)
        assert "\n" not in message and "PEM lib" not in message, (name, message)
    # The passphrase given: accepted.
    query = (
        f"{cert}={quote(str(certs.client_cert))}&{key}={quote(str(bad_files['encrypted']))}"
        f"&{password}=hunter2&{ca}={quote(str(certs.ca))}"
    )
    parse_config(config_with(where, query), "feed.toml", {}).build_connectors()
    wrong = query.replace("hunter2", "hunter3")
    with pytest.raises(ConfigError, match=f"{password} does not decrypt"):
        parse_config(config_with(where, wrong), "feed.toml", {}).build_connectors()


# -- feed check -----------------------------------------------------------------------------------


def feed_check(config: Path) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "feed", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return done.returncode, done.stdout + done.stderr


def cluster_check_config(path: Path, url: str) -> Path:
    path.write_text(
        f"[cluster]\nurl = '{url}'\n[[connectors]]\nname = 'm'\ntype = 'memory'\ntargets = ['t']\n"
    )
    return path


@pytest.mark.redis
def test_feed_check_reaches_the_cluster_over_tls_and_says_what_is_missing(
    certs: Certs, mtls_redis: TlsRedis, tls_redis: TlsRedis, tmp_path: Path
) -> None:
    config = tmp_path / "feed.toml"
    code, out = feed_check(cluster_check_config(config, mtls_redis.url()))
    assert code == 0, out
    assert "[cluster]  redis   ok" in out
    # Without the client certificate: the engine's own connections would be refused too.
    no_client = mtls_redis.url(client=False) + "&ssl_password=hunter2"
    code, out = feed_check(cluster_check_config(config, no_client))
    assert code == 1
    assert "asks for a client certificate" in out and "ssl_certfile" in out
    assert "hunter2" not in out and "ssl_password=***" in out
    # A server its CA did not sign: refused, and the fix named (never a plaintext fallback).
    other = f"rediss://127.0.0.1:{tls_redis.port}/0?ssl_ca_certs={quote(str(certs.other_ca))}"
    code, out = feed_check(cluster_check_config(config, other))
    assert code == 1
    assert "certificate verify failed" in out and "ssl_ca_certs" in out
    # redis:// to a server that speaks only TLS.
    code, out = feed_check(cluster_check_config(config, f"redis://127.0.0.1:{tls_redis.port}/0"))
    assert code == 1
    assert "rediss://" in out.rpartition("[cluster]")[2]


async def test_asyncpg_reads_the_dsn_as_the_connector_does(
    certs: Certs, tls_postgres: EmbeddedPostgres
) -> None:
    """The test's own guard: the server refuses a connection without the client certificate, so
    the tests above prove the connector presented it."""
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        await asyncpg.connect(f"{tls_postgres.url()}?{certs.pg_query(client=False)}", timeout=10)
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption"):
        await asyncpg.connect(f"{tls_postgres.url()}?sslmode=disable", timeout=10)
