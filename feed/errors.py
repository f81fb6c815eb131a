"""One exception hierarchy, so callers can catch the feed's own failures without catching bugs.

Everything a user can cause (a config mistake, a bad subscribe payload, an unreachable source) is a
`FeedError` subclass that carries a one-line, user-facing message. Anything else escaping is a bug
and is logged with its traceback.
"""

from __future__ import annotations


class FeedError(Exception):
    """Root of every error the feed raises on purpose."""


class ConfigError(FeedError):
    """A configuration mistake: names the file, the key and what to do about it."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        self.file = file
        self.key = key
        self.detail = message
        where = ": ".join(part for part in (file, key) if part)
        super().__init__(one_line(f"{where}: {message}" if where else message))

    def located(self, file: str) -> ConfigError:
        """The same error, now naming the file it came from."""
        return ConfigError(self.detail, file=file, key=self.key)


def one_line(text: str) -> str:
    """`text` with newlines and other unprintable characters escaped (`\\n`, `\\x00`): a
    message that quotes a user's value or a driver's words still prints as one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


class ConnectorError(FeedError):
    """A source could not be reached or used; the connector is retried with backoff."""


class SourceUnavailable(ConnectorError):
    """The source is down or unreachable right now; retrying may help."""


class SourceMisconfigured(ConnectorError):
    """The source refuses what the connector needs (missing privilege, feature off, unknown table).

    Retrying will not help until someone changes the source or the config, but the connector is
    still retried (slowly) so that fixing the source is enough, without restarting the feed.
    """


class ClusterError(FeedError):
    """The cluster's Redis refused or failed a step (a lost lease, an unreachable server)."""


class SnapshotNotSupported(FeedError):
    """The connector cannot return current rows for this room."""


class ProtocolError(FeedError):
    """A client's request was refused; `code` is the machine-readable reason sent in the ack."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")
