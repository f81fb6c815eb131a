"""The TLS files a source's URL names (client certificate, its key, the CA), loaded at start.

Each mistake in them used to surface only at connect, in OpenSSL's words ("[SSL] PEM lib
(_ssl.c:3926)", "Error 524297 connecting to host:6379"), reported as an unreachable server and
retried forever; an encrypted key without its passphrase made OpenSSL ask for one on the
terminal, holding up the process. Loading them here, as the drivers will, turns each into one
line naming the parameter and the file. Paths are shown; passphrases never.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass


@dataclass(frozen=True)
class TlsNames:
    """What a URL calls each file: `ssl_certfile` (redis-py), `sslcert` (asyncpg)..."""

    cert: str
    key: str
    password: str
    ca: str
    any_host: str
    """How to check the server's certificate without its name."""
    plain: str
    """What a server that takes only TLS says to a plain connection, and what to do."""


REDIS = TlsNames(
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_password",
    "ssl_ca_certs",
    any_host="ssl_check_hostname=false",
    plain="if the server takes only TLS, write rediss://",
)
POSTGRES = TlsNames(
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslrootcert",
    any_host="sslmode=verify-ca",
    plain=(
        "the server takes only TLS: set sslmode=verify-full and sslrootcert=/path/to/ca.pem "
        "(sslmode=prefer, the default, tries a plain connection when TLS fails)"
    ),
)
PLAIN_REFUSED = ("connection reset by peer", "connection closed by server", "no encryption")
"""A plain connection to a server that takes only TLS: Redis closes it at the first command,
Postgres's pg_hba.conf rejects it ("... no encryption")."""


def tls_hint(
    message: str, names: TlsNames, *, tls: bool, client: bool = False, fresh: bool = True
) -> str:
    """What to change, in parentheses to append, when a connect error is TLS's (or its
    absence's); "" when it is not. `tls`: whether the URL asked for TLS; `client`: whether it
    gives a client certificate; `fresh`: the connection never answered (a connection closed
    after it did is an outage, not a guess about TLS).

    Under TLS 1.3 a server that wants a client certificate refuses it after the handshake: the
    client may read its alert ("certificate required") or only the closed connection.
    """
    text = message.lower()
    give = f"give {names.cert}=/path/to/client.crt and {names.key}=/path/to/client.key"
    if any(s in text for s in ("certificate required", "requires a valid client certificate")):
        return f" (the server asks for a client certificate: {give})"
    closed = fresh and any(s in text for s in PLAIN_REFUSED[:2])
    if tls and not client and closed:
        return f" (if the server asks for a client certificate, {give})"
    if "certificate verify failed" in text and "mismatch" in text:
        return (
            " (the server's certificate does not name the host the URL gives: connect by a "
            f"name it holds, or set {names.any_host})"
        )
    if "certificate verify failed" in text:
        return f" (give the CA that signed the server's certificate as {names.ca}=/path/to/ca.pem)"
    if "no encryption" in text or (closed and not tls):
        return f" ({names.plain})"
    return ""


class _Encrypted(Exception):
    """OpenSSL asked for a passphrase that was not given."""


class _Unreadable(Exception):
    """A file the driver could not read; the message says which and why."""


def _read(name: str, path: str) -> str:
    if path.startswith("~"):
        raise _Unreadable(
            f"{name}={path}: the driver reads this path as written, with no ~ expanded: "
            "write the full path"
        )
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            return file.read()
    except OSError as exc:
        raise _Unreadable(f"{name}={path}: cannot read it ({exc.strerror or exc})") from None


def tls_files_problem(
    names: TlsNames,
    *,
    cert: str | None,
    key: str | None,
    password: str | None,
    ca: str | None,
) -> str | None:
    """Why the driver could not load these files, in words naming the parameter; None if it can.

    `cert`, `key` and `ca` are the paths the driver will read (after its own defaults), `key`
    None meaning the key is in `cert`'s file.
    """
    if key and not cert:
        return (
            f"{names.key}= without {names.cert}=: the driver uses a client key only with its "
            f"certificate; give the certificate as {names.cert}=/path/to/client.crt"
        )
    try:
        problem = _client_problem(names, cert, key, password) if cert else None
        if problem is None and ca:
            _read(names.ca, ca)
            try:
                ssl.create_default_context().load_verify_locations(cafile=ca)
            except ssl.SSLError:
                return f"{names.ca}={ca}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
    except _Unreadable as exc:
        return str(exc)
    return problem


def _client_problem(
    names: TlsNames, cert: str, key: str | None, password: str | None
) -> str | None:
    cert_text = _read(names.cert, cert)
    if "-----BEGIN CERTIFICATE-----" not in cert_text:
        return f"{names.cert}={cert}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
    key_text = cert_text
    if key:
        key_text = _read(names.key, key)
        if "PRIVATE KEY-----" not in key_text:
            return f"{names.key}={key}: holds no PEM private key (-----BEGIN PRIVATE KEY-----)"
    elif "PRIVATE KEY-----" not in cert_text:
        return (
            f"{names.cert}={cert}: holds no private key: give the key as "
            f"{names.key}=/path/to/client.key"
        )
    key_name = f"{names.key}={key}" if key else f"the key in {names.cert}={cert}"

    def passphrase() -> str:
        if not password:
            raise _Encrypted
        return password

    try:
        ssl.create_default_context().load_cert_chain(cert, key, password=passphrase)
    except _Encrypted:
        return (
            f"{key_name} is encrypted: give its passphrase as {names.password}= "
            "(or decrypt the key with openssl pkey)"
        )
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            return f"{key_name} is not the key of {names.cert}={cert}"
        if password and "ENCRYPTED" in key_text:
            return f"{names.password} does not decrypt {key_name}"
        return f"{names.cert}={cert} with {key_name}: cannot load them ({exc.reason or exc})"
    return None
