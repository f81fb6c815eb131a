"""Config mistakes, generated: a valid feed.toml with one thing wrong is refused in one line that
names the file and the key, never a traceback; the valid one, and equivalent spellings of it,
still parse.

Every mutation starts from VALID, which sets every documented key (checked against the docs'
tables below), so a key added later is fuzzed as soon as it is documented. The examples are
derandomized: CI sees the same ones on every run.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from feed.app.config import Config, parse_config
from feed.errors import ConfigError

ROOT = Path(__file__).parent.parent
FILE = "feed.toml"

VALID = """
[server]
host = "127.0.0.1"
port = 8123
replay_buffer = 1000
filter_room_grace = 30.0
max_subscriptions = 100
max_room_length = 512
max_filter_length = 1024
snapshot_limit = 1000
snapshot_chunk_bytes = 262144
max_message_bytes = 65536
cors_allowed_origins = ["https://app.example.com"]
allowed_hosts = ["feed.example.com"]
dashboard = true
log_level = "info"
access_log = false
ping_interval = 25
ping_timeout = 20

[limits]
connections_per_identity = 100
connections_per_address = 100
subscribe_rate = 20.0
subscribe_burst = 100
outbound_queue_bytes = 8388608
max_connections = 0
request_timeout = 10.0
handshake_timeout = 10.0
max_handshakes = 1000
rooms_per_identity = 5000
max_rooms = 50000
idle_rooms_per_identity = 500

[cluster]
url = "redis://127.0.0.1:6379/1"
prefix = "dbfeed"
lease = 10.0
history = 1000
node = "n1"
room_ttl = 86400.0
publish_interval = 0.005

[auth]
mode = "jwt"
allow_unauthenticated = false
leeway = 30.0
operator_roles = ["admin"]
protect_status = false

[auth.jwt]
algorithms = ["HS256"]
secret = "0123456789abcdef0123456789abcdef"
audience = "feed"
issuer = "https://issuer.example.com"
name_claim = "sub"
roles_claim = "roles"
require = ["exp"]

[[auth.tokens]]
name = "svc"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
roles = ["admin"]
claims = { tenant_id = "acme" }

[[auth.rules]]
allow = ["main:*"]
roles = ["admin"]
identities = ["svc"]
claims = { plan = "pro" }
row_filter = "tenant_id=eq.{tenant_id}"

[[auth.masks]]
fields = ["email"]
rooms = ["main:*"]
roles = ["viewer"]
except_roles = ["admin"]

[[connectors]]
name = "mem"
type = "memory"
targets = ["public.orders"]
key = "id"
durable = true
before_images = true

[[connectors]]
name = "main"
type = "postgres"
dsn = "postgresql://u@127.0.0.1:5432/db"
tables = ["public.orders", "public.customers"]
keys = { "public.orders" = "id", "public.customers" = ["a", "b"] }
mode = "notify"
schema = "feed"
auto_migrate = false
heartbeat_interval = 5.0
heartbeat_timeout = 5.0
query_timeout = 30.0
connect_timeout = 10.0
reconnect_max = 10.0
standby_interval = 2.0
journal_retention = 300.0
prune_interval = 10.0
save_interval = 0.5
save_every = 2000
batch_size = 500
snapshot_wait = 20.0
snapshot_scan_limit = 100000
slot = "feed_main"
poll_interval = 0.01
capture_check_interval = 5.0
journal_warn_rows = 1000000
journal_warn_age = 600.0

[[connectors]]
name = "shop"
type = "mongodb"
uri = "mongodb://127.0.0.1:27017/?replicaSet=rs0"
watch = ["shop.orders"]
full_document = "updateLookup"
full_document_before_change = "off"
resume_store = "mongodb"
resume_collection = "dbfeed.resume_tokens"
token_save_interval = 10.0
token_save_every = 2000
max_await_ms = 1000
connect_timeout = 10.0
resume_retries = 5
lag_threshold = 30.0
allow_missing = false

[[connectors]]
name = "cache"
type = "redis"
url = "redis://127.0.0.1:6379/0"
patterns = ["session:*", "user:*"]
db = 0
mode = "keyspace"
configure = false
fetch_values = false
max_value_bytes = 65536
max_value_items = 1000
health_check_interval = 5.0
capture_check_interval = 5.0
reconnect_timeout = 10.0
max_pending = 100000
snapshot_scan_limit = 100000
cluster_refresh_interval = 5.0

[[connectors]]
name = "events"
type = "redis"
url = "redis://127.0.0.1:6379/0"
patterns = ["events"]
mode = "streams"
start = "latest"
offsets_key = "feed:offsets:events"
stream_batch = 500
key_field = "id"
op_field = "op"
"""
BASE: dict[str, Any] = tomllib.loads(VALID)
KeyPath = tuple[str | int, ...]

# -- writing a changed config back as TOML ------------------------------------------------------


def toml_string(text: str) -> str:
    escaped = (
        f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else "\\" + c if c in '"\\' else c
        for c in text
    )
    return '"' + "".join(escaped) + '"'


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    assert isinstance(value, dict), value
    return "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def dump(doc: dict[str, Any]) -> str:
    """Every table inline: any shape a mutation makes (a table where a number was) is writable."""
    return "".join(f"{toml_string(k)} = {toml_value(v)}\n" for k, v in doc.items())


# -- where in the config ------------------------------------------------------------------------


def paths(value: Any, at: KeyPath = ()) -> list[KeyPath]:
    """Every key under `value`, tables and arrays of tables included, depth first."""
    found: list[KeyPath] = []
    if isinstance(value, dict):
        for key, item in value.items():
            found.append((*at, key))
            found.extend(paths(item, (*at, key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            if isinstance(item, dict):
                found.extend(paths(item, (*at, index)))
    return found


def shown(path: KeyPath) -> str:
    """The key as errors name it: `connectors[1].dsn`."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def named(path: KeyPath) -> str:
    """The key as errors name one that is not a bare key: `server."port\\n"`."""
    last = str(path[-1])
    return shown((*path[:-1], last if last.isprintable() else json.dumps(last)))


def get(doc: Any, path: KeyPath) -> Any:
    for part in path:
        doc = doc[part]
    return doc


def changed(path: KeyPath, value: Any, doc: dict[str, Any] = BASE) -> dict[str, Any]:
    copied = copy.deepcopy(doc)
    get(copied, path[:-1])[path[-1]] = value
    return copied


KEYS = paths(BASE)
LEAVES = [p for p in KEYS if not isinstance(get(BASE, p), dict)]
TABLES = [p for p in KEYS if isinstance(get(BASE, p), dict)] + [
    ("connectors", i) for i in range(len(BASE["connectors"]))
]
FREE_FORM = [p for p in TABLES if p[-1] == "claims"]
"""Tables whose keys are the user's own (claim names): any key is accepted."""
TYPES = [("connectors", i, "type") for i in range(len(BASE["connectors"]))]
NAMES = [("connectors", i, "name") for i in range(len(BASE["connectors"]))]
STRINGS = [p for p in LEAVES if isinstance(get(BASE, p), str) and p not in TYPES]

# -- what every answer must be ------------------------------------------------------------------


def refusal(text: str, env: dict[str, str] | None = None) -> str | None:
    """parse_config's answer: None for a config that parses, else its error, checked for shape."""
    try:
        parse_config(text, FILE, env or {})
    except ConfigError as exc:
        message = str(exc)
        assert len(message.splitlines()) == 1 and message.isprintable(), message
        assert message.startswith(f"{FILE}: "), message
        return message
    return None


def names(message: str, path: KeyPath) -> bool:
    """The refusal names the key (or one inside it: `connectors[1].name: is required`), or, for
    a rule between two keys, names the other and this one in its words
    (`heartbeat_interval: heartbeat_interval + heartbeat_timeout must be <= 60`)."""
    after = message.removeprefix(f"{FILE}: {shown(path)}")
    if after != message and after.startswith((":", ".", "[")):
        return True
    last = path[-1]
    return isinstance(last, str) and re.search(rf"\b{re.escape(last)}\b", message) is not None


BAD_VALUES = st.one_of(
    st.text(max_size=12),
    st.integers(),
    st.integers(min_value=2**62),
    st.floats(),
    st.booleans(),
    st.sampled_from(["", " ", "${UNSET_VAR}", "${UNSET_VAR:-}", "${BAD", "$UNSET", "a\nb"]),
    st.lists(st.integers() | st.text(max_size=4), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@settings(
    max_examples=250,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(path=st.sampled_from([p for p in LEAVES + TABLES if p not in TYPES]), value=BAD_VALUES)
def test_any_value_anywhere_parses_or_is_refused_naming_the_key(path: KeyPath, value: Any) -> None:
    message = refusal(dump(changed(path, value)))
    if message is not None:
        assert names(message, path), (shown(path), value, message)
    elif path[:-1] not in FREE_FORM:
        # No setting takes these: nan passes every bound (nan < 0 is false), inf broke
        # int(seconds * 1000) at runtime, and TOML integers are 64-bit.
        unusable = isinstance(value, float) and not math.isfinite(value)
        assert not unusable and not (isinstance(value, int) and abs(value) >= 2**63), value


@settings(max_examples=60, derandomize=True, database=None, deadline=None)
@given(path=st.sampled_from(LEAVES + TABLES))
def test_a_key_left_out_is_optional_or_named(path: KeyPath) -> None:
    copied = copy.deepcopy(BASE)
    del get(copied, path[:-1])[path[-1]]
    message = refusal(dump(copied))
    if message is not None:
        assert names(message, path) or "needs" in message, (shown(path), message)


@st.composite
def misspelt(draw: st.DrawFn) -> tuple[KeyPath, str]:
    """A key with one character added, dropped or changed (any character: a quoted TOML key
    may hold a newline), or its case changed."""
    path = draw(
        st.sampled_from([p for p in KEYS if isinstance(p[-1], str) and p[:-1] not in FREE_FORM])
    )
    key = str(path[-1])
    at = draw(st.integers(0, len(key)))
    char = draw(st.characters(exclude_categories=["Cs"]))
    new = draw(
        st.sampled_from(
            [key[:at] + char + key[at:], key[:at] + key[at + 1 :], key[:at] + char + key[at + 1 :]]
        )
        | st.just(key.upper())
    )
    assume(new and new not in get(BASE, path[:-1]))
    return path, new


@settings(max_examples=150, derandomize=True, database=None, deadline=None)
@given(misspelt())
def test_a_misspelt_key_is_refused_naming_it(case: tuple[KeyPath, str]) -> None:
    path, new = case
    copied = copy.deepcopy(BASE)
    table = get(copied, path[:-1])
    table[new] = table.pop(path[-1])
    message = refusal(dump(copied))
    assert message is not None, (shown(path), new)
    assert message.startswith(f"{FILE}: {named((*path[:-1], new))}: ") or names(message, path), (
        message
    )


@settings(max_examples=40, derandomize=True, database=None, deadline=None)
@given(
    table=st.sampled_from([(), *(t for t in TABLES if t not in FREE_FORM)]),
    key=st.text(min_size=1, max_size=10),
)
def test_an_unknown_key_in_any_table_is_refused_naming_it(table: KeyPath, key: str) -> None:
    assume(key not in get(BASE, table))
    message = refusal(dump(changed((*table, key), 1)))
    assert message is not None and message.startswith(f"{FILE}: {named((*table, key))}: "), message


BAD_TYPES = [
    "",
    "nosuch",
    "Memory",
    ".memory",
    ":MemoryConnector",
    "connectors.memory:",
    "connectors.memory:Nope",
    "connectors.nosuch:Thing",
    "connectors.base:Connector",
    "json:loads",
    "builtins:int",
    "feed.app.cli:main",
]


@settings(max_examples=40, derandomize=True, database=None, deadline=None)
@given(
    path=st.sampled_from(TYPES + NAMES),
    bad=st.sampled_from(BAD_TYPES) | st.text(max_size=70).filter(lambda t: "." not in t),
)
def test_bad_connector_types_and_names_are_refused(path: KeyPath, bad: str) -> None:
    """An unknown `type`, an import path that does not lead to a connector, a name that cannot
    prefix rooms (random text has no dot, so no module is imported by chance)."""
    if path[-1] == "name" and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", bad):
        assume(bad not in [c["name"] for c in BASE["connectors"]])
        assert refusal(dump(changed(path, bad))) is None
        return
    message = refusal(dump(changed(path, bad)))
    assert message is not None and message.startswith(f"{FILE}: {shown(path)}: "), message


@settings(max_examples=20, derandomize=True, database=None, deadline=None)
@given(first=st.integers(0, 4), second=st.integers(0, 4))
def test_two_connectors_with_one_name_are_refused(first: int, second: int) -> None:
    assume(first != second)
    doc = changed(("connectors", second, "name"), BASE["connectors"][first]["name"])
    message = refusal(dump(doc))
    later = max(first, second)
    assert message is not None and message.startswith(
        f"{FILE}: connectors[{later}].name: {BASE['connectors'][first]['name']!r} is used by two"
    ), message


@settings(max_examples=60, derandomize=True, database=None, deadline=None)
@given(at=st.integers(0, len(VALID)), junk=st.text(min_size=1, max_size=6))
def test_text_broken_anywhere_is_one_line_naming_the_file(at: int, junk: str) -> None:
    """Characters dropped into the file anywhere: invalid TOML, or a value or key gone wrong."""
    refusal(VALID[:at] + junk + VALID[at:])


@settings(max_examples=40, derandomize=True, database=None, deadline=None)
@given(path=st.sampled_from(STRINGS), default=st.booleans())
def test_a_value_from_the_environment_parses_as_if_written(path: KeyPath, default: bool) -> None:
    """`${VAR}` set to the value, or `${UNSET:-value}`, is the same config as the value."""
    value = get(BASE, path)
    assume("}" not in value and "$" not in value)
    written = "${UNSET_VAR:-" + value + "}" if default else "${FUZZ_VAR}"
    config = parse_config(dump(changed(path, written)), FILE, {"FUZZ_VAR": value})
    assert config == parse_config(VALID, FILE, {})


# -- values a secret file brings in: whitespace at the ends, a newline inside a URL --------------

URLS: list[KeyPath] = [("connectors", 1, "dsn"), ("connectors", 2, "uri"), ("connectors", 3, "url")]
URLS += [("connectors", 4, "url"), ("cluster", "url")]
"""No URL holds a space or a control character: each is refused wherever it is."""
TRIMMED: list[KeyPath] = [
    *NAMES,
    ("cluster", "prefix"),
    ("cluster", "node"),
    ("auth", "tokens", 0, "sha256"),
]
TRIMMED += [("connectors", 1, "schema"), ("connectors", 1, "slot"), ("auth", "jwt", "issuer")]
TRIMMED += [("auth", "jwt", "audience")]
"""Names, digests, an issuer: whitespace at their ends cannot be meant."""
SPACES = ["\n", "\r\n", " ", "\t", "\r", "\u00a0", "\x00"]


@settings(max_examples=80, derandomize=True, database=None, deadline=None)
@given(
    path=st.sampled_from(URLS + TRIMMED),
    space=st.sampled_from(SPACES),
    where=st.sampled_from(["end", "start", "inside"]),
    at=st.integers(1, 30),
)
def test_whitespace_a_secret_file_brings_is_refused_naming_the_key(
    path: KeyPath, space: str, where: str, at: int
) -> None:
    """`dsn = "${DATABASE_URL}"` with the variable read from a mounted secret file ends in "\n".
    Python's URL parser dropped it (so it often worked), or the port or `sslmode` it ended in
    was refused in other words, or it reached the server inside a name; a name or digest held
    it for good. Now: refused, naming the key and the fix, never quoting the URL."""
    value = get(BASE, path)
    if where == "inside":
        assume(path in URLS)
        at = at % (len(value) - 1) + 1
        value = value[:at] + space + value[at:]
    else:
        value = value + space if where == "end" else space + value
    message = refusal(dump(changed(path, value)))
    assert message is not None, (shown(path), value)
    assert message.startswith(f"{FILE}: {shown(path)}: "), message
    if where == "end" and space.endswith("\n"):
        assert "ends with a newline, as a value read from a secret file does: strip it" in message
    if path in URLS:
        assert "127.0.0.1" not in message, message  # a URL may hold a password: never shown


# -- a dsn's query, against asyncpg's own reading of it ------------------------------------------

DSN_PARAMETERS = {
    "target_session_attrs": ["any", "read-write", "prefer-standby", "bogus", "READ-WRITE", ""],
    "gsslib": ["gssapi", "sspi", "kerberos"],
    "sslnegotiation": ["postgres", "direct", "tls"],
    "sslmode": ["disable", "prefer", "require", "verify-ca", "verify-full", "on"],
    "ssl_min_protocol_version": ["TLSv1.2", "TLSv1.3", "TLS1.2", "SSLv3"],
    "ssl_max_protocol_version": ["TLSv1.3", "tlsv1.3"],
    "port": ["5433", "abc"],
    "host": ["other", "/var/run/postgresql"],
    "dbname": ["app"],
    "database": ["app"],
    "user": ["v"],
    "connect_timeout": ["5"],
    "keepalives": ["1"],
    "application_name": ["x"],
}


def asyncpg_reads(dsn: str) -> bool:
    """Whether asyncpg's own parser takes `dsn` (what it does first in every connect)."""
    from asyncpg import connect_utils

    try:
        connect_utils._parse_connect_dsn_and_args(
            dsn=dsn, host=None, port=None, user=None, password=None, passfile=None,
            database=None, ssl=None, service=None, servicefile=None, direct_tls=None,
            server_settings=None, target_session_attrs=None, krbsrvname=None, gsslib=None,
        )  # fmt: skip
    except ValueError:  # asyncpg's ClientConfigurationError is one
        return False
    return True


@settings(max_examples=80, derandomize=True, database=None, deadline=None)
@given(
    query=st.lists(
        st.sampled_from(sorted(DSN_PARAMETERS)).flatmap(
            lambda name: st.tuples(st.just(name), st.sampled_from(DSN_PARAMETERS[name]))
        ),
        min_size=1,
        max_size=3,
    ),
    bare=st.booleans(),
)
def test_a_dsn_the_config_takes_is_one_asyncpg_takes_as_written(
    query: list[tuple[str, str]], bare: bool
) -> None:
    """A dsn accepted at start is one asyncpg reads without an error, and none of its
    parameters is one asyncpg ignores in silence (the URL names user, host, port and database,
    so ?user=, ?host=, ?port=, ?dbname= would be; libpq's own would reach the server)."""
    path = ("connectors", 1, "dsn")
    dsn = ("postgresql://u@127.0.0.1:5432/db?" if not bare else "postgresql://?") + "&".join(
        f"{name}={value}" for name, value in query
    )
    message = refusal(dump(changed(path, dsn)))
    if message is not None:
        assert message.startswith(f"{FILE}: connectors[1].dsn: "), message
        return
    assert asyncpg_reads(dsn), dsn
    names = {name for name, _ in query}
    if not bare:
        assert not names & {"port", "host", "dbname", "database", "user"}, dsn
    assert not names & {"connect_timeout", "keepalives"}, dsn


# -- numbers: each has a stated range, and a value past it is refused with the range -------------

NUMBERS = [p for p in LEAVES if type(get(BASE, p)) in (int, float)]
RANGE = re.compile(r": must be from (\S+) to (\S+), not ")


@functools.cache
def stated_range(path: KeyPath) -> tuple[float, float]:
    """The range the reader states when refusing a huge number at `path`, both ways."""
    huge = 10**18 if isinstance(get(BASE, path), int) else 1e300
    ranges = set()
    for value in (huge, -huge):
        message = refusal(dump(changed(path, value)))
        assert message is not None, f"{shown(path)} = {value} is accepted"
        assert message.startswith(f"{FILE}: {shown(path)}: "), message
        match = RANGE.search(message)
        assert match, message
        ranges.add((float(match.group(1)), float(match.group(2))))
    [(low, high)] = ranges
    return low, high


def pair_rule(message: str | None) -> bool:
    """A refusal of two keys together: `heartbeat_interval + heartbeat_timeout must be <= 60`,
    `db: is 2 but url selects database 0; keep one`."""
    return message is not None and (" + " in message or "; keep one" in message)


@pytest.mark.parametrize("path", NUMBERS, ids=shown)
def test_every_number_states_its_range_and_takes_its_bounds(path: KeyPath) -> None:
    """`lease = 1e308`, `history = 10**15`, a timeout of 1e12 s passed before: finite, so every
    check let them through, to be multiplied into milliseconds or allocated later."""
    low, high = stated_range(path)
    assert low <= get(BASE, path) <= high
    assert high < 2**53, "beyond what a double holds exactly: no sane maximum"
    for bound in (low, high):
        value = int(bound) if isinstance(get(BASE, path), int) else bound
        message = refusal(dump(changed(path, value)))
        assert message is None or pair_rule(message), message


@settings(max_examples=120, derandomize=True, database=None, deadline=None)
@given(
    path=st.sampled_from(NUMBERS),
    value=st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False),
)
def test_a_number_outside_its_range_is_refused_with_the_range(path: KeyPath, value: Any) -> None:
    low, high = stated_range(path)
    message = refusal(dump(changed(path, value)))
    if isinstance(get(BASE, path), int) and isinstance(value, float):
        assert message is not None and "whole number" in message, message
    elif not low <= value <= high:
        assert message is not None and RANGE.search(message), (shown(path), value, message)
    else:
        assert message is None or pair_rule(message), message


def test_the_valid_config_parses_with_every_value_as_written() -> None:
    config = parse_config(VALID, FILE, {})
    assert isinstance(config, Config) and config.server.port == 8123
    assert [c.name for c in config.build_connectors()] == ["mem", "main", "shop", "cache", "events"]
    assert tomllib.loads(dump(BASE)) == BASE  # the writer the mutations go through


def documented_keys(page: Path) -> set[str]:
    """The first column of every `| key | default | meaning |` table on a docs page."""
    keys: set[str] = set()
    in_table = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("| key |"):
            in_table = True
        elif not line.startswith("|"):
            in_table = False
        elif in_table:
            keys.update(re.findall(r"^\| `(\w+)` \|", line))
    return keys


@pytest.mark.parametrize(
    ("page", "tables"),
    [
        ("configuration.md", [("server",), ("cluster",), ("connectors", 0)]),
        ("connectors/postgres.md", [("connectors", 1)]),
        ("connectors/mongodb.md", [("connectors", 2)]),
        ("connectors/redis.md", [("connectors", 3), ("connectors", 4)]),
    ],
)
def test_the_fuzzed_config_sets_every_documented_key(page: str, tables: list[KeyPath]) -> None:
    documented = documented_keys(ROOT / "docs" / page)
    assert documented
    present = {k for table in tables for k in get(BASE, table)}
    assert documented - present == set(), f"add them to VALID in {Path(__file__).name}"


CLI_CASES = [
    (("server", "port"), "eighty"),
    (("limits", "request_timeout"), math.inf),
    (("connectors", 1, "tables"), {"public.orders": 1}),
    (("connectors", 4, "type"), ":Streams"),
    (("auth", "jwt"), ["HS256"]),
    (("server",), {"port\n": 1}),
]


@pytest.mark.parametrize(("path", "value"), CLI_CASES, ids=[shown(p) for p, _ in CLI_CASES])
def test_feed_check_prints_the_same_one_line_and_exits_2(
    tmp_path: Path, path: KeyPath, value: Any
) -> None:
    """Through the real process: what a user runs, with what the generated cases assert."""
    text = dump(changed(path, value))
    config = tmp_path / FILE
    config.write_text(text, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "feed", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    expected = refusal(text)
    assert expected is not None and names(expected, path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"feed: {config}{expected.removeprefix(FILE)}"]
    assert result.stdout == ""


@pytest.mark.parametrize("path", [URLS[0], URLS[1], URLS[4]], ids=shown)
def test_feed_check_refuses_a_url_read_from_a_secret_file(tmp_path: Path, path: KeyPath) -> None:
    """`url = "${SECRET_URL}"`, the variable set from a file that ends in a newline (a mounted
    Docker or Kubernetes secret), through the real process: exit 2, one line, the URL unshown."""
    config = tmp_path / FILE
    config.write_text(dump(changed(path, "${SECRET_URL}")), encoding="utf-8")
    secret = get(BASE, path) + "\n"
    result = subprocess.run(
        [sys.executable, "-m", "feed", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "SECRET_URL": secret},
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"feed: {config}: {shown(path)}: ends with a newline, as a value read from a secret "
        "file does: strip it (write the file with printf '%s', not echo)"
    ]
    assert result.stdout == ""
