"""How the connector words and classifies a driver's errors: whether one is worth reconnecting
for, and the one line an operator reads in a status or a log."""

from __future__ import annotations

import asyncpg

TRANSIENT_SQLSTATE_CLASSES = ("08", "53", "57", "40")
"""Connection exceptions, insufficient resources, operator intervention, transaction rollback."""


def is_transient(exc: BaseException) -> bool:
    """A lost or refused connection (worth reconnecting) rather than a misconfiguration."""
    if isinstance(
        exc,
        OSError
        | TimeoutError
        | ConnectionError
        | asyncpg.InterfaceError
        | asyncpg.InternalClientError  # e.g. a protocol state broken by a dying server
        | asyncpg.ConnectionDoesNotExistError,
    ):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        code = getattr(exc, "sqlstate", "") or ""
        return code[:2] in TRANSIENT_SQLSTATE_CLASSES
    return False


def one_line(exc: BaseException) -> str:
    """The first line of an error's message, worded for an operator.

    asyncpg reports a session the server ended while it sat idle (pg_terminate_backend, a
    restart) at the next query as "cannot switch to state 12; another operation (2) is in
    progress": its protocol state, nothing an operator can act on.
    """
    text = str(exc).strip()
    if "the underlying connection is closed" in text and exc.__context__ is not None:
        return one_line(exc.__context__)  # a cleanup after the error that tells what happened
    if isinstance(exc, asyncpg.InternalClientError) and "cannot switch to state" in text:
        return "the server ended the session"
    return text.splitlines()[0] if text else type(exc).__name__
