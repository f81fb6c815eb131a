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


REDIS = TlsNames("ssl_certfile", "ssl_keyfile", "ssl_password", "ssl_ca_certs")
POSTGRES = TlsNames("sslcert", "sslkey", "sslpassword", "sslrootcert")


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
