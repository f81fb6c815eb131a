"""How `feed serve` logs: one format for every line, and no line per request unless asked.

uvicorn installed its own handlers and format (`INFO:     connection open`, no time, no logger
name) beside the feed's (`2026-12-07 12:31:04,139 INFO feed.hub: ...`), so one log carried two
formats and half its lines had no time. And it logged every HTTP request and every websocket
opened and closed at INFO: a long-polling client makes a request per batch of changes, so 20 of
them under 100 changes a second wrote about 600 lines a second (measured: 286,000 lines in seven
minutes, all but 20 of them requests), burying the lines about sources and clients that an
operator reads. `[server] access_log = true` brings the request lines back, in the same format.
"""

from __future__ import annotations

import logging

CONNECTION_LINES = frozenset(
    {'%s - "WebSocket %s" [accepted]', "connection open", "connection closed"}
)
"""What uvicorn's error logger says, at INFO, for every websocket: access-log lines in kind."""


class UvicornLines(logging.Filter):
    """Names uvicorn's server lines `uvicorn` (its logger is `uvicorn.error`, which read as an
    error on every INFO line: `INFO uvicorn.error: Application startup complete.`), and drops
    its per-websocket INFO lines unless `access_log` is on."""

    def __init__(self, access_log: bool) -> None:
        super().__init__()
        self.access_log = access_log

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "uvicorn.error":
            record.name = "uvicorn"
        return self.access_log or not (
            record.levelno == logging.INFO and record.msg in CONNECTION_LINES
        )


def configure(access_log: bool) -> None:
    """Per-connection lines off unless `access_log`; call before uvicorn starts serving.

    uvicorn is run with `log_config=None`, so its loggers have no handler of their own and
    propagate to the root logger that `feed` set up (feed.app.cli), with its format."""
    error_log = logging.getLogger("uvicorn.error")
    for existing in [f for f in error_log.filters if isinstance(f, UvicornLines)]:
        error_log.removeFilter(existing)
    error_log.addFilter(UvicornLines(access_log))
