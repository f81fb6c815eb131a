"""Load and validate `feed.toml`: `${VAR}` interpolation, typed settings, one-line errors.

Validation happens entirely at start: a server that starts has a config that makes sense, and a
config that does not gets one line naming the file, the key and the fix.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connectors import Connector, resolve_type
from feed.engine import ClusterConfig, parse_cluster
from feed.errors import ConfigError
from feed.options import DAY, HOUR, MIB, Options
from feed.routing.settings import ServerConfig
from feed.security.auth import AuthConfig, parse_auth
from feed.security.limits import LimitsConfig, parse_limits

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True)
class ConnectorConfig:
    name: str
    type: str
    table: dict[str, Any]
    key: str

    def build(self) -> Connector:
        cls = resolve_type(self.type, f"{self.key}.type")
        options = dict(self.table)
        options.pop("name", None)
        options.pop("type", None)
        return cls(self.name, Options(options, self.key))


@dataclass(frozen=True)
class Config:
    path: str
    server: ServerConfig
    connectors: list[ConnectorConfig]
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    cluster: ClusterConfig | None = None
    """The `[cluster]` table; None runs the feed in one process with rooms in memory."""

    def build_connectors(self) -> list[Connector]:
        """Instantiate every connector, so their own settings are validated now."""
        try:
            return [c.build() for c in self.connectors]
        except ConfigError as exc:
            raise exc.located(self.path) from None


def load_config(path: str | os.PathLike[str], env: dict[str, str] | None = None) -> Config:
    """Read, interpolate and validate a config file."""
    file = str(path)
    if not file:  # Path("") is the current folder: "Is a directory", naming no file
        raise ConfigError("--config is empty: pass the path of your feed.toml")
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            "no such file; pass --config with the path of your feed.toml", file=file
        ) from None
    except IsADirectoryError:
        raise ConfigError(
            "is a folder; pass --config with the path of the feed.toml in it", file=file
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror}", file=file) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:  # a traceback before: TOML files are UTF-8
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            f"is not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line}, column {column}); "
            "save it as UTF-8",
            file=file,
        ) from None
    return parse_config(text, file, os.environ if env is None else env)


def parse_config(text: str, file: str, env: Any) -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=file) from None
    except RecursionError:  # `a = [[[[...]]]]` thousands deep: tomllib parses recursively
        raise ConfigError("not valid TOML: nested too deeply", file=file) from None
    try:
        raw = _interpolate(raw, env, "")
        config = _validate(raw, file)
        config.build_connectors()
    except ConfigError as exc:
        raise exc.located(file) from None
    return config


def valid_host(host: str) -> bool:
    """Whether `host` can be an address or name to listen on: not empty, no space or control
    character (getaddrinfo answers those "unknown host" at best)."""
    return bool(host) and host.isprintable() and not any(c.isspace() for c in host)


def _interpolate(value: Any, env: Any, key: str) -> Any:
    if isinstance(value, str):

        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return str(env[name])
            if default is not None:
                return default
            raise ConfigError(
                f"environment variable {name} is not set; export it or write "
                f"${{{name}:-default}} to give a default",
                key=key,
            )

        for start in (m.start() for m in re.finditer(r"\$\{", value)):
            if not ENV_PATTERN.match(value, start):  # `${DATABASE URL}`, an unclosed `${X`
                end = value.find("}", start)
                shown = value[start : end + 1 if end >= 0 else start + 40]
                raise ConfigError(
                    f"{shown!r} is not an environment reference: write ${{NAME}} or "
                    "${NAME:-default}, NAME being letters, digits and _",
                    key=key,
                )
        return ENV_PATTERN.sub(replace, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, env, f"{key}.{k}" if key else k) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


def _validate(raw: dict[str, Any], file: str) -> Config:
    top = Options(raw, "")
    server_opts = top.table("server")
    # Read even when absent, so the key is known; absent means the auth mode's default
    # (feed.security.hosts).
    allowed_hosts = server_opts.str_list("allowed_hosts")
    server = ServerConfig(
        host=server_opts.str("host", "127.0.0.1"),
        port=server_opts.int("port", 8000, minimum=0, maximum=65535),
        replay_buffer=server_opts.int("replay_buffer", 1000, minimum=1, maximum=1_000_000),
        filter_room_grace=server_opts.float("filter_room_grace", 30.0, minimum=0, maximum=DAY),
        max_subscriptions=server_opts.int("max_subscriptions", 100, minimum=1, maximum=100_000),
        max_room_length=server_opts.int("max_room_length", 512, minimum=16, maximum=65536),
        max_filter_length=server_opts.int("max_filter_length", 1024, minimum=16, maximum=65536),
        snapshot_limit=server_opts.int("snapshot_limit", 1000, minimum=1, maximum=1_000_000),
        snapshot_chunk_bytes=server_opts.int(
            "snapshot_chunk_bytes", 256 * 1024, minimum=1024, maximum=16 * MIB
        ),
        cors_allowed_origins=server_opts.str_list("cors_allowed_origins"),
        allowed_hosts=allowed_hosts if "allowed_hosts" in server_opts.raw else None,
        max_message_bytes=server_opts.int(
            "max_message_bytes", 64 * 1024, minimum=1024, maximum=16 * MIB
        ),
        dashboard=server_opts.bool("dashboard", True),
        log_level=server_opts.choice("log_level", ["debug", "info", "warning", "error"], "info"),
        access_log=server_opts.bool("access_log", False),
        # Whole seconds: Engine.IO's handshake advertises the interval in whole seconds, so 0.5
        # would reach clients as 0.
        ping_interval=server_opts.int("ping_interval", 25, minimum=1, maximum=int(HOUR)),
        ping_timeout=server_opts.int("ping_timeout", 20, minimum=1, maximum=int(HOUR)),
    )
    server_opts.finish()
    # `${HOST:-}` or `host = ""`: getaddrinfo's "unknown host" named no key; a space or a
    # newline in it came out in the listen error, over two lines.
    if not valid_host(server.host):
        server_opts.fail(
            "host",
            'must be an address to listen on, like "127.0.0.1" or "0.0.0.0"'
            + (f", not {server.host!r}" if server.host else ""),
        )

    entries = top._get("connectors", [], False)
    if not isinstance(entries, list):
        top.fail("connectors", "must be an array of tables: write [[connectors]] for each source")
    connectors: list[ConnectorConfig] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        key = f"connectors[{index}]"
        opts = Options(entry, key)
        name = opts.str("name", required=True, spaces="inside")
        if not NAME_PATTERN.fullmatch(name):
            opts.fail("name", f"{name!r} must be letters, digits, '_' or '-' (it prefixes rooms)")
        if name in seen:
            opts.fail("name", f"{name!r} is used by two connectors; names must be unique")
        seen.add(name)
        type_name = opts.str("type", required=True)
        connectors.append(ConnectorConfig(name, type_name, dict(entry), key))
    auth = parse_auth(top)
    limits = parse_limits(top)
    cluster = parse_cluster(top, server.replay_buffer)
    # A chunk waits whole in a long-polling client's queue: chunks are kept to a quarter of
    # the outbound limit, so a client taking a snapshot is never cut off as slow.
    server = dataclasses.replace(
        server,
        snapshot_chunk_bytes=min(server.snapshot_chunk_bytes, limits.outbound_queue_bytes // 4),
    )
    top._used.add("auth")
    top.finish()
    return Config(
        path=file,
        server=server,
        connectors=connectors,
        raw=raw,
        auth=auth,
        limits=limits,
        cluster=cluster,
    )
