"""Connectors capture changes from a source. `resolve_type` turns a config `type` into a class.

Built-in names map to modules here and are imported lazily, so a user watching only Postgres never
needs the MongoDB or Redis drivers. Anything else is an entry point in the `dbfeed.connectors`
group or an import path (`package.module:Class`), so adding a connector never needs a change in
`feed/`.
"""

from __future__ import annotations

import importlib
import inspect
from importlib.metadata import entry_points

from connectors.base import Connector, RoomAddress, Snapshot, State, Status
from feed.errors import ConfigError

BUILTIN = {
    "memory": ("connectors.memory", "MemoryConnector", None),
    "postgres": ("connectors.postgres", "PostgresConnector", "asyncpg"),
    "redis": ("connectors.redis", "RedisConnector", "redis"),
    "mongodb": ("connectors.mongodb", "MongoConnector", "pymongo"),
}

__all__ = ["BUILTIN", "Connector", "RoomAddress", "Snapshot", "State", "Status", "resolve_type"]


def resolve_type(type_name: str, key: str) -> type[Connector]:
    """The connector class for a config `type`, or a ConfigError naming `key` and the fix."""
    if type_name in BUILTIN:
        module_name, attr, package = BUILTIN[type_name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if package and exc.name and exc.name.split(".")[0] == package:
                raise ConfigError(
                    f"type {type_name!r} needs the {package!r} package: pip install {package}",
                    key=key,
                ) from None
            raise
        return _check(getattr(module, attr), type_name, key)

    for ep in entry_points(group="dbfeed.connectors"):
        if ep.name == type_name:
            return _check(ep.load(), type_name, key)

    if "." in type_name or ":" in type_name:
        module_name, _, attr = type_name.replace(":", ".").rpartition(".")
        if not module_name or module_name.startswith(".") or not attr:
            # importlib refuses a relative or empty name with a ValueError, not an ImportError
            raise ConfigError(
                f"{type_name!r} is not an import path: write 'package.module:Class'", key=key
            )
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"cannot import {module_name!r}: {exc}", key=key) from None
        if not hasattr(module, attr):
            raise ConfigError(f"module {module_name!r} has no {attr!r}", key=key)
        return _check(getattr(module, attr), type_name, key)

    known = ", ".join(sorted(BUILTIN))
    raise ConfigError(
        f"unknown connector type {type_name!r}: use one of {known}, "
        "an entry point in 'dbfeed.connectors', or an import path like 'pkg.module:Class'",
        key=key,
    )


def _check(cls: object, type_name: str, key: str) -> type[Connector]:
    if not (isinstance(cls, type) and issubclass(cls, Connector)):
        raise ConfigError(f"{type_name!r} is not a Connector subclass", key=key)
    if inspect.isabstract(cls):  # instantiating it would raise TypeError, a traceback
        missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
        raise ConfigError(f"{type_name!r} is abstract (it does not implement {missing})", key=key)
    return cls
