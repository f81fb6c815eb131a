"""Is the address free to listen on? Asked before anything else starts, so a busy port is one line.

Without this, `feed serve` on a port in use connects to every source first, then uvicorn logs its
errno line, asyncio logs a never-retrieved future, and the process exits 3. Binding a throwaway
socket first (with SO_REUSEADDR, as uvicorn binds) answers the question in a millisecond. A port
taken between this check and uvicorn's bind still fails, as uvicorn reports it.
"""

from __future__ import annotations

import errno
import socket

from feed.errors import FeedError


class PortInUse(FeedError):
    """The host and port cannot be listened on; the message says which and what to do."""


def check_port_free(
    host: str,
    port: int,
    *,
    fix: str = "pass --port with a free port",
    host_fix: str = "pass --host with an address of this machine",
) -> None:
    """Raise PortInUse (one line, naming the address and the fix) when host:port cannot be bound.

    A port in use gets `fix`; a host that is not this machine's (an unknown name, another
    machine's address) gets `host_fix`: another port would not help there.
    """
    if port == 0:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise PortInUse(
            f"cannot listen on {host}:{port} (unknown host: {exc}); {host_fix}"
        ) from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            hint = host_fix if exc.errno == errno.EADDRNOTAVAIL else fix
            raise PortInUse(f"cannot listen on {host}:{port} ({exc.strerror}); {hint}") from None
