"""What in a Postgres `dsn` can be known wrong before connecting, so it is a config error.

asyncpg reports these only when it connects: `feed check` then printed "cannot connect: invalid
DSN ... got ''" or "[Errno 2] No such file or directory" (naming neither key nor file), and
`feed serve` started and retried the connector forever. Only what asyncpg would certainly refuse
is caught here; anything else is still the server's to judge.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import parse_qsl

from feed.tls import POSTGRES, tls_files_problem

SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
CLIENT_FILES = ("sslcert", "sslkey", "sslcrl")
"""Read by asyncpg whenever TLS may be used (any mode but `disable`)."""
ROOT_CERT_MODES = ("require", "verify-ca", "verify-full")
"""Modes in which asyncpg reads a given `sslrootcert` (`prefer` and `allow` skip a missing one)."""
EXAMPLE = "postgresql://user:password@host:5432/db"
CHOICES = {
    "target_session_attrs": (
        ("any", "primary", "standby", "prefer-standby", "read-write", "read-only"),
        "PGTARGETSESSIONATTRS",
    ),
    "gsslib": (("gssapi", "sspi"), "PGGSSLIB"),
    "sslnegotiation": (("postgres", "direct"), "PGSSLNEGOTIATION"),
    "ssl_min_protocol_version": (("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"), None),
    "ssl_max_protocol_version": (("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"), None),
}
"""Parameters asyncpg reads with a fixed set of values: anything else failed at connect, in
asyncpg's words ("target_session_attrs is expected to be one of <built-in method values of
mappingproxy object at 0x...>, got 'bogus'")."""
LIBPQ_ONLY = (
    "connect_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "hostaddr",
    "fallback_application_name",
    "sslcompression",
    "sslsni",
    "sslcertmode",
    "requirepeer",
    "require_auth",
    "gssencmode",
    "gssdelegation",
    "channel_binding",
    "load_balance_hosts",
    "replication",
    "servicefile",
)
"""libpq's connection parameters that asyncpg does not read: it sends every parameter it does
not know to the server as a setting, which refused these ("unrecognized configuration parameter
"connect_timeout"") at every connect."""
TWICE = {
    "host": "host",
    "port": "host",
    "dbname": "database",
    "database": "database",
    "user": "user",
    "password": "password",
}
"""Query parameters asyncpg ignores when the URL gives the same part: `?dbname=app` after a
path connected to the path's database (or the user's, after a bare `/`), `?port=` after a host
to port 5432, in silence."""


def _twice(name: str, part: str, *, bare: bool) -> str:
    if part == "database" and bare:
        return (
            f"has ?{name}= after a bare / that asyncpg reads as an empty database name (so it "
            f"ignores ?{name}=): write the database in the path, postgresql://host:5432/db"
        )
    if part == "database":
        return (
            f"gives the database in its path and again as ?{name}=, which asyncpg ignores: keep one"
        )
    if part == "host":
        return (
            f"has a host before the ? and ?{name}=, which asyncpg then ignores (a host without a "
            "port is port 5432): write host:port in the URL, postgresql://host:5432/db"
        )
    return f"gives the {part} before the @ and again as ?{name}=, which asyncpg ignores: keep one"


def _in_url(part: str, hosts: str, slash: str, auth: str) -> bool:
    """Whether the URL before its query gives `part` (as asyncpg reads it: a host sets the port)."""
    user, _, password = auth.partition(":")
    return bool({"host": hosts, "database": slash, "user": user, "password": password}[part])


def dsn_problem(dsn: str) -> str | None:
    """Why asyncpg cannot use `dsn`, in words naming the fix; None when it may work.

    The value itself is not quoted back (it may hold a password), except the `$NAME` a user
    wrote for `${NAME}`.
    """
    scheme, sep, rest = dsn.partition("://")
    if not sep or scheme not in ("postgres", "postgresql"):
        if re.fullmatch(r"\$[A-Za-z_][A-Za-z0-9_]*", dsn):
            return f"is {dsn!r}: to read the environment variable write ${{{dsn[1:]}}}"
        what = f"a {scheme}:// URL" if sep else "not a URL"
        return f"must be a postgresql:// URL ({EXAMPLE}), and this is {what}"
    address, _, query = rest.partition("?")
    netloc, slash, _ = address.partition("/")
    auth, _, hosts = netloc.rpartition("@")
    for host in hosts.split(","):
        if not host and "," in hosts:  # asyncpg: "IndexError: string index out of range"
            return f"has an empty host in its list of hosts ({EXAMPLE})"
        port = host.rpartition("]")[2].partition(":")[2] if ":" in host else ""
        if port and not (port.isascii() and port.isdigit()):
            return f"has port {port!r}, which is not a number ({EXAMPLE})"
        if port and not 1 <= int(port) <= 65535:  # asyncpg: "OverflowError: connect(): ..."
            return f"has port {int(port)}, which is not 1 to 65535 ({EXAMPLE})"
    for field in query.split("&") if query else []:
        if "=" not in field:  # asyncpg: "bad query field: 'c'", at connect
            return f"has {field!r} in its query, which is not name=value"
    params = dict(parse_qsl(query))
    for name, part in TWICE.items():
        if name in params and _in_url(part, hosts, slash, auth):
            return _twice(name, part, bare=not address.partition("/")[2])
    for port in params.get("port", "").split(",") if "port" in params else []:
        if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            return f"has ?port={port}, which is not a port number, 1 to 65535 ({EXAMPLE})"
    for name in LIBPQ_ONLY:
        if name in params:
            instead = " (set the connector's connect_timeout)" if name == "connect_timeout" else ""
            return (
                f"?{name}= is libpq's, which asyncpg does not read: it would reach the server "
                f"as a setting it refuses; remove it{instead}"
            )
    for name, (choices, variable) in CHOICES.items():
        value = params.get(name, os.environ.get(variable, choices[0]) if variable else None)
        if value is not None and value not in choices:
            source = name if name in params else variable
            return f"{source}={value} is not one of {', '.join(choices)}"
    mode = params.get("sslmode", os.environ.get("PGSSLMODE", "prefer"))
    if mode not in SSL_MODES:
        return f"sslmode={mode} is not one of {', '.join(SSL_MODES)}"
    negotiation = params.get("sslnegotiation", os.environ.get("PGSSLNEGOTIATION", "postgres"))
    if negotiation == "direct" and mode not in ROOT_CERT_MODES:
        return f"sslnegotiation=direct needs sslmode require, verify-ca or verify-full, not {mode}"
    needed = [] if mode == "disable" else list(CLIENT_FILES)
    if mode in ROOT_CERT_MODES:
        needed.append("sslrootcert")
    for name in needed:
        path = params.get(name)
        if path and not os.path.isfile(os.path.expanduser(path)):
            return f"{name}={path}: no such file; give the path of an existing file"
    problem = None if mode == "disable" else _tls_files_problem(params, mode)
    if problem is None and mode in ROOT_CERT_MODES[1:]:
        return _root_cert_problem(mode, params.get("sslrootcert"))
    return problem


def _tls_files_problem(params: dict[str, str], mode: str) -> str | None:
    """The files as asyncpg loads them: the certificate from ?sslcert= or PGSSLCERT (else
    ~/.postgresql/postgresql.crt), its key from ?sslkey=, PGSSLKEY or ~/.postgresql/postgresql.key
    (else the certificate's file), the CA when the mode checks the server."""
    home = _dot_postgresql()
    cert = params.get("sslcert") or os.environ.get("PGSSLCERT") or None
    key = params.get("sslkey") or os.environ.get("PGSSLKEY") or None
    if cert is None and home is not None and (home / "postgresql.crt").is_file():
        cert = str(home / "postgresql.crt")
    if key is None and cert and home is not None and (home / "postgresql.key").is_file():
        key = str(home / "postgresql.key")
    ca = params.get("sslrootcert") or os.environ.get("PGSSLROOTCERT") or None
    return tls_files_problem(
        POSTGRES,
        cert=cert,
        key=key,
        password=params.get("sslpassword") or None,
        ca=ca if mode in ROOT_CERT_MODES else None,
    )


def _dot_postgresql() -> Path | None:
    try:
        return Path.home() / ".postgresql"
    except (RuntimeError, KeyError):
        return None


def _root_cert_problem(mode: str, given: str | None) -> str | None:
    """asyncpg reads the CA from ?sslrootcert=, else PGSSLROOTCERT, else ~/.postgresql/root.crt;
    for verify-ca and verify-full a missing one failed at connect ("root certificate file ...
    does not exist", with a HINT on a second line)."""
    if given:
        return None
    variable = os.environ.get("PGSSLROOTCERT")
    if variable:
        if os.path.isfile(variable):
            return None
        return f"sslmode={mode} reads PGSSLROOTCERT={variable}: no such file"
    try:
        default = Path.home() / ".postgresql" / "root.crt"
    except (RuntimeError, KeyError):
        default = None
    if default is not None and default.is_file():
        return None
    return (
        f"sslmode={mode} checks the server's certificate, and no CA is given: add "
        f"sslrootcert=/path/to/ca.pem (asyncpg would read {default or '~/.postgresql/root.crt'})"
    )


def refused_setting(dsn: str, message: str) -> str | None:
    """The dsn's query parameter a connect was refused for, in words naming it, or None.

    asyncpg sends every parameter it does not read (`?foo=bar`, `?statement_timeout=abc`) to
    the server as a setting: the server's refusal named neither the dsn nor the fix.
    """
    named = re.search(r'parameter "([^"]+)"', message)
    if named is None:
        return None
    query = dsn.partition("?")[2]
    for name, _ in parse_qsl(query):
        if name.lower() == named.group(1).lower():
            return (
                f"dsn parameter ?{name}=: Postgres refuses it as a setting ({message}); asyncpg "
                "sends each parameter it does not read to the server: fix or remove it"
            )
    return None
