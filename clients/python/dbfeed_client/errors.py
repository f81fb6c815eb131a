"""Every error this library raises is a FeedError, carrying the server's `code` and `message`."""

from __future__ import annotations


class FeedError(Exception):
    """The root: catch this to catch anything the feed or this client refuses."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ConnectError(FeedError):
    """The server refused the connection (a bad or expired token, too many connections, a
    refusal in HTTP: then `status` is its status), or could not be reached (`unreachable`)."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(code, message)
        self.status = status


class SubscribeError(FeedError):
    """The server refused a subscribe (`bad_filter`, `unknown_target`, `forbidden`, ...)."""


class RequestTimeout(FeedError):
    """The server did not answer a request in time."""


class ClosedError(FeedError):
    """The client or the subscription was closed."""
