"""Engine.IO session ids (and tokens a client put in the URL) kept out of uvicorn's request lines.

A long-polling client's every request names its session (`?...&sid=ej_CSl...`), and uvicorn logs
each request line at INFO, as it logs each websocket's path. Whoever holds a live session's id can
poll it (and receive the changes shaped for its identity) or post requests in its name, so the id
is as good as the client's token while the session lasts: it is logged as `sid=***`.
"""

from __future__ import annotations

import logging
import re

SECRET_PARAMS = (
    "sid",
    "token",
    "access_token",
    "id_token",
    "jwt",
    "auth",
    "authorization",
    "api_key",
    "apikey",
    "key",
    "password",
    "secret",
)
"""Query parameters whose values are kept out of the log. Besides Engine.IO's `sid`: the feed
reads tokens only from the Socket.IO auth payload, but clients written for other servers put
them in the URL (`io(url, {query: {token}})`), and uvicorn logged them with the request line
before the connection was refused."""
SESSION_ID = re.compile(r"(?<=[?&])((?:" + "|".join(SECRET_PARAMS) + r")=)[^&\s\"]+", re.IGNORECASE)
LOGGERS = ("uvicorn.access", "uvicorn.error")
"""uvicorn's request lines (HTTP) and its websocket lines (`"WebSocket /socket.io/?..."`)."""


def _redacted(value: object) -> object:
    if isinstance(value, str) and "=" in value:
        return SESSION_ID.sub(r"\1***", value)
    return value


def token_in_url(query: str) -> bool:
    """Whether a query string carries a credential other than Engine.IO's session id."""
    return any(m.group(1).lower() != "sid=" for m in SESSION_ID.finditer("?" + query))


class RedactSessionIds(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_redacted(arg) for arg in record.args)
        record.msg = _redacted(record.msg)
        return True


def redact_session_ids() -> None:
    """Install the filter on uvicorn's loggers (after uvicorn has configured its logging)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSessionIds) for f in logger.filters):
            logger.addFilter(RedactSessionIds())
