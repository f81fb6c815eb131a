"""How the engine encodes what it keeps in and sends through Redis (orjson when present).

One place for the bytes format and for the one-line error text every engine module shows, so
the modules that write a payload and the ones that read it cannot drift apart.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

try:
    import orjson

    def dumps(value: Any) -> bytes:
        return orjson.dumps(value)

    loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover

    def dumps(value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode()

    loads = json.loads


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def shown_url(url: str) -> str:
    """The URL as a message may show it: its password, and a key's `?ssl_password=`, replaced
    by `***`."""
    parts = urlsplit(url)
    if parts.password is not None:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        parts = parts._replace(netloc=netloc)
    query = re.sub(r"((?:^|&)ssl_password=)[^&]*", r"\1***", parts.query)
    return urlunsplit(parts._replace(query=query))
