"""Typed reading of one config table, so every mistake names its key and the fix in one line."""

from __future__ import annotations

import builtins
import difflib
import inspect
import json
import math
import os
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any, Literal, NoReturn

from feed.errors import ConfigError

INT64 = 2**63
HOUR = 3600.0
DAY = 24 * HOUR
WEEK = 7 * DAY
MONTH = 30 * DAY
"""Upper bounds for seconds: an interval or timeout past an hour, a retention past a week or a
month, is a mistake (a unit taken for another, an extra digit), not a setting."""
MIB = 1024 * 1024
GIB = 1024 * MIB
CHARACTER_NAMES = {"\n": "a newline", "\r": "a carriage return", "\t": "a tab", " ": "a space"}


def _number(value: builtins.int | builtins.float) -> builtins.str:
    """A bound as the docs write it: `3600`, not `3600.0`; `0.05`."""
    if isinstance(value, builtins.float) and value.is_integer():
        return str(int(value))
    return str(value)


def _character(char: builtins.str) -> builtins.str:
    return CHARACTER_NAMES.get(char, f"character U+{ord(char):04X}")


def stray_space(value: builtins.str, *, anywhere: builtins.bool = False) -> builtins.str | None:
    """Why the whitespace or control characters in `value` cannot be meant, or None.

    A value read from a file keeps the file's last newline (a Kubernetes secret made with
    `--from-file` and given as an environment variable), and `${VAR}` brings it into the config. What happened next
    depended on the source: Python's URL parser drops a newline or tab anywhere, so a Redis or
    Postgres URL often worked; one ending in its port or `?sslmode=` was refused in words about
    the port; PyMongo kept it in a password or database name; a space reached Postgres as part
    of the database's name. `anywhere`: a URL, which holds none of them at all.
    """
    if value.endswith("\n"):
        return (
            "ends with a newline, as a value read from a secret file does: strip it "
            "(write the file with printf '%s', not echo)"
        )
    if value and not (value[0].isprintable() and not value[0].isspace()):
        return f"starts with {_character(value[0])}: remove it"
    if value and not (value[-1].isprintable() and not value[-1].isspace()):
        return f"ends with {_character(value[-1])}: remove it"
    if anywhere:
        for index, char in enumerate(value):
            if char.isspace() or not char.isprintable():
                encoded = urllib.parse.quote(char)
                return (
                    f"has {_character(char)} at character {index + 1}, which no URL holds: "
                    f"strip it (a ${{VAR}} read from a secret file keeps the file's newline), "
                    f"or write it as {encoded} where it is meant (a password, a socket path)"
                )
    return None


class Options:
    """Reads values from one TOML table, remembering which keys were used.

    Connectors receive their `[[connectors]]` table wrapped in this, read what they need, and call
    `finish()` so that a misspelt key is reported instead of silently ignored.
    """

    def __init__(self, raw: Mapping[str, Any], where: builtins.str) -> None:
        if not isinstance(raw, Mapping):
            raise ConfigError("must be a table", key=where)
        self.raw = raw
        self.where = where
        self._used: set[builtins.str] = set()

    def path(self, key: builtins.str) -> builtins.str:
        # A quoted TOML key may hold a newline or another control character: shown as TOML
        # writes it (`server."port\\n"`), so the error stays one line and says where.
        shown = key if key.isprintable() else json.dumps(key)
        return f"{self.where}.{shown}" if self.where else shown

    def fail(self, key: builtins.str, message: builtins.str) -> NoReturn:
        raise ConfigError(message, key=self.path(key))

    def _get(self, key: builtins.str, default: Any, required: builtins.bool) -> Any:
        self._used.add(key)
        if key not in self.raw:
            if required:
                typo = self._misspelling_of(key)
                if typo is not None:
                    self.fail(
                        typo, f"is not a known setting here; did you mean {key!r} (required)?"
                    )
                self.fail(key, "is required")
            return default
        return self.raw[key]

    def str(
        self,
        key: builtins.str,
        default: builtins.str | None = None,
        *,
        required: builtins.bool = False,
        spaces: Literal["any", "inside", "none"] = "any",
    ) -> Any:
        """A string; `spaces="inside"` refuses whitespace at its ends (a name, a digest, a path),
        `"none"` whitespace and control characters anywhere (a URL): see `stray_space`."""
        value = self._get(key, default, required)
        if value is not None and (not isinstance(value, str) or (required and not value)):
            self.fail(key, f"must be a non-empty string, not {value!r}")
        if value is not None and spaces != "any":
            problem = stray_space(value, anywhere=spaces == "none")
            if problem is not None:
                self.fail(key, problem)
        return value

    def choice(
        self, key: builtins.str, choices: Iterable[builtins.str], default: builtins.str
    ) -> builtins.str:
        allowed = list(choices)
        value = self.str(key, default)
        if value not in allowed:
            self.fail(key, f"must be one of {', '.join(map(repr, allowed))}, not {value!r}")
        return str(value)

    def int(
        self,
        key: builtins.str,
        default: builtins.int,
        *,
        minimum: builtins.int | None = None,
        maximum: builtins.int | None = None,
    ) -> builtins.int:
        value = self._get(key, default, False)
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(key, f"must be a whole number, not {value!r}")
        self._within(key, value, minimum, maximum, "")
        self._int64(key, value)
        return value

    def _within(
        self,
        key: builtins.str,
        value: builtins.int | builtins.float,
        minimum: builtins.int | builtins.float | None,
        maximum: builtins.int | builtins.float | None,
        why: builtins.str,
    ) -> None:
        """Refuse a number out of its range, stating the whole range when it has both ends."""
        low = minimum is not None and value < minimum
        high = maximum is not None and value > maximum
        if not (low or high):
            return
        if minimum is not None and maximum is not None:
            stated = f"must be from {_number(minimum)} to {_number(maximum)}"
        elif minimum is not None:
            stated = f"must be at least {_number(minimum)}"
        else:
            stated = f"must be at most {_number(maximum or 0)}"
        self.fail(key, f"{stated}, not {value}{why if high else ''}")

    def _int64(self, key: builtins.str, value: builtins.int) -> None:
        """tomllib reads an integer of any length; the sources' drivers and SQL do not."""
        if value >= INT64:
            self.fail(key, f"must be at most {INT64 - 1} (TOML integers are 64-bit), not {value}")
        if value < -INT64:
            self.fail(key, f"must be at least {-INT64} (TOML integers are 64-bit), not {value}")

    def float(
        self,
        key: builtins.str,
        default: builtins.float,
        *,
        minimum: builtins.float | None = None,
        maximum: builtins.float | None = None,
        why: builtins.str = "",
    ) -> builtins.float:
        """A number; `why` follows a refusal past `maximum`, saying what a larger one would do."""
        value = self._get(key, default, False)
        if not isinstance(value, int | builtins.float) or isinstance(value, bool):
            self.fail(key, f"must be a number, not {value!r}")
        if not math.isfinite(value):  # nan passes every bound; inf broke int(seconds * 1000)
            self.fail(key, f"must be a finite number, not {value}")
        self._within(key, value, minimum, maximum, why)
        if isinstance(value, int):
            self._int64(key, value)
        return float(value)

    def bool(self, key: builtins.str, default: builtins.bool) -> builtins.bool:
        value = self._get(key, default, False)
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, not {value!r}")
        return value

    def str_list(
        self,
        key: builtins.str,
        *,
        required: builtins.bool = False,
        allow_empty: builtins.bool = False,
    ) -> list[builtins.str]:
        value = self._get(key, [], required)
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.fail(key, f'must be a list of non-empty strings, like ["a", "b"], not {value!r}')
        if required and not value and not allow_empty:
            self.fail(key, "must list at least one entry")
        return list(value)

    def table(self, key: builtins.str) -> Options:
        value = self._get(key, {}, False)
        return Options(value, self.path(key))

    def finish(self) -> None:
        """Refuse keys nobody read: a typo must not silently disable a setting."""
        unknown = sorted(set(self.raw) - self._used)
        if unknown:
            known = ", ".join(sorted(self._used))
            close = difflib.get_close_matches(unknown[0], sorted(self._used), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            self.fail(unknown[0], f"is not a known setting here ({hint}known: {known})")

    def _misspelling_of(self, key: builtins.str) -> builtins.str | None:
        """A key in the table that looks like a typo of `key` (`tabels` for `tables`)."""
        spare = [k for k in self.raw if isinstance(k, str) and k not in self._used]
        close = difflib.get_close_matches(key, spare, n=1)
        return close[0] if close else None


REDIS_TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
REDIS_CERT_REQS = ("none", "optional", "required")


def redis_url_db_problem(url: builtins.str) -> builtins.str | None:
    """What is wrong with the database a Redis URL names in its path, or None.

    redis-py ignores a path that is not a number (`redis://host:6379/cache`, `/1a`) and lets
    `?db=` override the path: the feed then read database 0 (or another) in silence.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "unix":
        return None  # the path is the socket's; `?db=` names the database
    path = urllib.parse.unquote(parts.path).replace("/", "")
    if not path:
        return None
    if not path.isdecimal():
        return (
            f"names database {path!r} in its path, which is not a number; use redis://host:6379/0"
        )
    query = urllib.parse.parse_qs(parts.query).get("db")
    if query and query[0] != path:
        return f"selects database {path} in its path and {query[0]} in ?db=; keep one"
    return None


def redis_url_problem(params: Mapping[builtins.str, Any]) -> builtins.str | None:
    """What is known wrong in a Redis URL's parsed query before connecting, or None.

    A missing `ssl_ca_certs` file was reported at connect time as "Error 2 connecting to
    host:6379. No such file or directory", which reads as an unreachable server.
    """
    for name in REDIS_TLS_FILES:
        path = params.get(name)
        if isinstance(path, builtins.str) and not os.path.isfile(os.path.expanduser(path)):
            return f"{name}={path}: no such file; give the path of an existing file"
    reqs = params.get("ssl_cert_reqs")
    if isinstance(reqs, builtins.str) and reqs.lower() not in REDIS_CERT_REQS:
        return f"ssl_cert_reqs={reqs} is not one of {', '.join(REDIS_CERT_REQS)}"
    return redis_url_option_problem(params) or redis_tls_problem(params)


def redis_tls_problem(params: Mapping[builtins.str, Any]) -> builtins.str | None:
    """What redis-py could not load of a `rediss://` URL's certificate files, or None."""
    from redis.asyncio.connection import SSLConnection

    from feed.tls import REDIS, tls_files_problem

    kind = params.get("connection_class")
    if not (isinstance(kind, type) and issubclass(kind, SSLConnection)):
        return None

    def path(name: builtins.str) -> builtins.str | None:
        value = params.get(name)
        return value if isinstance(value, builtins.str) and value else None

    password = params.get("ssl_password")
    return tls_files_problem(
        REDIS,
        cert=path("ssl_certfile"),
        key=path("ssl_keyfile"),
        password=password if isinstance(password, builtins.str) else None,
        ca=path("ssl_ca_certs"),
    )


def redis_url_option_problem(params: Mapping[builtins.str, Any]) -> builtins.str | None:
    """A `?name=` of a Redis URL that redis-py hands its connection as is, which refused it at
    connect in Python's words ("AbstractConnection.__init__() got an unexpected keyword
    argument 'foo'"), or one that breaks the feed, or None."""
    from redis.asyncio.connection import Connection

    if params.get("decode_responses") is not None:
        return "?decode_responses= would hand the feed text where it reads bytes: remove it"
    kind = params.get("connection_class", Connection)
    accepted = {
        name
        for klass in kind.__mro__
        if "__init__" in vars(klass)
        for name in inspect.signature(klass.__init__).parameters
    }
    for name in params:
        if name in accepted or name == "connection_class":
            continue
        if name.startswith("ssl_") and "path" in params:
            return f"?{name}= is for TLS, which a unix:// socket does not use: remove it"
        if name.startswith("ssl_"):
            return f"?{name}= is for TLS: write rediss:// (redis:// connects without TLS)"
        return f"?{name}= is not a Redis connection option (redis-py's, such as socket_timeout)"
    return None
