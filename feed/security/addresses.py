"""The client address a connection is counted under, for `[limits] connections_per_address`.

Anonymous clients used to be bounded only by `max_connections`: one client held 17,000
connections that had made their Socket.IO connect and did nothing, and every other user got 503.
They are now counted per address. The address is the one uvicorn left in the ASGI scope: the
connection's own, or the one a trusted proxy wrote in `X-Forwarded-For` (uvicorn believes the
header only from `FORWARDED_ALLOW_IPS`, by default 127.0.0.1 and ::1).

A balancer whose address is not in `FORWARDED_ALLOW_IPS` makes every client look like the
balancer, and a cap on that address would refuse everyone past it. A connection that carries an
`X-Forwarded-For` which was not believed, from a loopback or private address (where balancers
live), is therefore not counted, and the log says once per such peer what to set. A client on the
public internet sending its own header is counted as itself: no header gets it out of the cap.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("feed.addresses")

CLIENT_HOST = "feed.client_host"
"""The environ key the client's host is kept under once the rest of a session's request environ
is let go (feed.delivery.eio_websocket.client_environ)."""

IPV6_PREFIX = 64
"""IPv6 addresses are counted by their /64: a provider gives one host (a home, a VM) a whole
/64, and a client could take a fresh address from it for every connection."""

NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
"""The NAT64 well-known prefix (RFC 6052): behind a stateless NAT64 (an IPv6-only feed reached
by IPv4 clients) each IPv4 client is this prefix and its address, and is counted by that."""

WARNED_MAX = 1000
"""Peers remembered as having been warned about (bounded: the peers are untrusted input)."""


@dataclass(frozen=True)
class ClientAddress:
    key: str | None
    """What the connection is counted under; None when it is not counted."""
    balancer: str | None = None
    """The peer, when it looks like a balancer not in FORWARDED_ALLOW_IPS."""


def address_key(host: str) -> str:
    """One key per client: an IPv4 address, an IPv6 /64, or the text itself if it is neither
    (uvicorn takes what a trusted proxy says, an IP address or not)."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host[:100]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        if address in NAT64:
            return str(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        return str(ipaddress.IPv6Network(f"{address}/{IPV6_PREFIX}", strict=False))
    return str(address)


def _forwarded_hosts(environ: dict[str, Any]) -> list[str] | None:
    """The hosts named in the request's X-Forwarded-For headers (None: it has none), without
    the ports or brackets a proxy may add, as uvicorn reads them."""
    value = environ.get("HTTP_X_FORWARDED_FOR")
    if not isinstance(value, str):
        return None
    hosts = []
    for item in value.split(","):
        item = item.strip()
        if item.startswith("[") and "]" in item:
            item = item[1 : item.index("]")]
        elif item.count(":") == 1:
            item = item.rsplit(":", 1)[0]
        hosts.append(item)
    return hosts


def forwarded_mark(host: str, environ: dict[str, Any]) -> str:
    """What of a request's X-Forwarded-For its session keeps for a connect again on it: the
    host itself when it is one of the header's entries, else nothing. That is all
    `client_address` reads of the header, which a client may make kilobytes long."""
    return host if host in (_forwarded_hosts(environ) or ()) else ""


def _internal(host: str) -> bool:
    """A loopback, private, link-local or shared (CGNAT) address: not one of the internet's,
    where a balancer in front of the feed is."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack listener's IPv4 peer
    return not address.is_global


def client_address(environ: dict[str, Any]) -> ClientAddress:
    """The address to count a connection under, from the environ of the request that opened
    its Engine.IO session: its ASGI scope's `client` (after uvicorn's proxy headers) and its
    X-Forwarded-For (feed.delivery.eio_websocket keeps both once the rest is let go)."""
    scope = environ.get("asgi.scope")
    client = scope.get("client") if isinstance(scope, dict) else None
    host = client[0] if client else environ.get(CLIENT_HOST)
    if not host:
        return ClientAddress(None)  # a Unix socket: no address to count
    host = str(host)
    forwarded = _forwarded_hosts(environ)
    if forwarded is not None and host not in forwarded and _internal(host):
        # uvicorn took a trusted proxy's word for the address, which is then one of these;
        # here it did not: a balancer whose address nobody put in FORWARDED_ALLOW_IPS.
        return ClientAddress(None, balancer=host)
    return ClientAddress(address_key(host))


class BalancerWarning:
    """Says once per peer that a balancer's connections are not counted, and how to fix it."""

    def __init__(self) -> None:
        self.warned: set[str] = set()

    def __call__(self, peer: str) -> None:
        if peer in self.warned or len(self.warned) >= WARNED_MAX:
            return
        self.warned.add(peer)
        log.warning(
            "connections from %s carry X-Forwarded-For, which is believed only from "
            "FORWARDED_ALLOW_IPS (uvicorn's setting, by default 127.0.0.1,::1): every client "
            "of this balancer looks like %s, so [limits] connections_per_address is not applied "
            "to them; put the balancer's address in FORWARDED_ALLOW_IPS",
            peer,
            peer,
        )
