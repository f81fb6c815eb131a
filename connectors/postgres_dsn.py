"""What in a Postgres `dsn` can be known wrong before connecting, so it is a config error.

asyncpg reports these only when it connects: `feed check` then printed "cannot connect: invalid
DSN ... got ''" or "[Errno 2] No such file or directory" (naming neither key nor file), and
`feed serve` started and retried the connector forever. Only what asyncpg would certainly refuse
is caught here; anything else is still the server's to judge.
"""

from __future__ import annotations

import os
import re
from urllib.parse import parse_qs

SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
CLIENT_FILES = ("sslcert", "sslkey", "sslcrl")
"""Read by asyncpg whenever TLS may be used (any mode but `disable`)."""
ROOT_CERT_MODES = ("require", "verify-ca", "verify-full")
"""Modes in which asyncpg reads a given `sslrootcert` (`prefer` and `allow` skip a missing one)."""
EXAMPLE = "postgresql://user:password@host:5432/db"


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
    hosts = address.partition("/")[0].rpartition("@")[2]
    for host in hosts.split(","):
        if not host and "," in hosts:  # asyncpg: "IndexError: string index out of range"
            return f"has an empty host in its list of hosts ({EXAMPLE})"
        port = host.rpartition("]")[2].partition(":")[2] if ":" in host else ""
        if port and not (port.isascii() and port.isdigit()):
            return f"has port {port!r}, which is not a number ({EXAMPLE})"
        if port and not 1 <= int(port) <= 65535:  # asyncpg: "OverflowError: connect(): ..."
            return f"has port {int(port)}, which is not 1 to 65535 ({EXAMPLE})"
    params = {name: values[-1] for name, values in parse_qs(query).items()}
    mode = params.get("sslmode", os.environ.get("PGSSLMODE", "prefer"))
    if mode not in SSL_MODES:
        return f"sslmode={mode} is not one of {', '.join(SSL_MODES)}"
    needed = [] if mode == "disable" else list(CLIENT_FILES)
    if mode in ROOT_CERT_MODES:
        needed.append("sslrootcert")
    for name in needed:
        path = params.get(name)
        if path and not os.path.isfile(os.path.expanduser(path)):
            return f"{name}={path}: no such file; give the path of an existing file"
    return None
