"""Config validation and the CLI: a user's mistake is one line naming file and key, never a traceback."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from feed import __version__
from feed.app.cli import build_parser
from feed.app.config import load_config, parse_config
from feed.errors import ConfigError
from feed.options import Options

GOOD = """
[server]
port = 8123

[[connectors]]
name = "mem"
type = "memory"
targets = ["${TABLE}", "public.other"]
"""


def test_interpolation_and_defaults() -> None:
    config = parse_config(GOOD, "feed.toml", {"TABLE": "public.orders"})
    assert config.server.port == 8123 and config.server.host == "127.0.0.1"
    assert config.server.max_subscriptions == 100
    [connector] = config.build_connectors()
    assert connector.targets() == ["public.orders", "public.other"]
    text = GOOD.replace("${TABLE}", "${MISSING:-public.fallback}")
    [connector] = parse_config(text, "feed.toml", {}).build_connectors()
    assert connector.targets()[0] == "public.fallback"


SECRET_NEWLINE = "ends with a newline, as a value read from a secret file does: strip it"
SECRET_FILES = {
    "NAME": "mem\n",
    "DIGEST": "0" * 64 + "\n",
    "DATABASE_URL": "postgresql://u:secret@h:5432/db\n",
    "PASSWORD": "secret\n",
    "MONGODB_URL": "mongodb://u:secret@h:27017/?replicaSet=rs0\n",
    "FEED_CLUSTER_URL": "redis://:secret@h:6379/1\n",
    "JWKS_URL": "https://issuer.example.com/jwks\n",
    "ISSUER": "https://issuer.example.com\n",
}
"""Environment variables set from files that end in a newline, as a mounted secret does."""
PG = "[[connectors]]\nname = 'main'\ntype = 'postgres'\ndsn = '{dsn}'\ntables = ['public.orders']"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[server\nport=1", "feed.toml: not valid TOML"),
        ("[server]\nport = 'x'", "feed.toml: server.port: must be a whole number"),
        ("[server]\nport = 70000", "feed.toml: server.port: must be from 0 to 65535, not 70000"),
        ("[server]\nhost = '${HOST:-}'", "feed.toml: server.host: must be an address to listen on"),
        (
            "[server]\nprot = 1",
            "feed.toml: server.prot: is not a known setting here (did you mean 'port'? known:",
        ),
        (
            "[[connectors]]\nname = 'main'\ntype = 'postgres'\ndsn = 'postgresql://h/db'\n"
            "tabels = ['public.orders']",
            "feed.toml: connectors[0].tabels: is not a known setting here; "
            "did you mean 'tables' (required)?",
        ),
        ("[[connectors]]\ntype = 'memory'", "feed.toml: connectors[0].name: is required"),
        (
            "[[connectors]]\nname = 'a:b'\ntype = 'memory'\ntargets=['t']",
            "feed.toml: connectors[0].name: 'a:b' must be letters",
        ),
        (
            "[[connectors]]\nname = 'm'\ntype = 'nosuch'",
            "feed.toml: connectors[0].type: unknown connector type 'nosuch'",
        ),
        (
            "[[connectors]]\nname = 'm'\ntype = 'nosuch.module:Thing'",
            "feed.toml: connectors[0].type: cannot import 'nosuch.module'",
        ),
        (
            "[[connectors]]\nname = 'm'\ntype = 'memory'",
            "feed.toml: connectors[0].targets: is required",
        ),
        (
            "[[connectors]]\nname = 'm'\ntype = 'memory'\ntargets = ['t']\ntargest = 1",
            "feed.toml: connectors[0].targest: is not a known setting here",
        ),
        (
            "[[connectors]]\nname='m'\ntype='memory'\ntargets=['t']\n"
            "[[connectors]]\nname='m'\ntype='memory'\ntargets=['t']",
            "feed.toml: connectors[1].name: 'm' is used by two connectors",
        ),
        (
            "[[connectors]]\nname = 'm'\ntype = 'memory'\ntargets = ['${NOPE}']",
            "feed.toml: connectors[0].targets[0]: environment variable NOPE is not set",
        ),
        # Both were left as they stand, so the connector got '${DATABASE_URL' as its address.
        (
            "[[connectors]]\nname = 'm'\ntype = 'memory'\ntargets = ['${TABLE']",
            "feed.toml: connectors[0].targets[0]: '${TABLE' is not an environment reference: "
            "write ${NAME} or ${NAME:-default}",
        ),
        (
            "[[connectors]]\nname = 'm'\ntype = 'memory'\ntargets = ['a.${MY TABLE}']",
            "feed.toml: connectors[0].targets[0]: '${MY TABLE}' is not an environment reference",
        ),
        # A dsn asyncpg can never use: `feed check` said "cannot connect: invalid DSN ... got ''"
        # or "[Errno 2] No such file or directory", and `feed serve` retried it forever.
        (
            PG.format(dsn="mysql://u:secret@h/db"),
            "feed.toml: connectors[0].dsn: must be a postgresql:// URL "
            "(postgresql://user:password@host:5432/db), and this is a mysql:// URL",
        ),
        (
            PG.format(dsn="$DATABASE_URL"),
            "feed.toml: connectors[0].dsn: is '$DATABASE_URL': to read the environment variable "
            "write ${DATABASE_URL}",
        ),
        (
            PG.format(dsn="postgresql://u@h:54e2/db"),
            "feed.toml: connectors[0].dsn: has port '54e2', which is not a number",
        ),
        (
            PG.format(dsn="postgresql://u@h/db?sslmode=verify_full"),
            "feed.toml: connectors[0].dsn: sslmode=verify_full is not one of disable, allow, "
            "prefer, require, verify-ca, verify-full",
        ),
        (
            PG.format(
                dsn="postgresql://u@h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"
            ),
            "feed.toml: connectors[0].dsn: sslrootcert=/nonexistent/ca.pem: no such file",
        ),
        (
            PG.format(dsn="postgresql://u@[::1]:5432/db?sslcert=/nonexistent/me.crt"),
            "feed.toml: connectors[0].dsn: sslcert=/nonexistent/me.crt: no such file",
        ),
        ("connectors = 3", "feed.toml: connectors: must be an array of tables"),
        (
            "[auth]\nmode = 'jwt'\nsecret = '${JWT_SECRET:-0123456789abcdef0123456789abcdef}'\nleeway = 86400",
            "feed.toml: auth.leeway: must be from 0 to 300, not 86400 (it would accept tokens "
            "expired that long ago: set the clocks right, by NTP)",
        ),
        # A key with a newline in it (a quoted TOML key) printed the error over two lines.
        (
            '[server]\n"port\\n" = 1',
            "feed.toml: server.\"port\\n\": is not a known setting here (did you mean 'port'?",
        ),
        (
            '[[connectors]]\nname = "m"\ntype = "memory"\ntargets = ["t"]\n"\\u2028" = 1',
            'feed.toml: connectors[0]."\\u2028": is not a known setting here',
        ),
        # Nested deeper than Python's recursion limit: tomllib's RecursionError was a traceback.
        ("a = " + "[" * 5000 + "]" * 5000, "feed.toml: not valid TOML: nested too deeply"),
        # importlib's "Empty module name" ValueError was a traceback.
        (
            "[[connectors]]\nname = 'm'\ntype = ':Thing'",
            "feed.toml: connectors[0].type: ':Thing' is not an import path: write "
            "'package.module:Class'",
        ),
        (
            "[[connectors]]\nname = 'm'\ntype = '.memory'",
            "feed.toml: connectors[0].type: '.memory' is not an import path",
        ),
        # The base class itself: instantiating it raised TypeError (abstract methods).
        (
            "[[connectors]]\nname = 'm'\ntype = 'connectors.base:Connector'",
            "feed.toml: connectors[0].type: 'connectors.base:Connector' is abstract "
            "(it does not implement changes, configure, start, stop, targets)",
        ),
        # nan passed every minimum (nan < 0 is false); inf reached int(lease * 1000) at runtime.
        (
            "[cluster]\nurl = 'redis://h/0'\nlease = inf",
            "feed.toml: cluster.lease: must be a finite number, not inf",
        ),
        (
            "[server]\nfilter_room_grace = nan",
            "feed.toml: server.filter_room_grace: must be a finite number, not nan",
        ),
        # Every number has a range, stated when a value is past it: `1e12` seconds, `10**15`
        # changes passed before, finite, to be multiplied into milliseconds or allocated later.
        (
            "[server]\nsnapshot_limit = 100000000000000000000",
            "feed.toml: server.snapshot_limit: must be from 1 to 1000000, not "
            "100000000000000000000",
        ),
        (
            "[cluster]\nurl = 'redis://h/0'\nlease = 1e308",
            "feed.toml: cluster.lease: must be from 0.5 to 3600, not 1e+308",
        ),
        (
            "[limits]\nrequest_timeout = 1e12",
            "feed.toml: limits.request_timeout: must be from 0.1 to 3600, not 1000000000000.0",
        ),
        (
            "[limits]\nconnections_per_address = -1",
            "feed.toml: limits.connections_per_address: must be from 0 to 1000000, not -1",
        ),
        (
            "[cluster]\nurl = 'redis://h/0'\nhistory = 1_000_000_000_000_000",
            "feed.toml: cluster.history: must be from 1 to 1000000, not 1000000000000000",
        ),
        # A host with a space or a control character: the listen error came out over two lines.
        (
            '[server]\nhost = "a\\nb"',
            'feed.toml: server.host: must be an address to listen on, like "127.0.0.1" or '
            "\"0.0.0.0\", not 'a\\nb'",
        ),
        # asyncpg refused these only when connecting: "OverflowError: connect(): port must be
        # 0-65535." and "IndexError: string index out of range".
        (
            PG.format(dsn="postgresql://u@h:99999/db"),
            "feed.toml: connectors[0].dsn: has port 99999, which is not 1 to 65535",
        ),
        (
            PG.format(dsn="postgresql://u@h:\u00b2/db"),  # "²".isdigit(), but int("²") fails
            "feed.toml: connectors[0].dsn: has port '\u00b2', which is not a number",
        ),
        (
            PG.format(dsn="postgresql://u@h1,/db"),
            "feed.toml: connectors[0].dsn: has an empty host in its list of hosts",
        ),
        # `$` matches before a trailing newline (a value from an environment variable read
        # from a file keeps one): these were accepted, and the name, prefix, digest or schema
        # then held the newline (a token whose digest never matched, rooms "m\n:..."). Now
        # the answer names the newline and where it comes from, as for a URL (below).
        (
            "[[connectors]]\nname = '${NAME}'\ntype = 'memory'\ntargets = ['t']",
            "feed.toml: connectors[0].name: ends with a newline, as a value read from a secret file does: strip it",
        ),
        (
            "[cluster]\nurl = 'redis://h/0'\nprefix = '${NAME}'",
            "feed.toml: cluster.prefix: ends with a newline, as a value read from a secret file does: strip it",
        ),
        (
            "[auth]\nmode = 'token'\n[[auth.tokens]]\nname = 'a'\nsha256 = '${DIGEST}'",
            "feed.toml: auth.tokens[0].sha256: ends with a newline, as a value read from a secret file does: strip it",
        ),
        (
            PG.format(dsn="postgresql://h/db") + "\nschema = '${NAME}'",
            "feed.toml: connectors[0].schema: ends with a newline, as a value read from a secret file does: strip it",
        ),
        # The same from a URL: Python's URL parser dropped the newline (so it often worked),
        # or it was refused in words about the port or sslmode it ended, or PyMongo kept it
        # in a password; a space reached Postgres inside the database's name.
        (
            PG.format(dsn="${DATABASE_URL}"),
            f"feed.toml: connectors[0].dsn: {SECRET_NEWLINE}",
        ),
        (
            PG.format(dsn="postgresql://u@h:5432/db "),
            "feed.toml: connectors[0].dsn: ends with a space: remove it",
        ),
        (
            PG.format(dsn="postgresql://u:${PASSWORD}@h:5432/db"),
            "feed.toml: connectors[0].dsn: has a newline at character 22, which no URL holds: "
            "strip it (a ${VAR} read from a secret file keeps the file's newline), or write it "
            "as %0A where it is meant (a password, a socket path)",
        ),
        (
            "[[connectors]]\nname = 'shop'\ntype = 'mongodb'\nuri = '${MONGODB_URL}'\n"
            "watch = ['shop.orders']",
            f"feed.toml: connectors[0].uri: {SECRET_NEWLINE}",
        ),
        (
            "[[connectors]]\nname = 'c'\ntype = 'redis'\nurl = ' redis://h:6379/0'\n"
            "patterns = ['s:*']",
            "feed.toml: connectors[0].url: starts with a space: remove it",
        ),
        (
            "[cluster]\nurl = '${FEED_CLUSTER_URL}'",
            f"feed.toml: cluster.url: {SECRET_NEWLINE}",
        ),
        (
            "[auth]\nmode = 'jwt'\n[auth.jwt]\nalgorithms = ['RS256']\njwks_url = '${JWKS_URL}'",
            f"feed.toml: auth.jwt.jwks_url: {SECRET_NEWLINE}",
        ),
        (
            "[auth]\nmode = 'jwt'\n[auth.jwt]\nalgorithms = ['HS256']\n"
            "secret = '0123456789abcdef0123456789abcdef'\nissuer = '${ISSUER}'",
            f"feed.toml: auth.jwt.issuer: {SECRET_NEWLINE}",
        ),
        (
            "[auth]\nmode = 'jwt'\n[auth.jwt]\nalgorithms = ['HS256']\n"
            "secret = '0123456789abcdef0123456789abcdef'\naudience = ['feed', 'feed\t']",
            "feed.toml: auth.jwt.audience: ends with a tab: remove it",
        ),
        # What asyncpg refuses in a dsn's query, or ignores when the URL gives the same part,
        # was known only at connect (in its words, or never: ?dbname=app after a path
        # connected to the path's database).
        (
            PG.format(dsn="postgresql://u@h/db?target_session_attrs=primry"),
            "feed.toml: connectors[0].dsn: target_session_attrs=primry is not one of any, "
            "primary, standby, prefer-standby, read-write, read-only",
        ),
        (
            PG.format(dsn="postgresql://u@h/db?gsslib=kerberos"),
            "feed.toml: connectors[0].dsn: gsslib=kerberos is not one of gssapi, sspi",
        ),
        (
            PG.format(dsn="postgresql://u@h/db?sslmode=require&ssl_min_protocol_version=TLS1.2"),
            "feed.toml: connectors[0].dsn: ssl_min_protocol_version=TLS1.2 is not one of TLSv1,",
        ),
        (
            PG.format(dsn="postgresql://u@h/db?sslnegotiation=direct"),
            "feed.toml: connectors[0].dsn: sslnegotiation=direct needs sslmode require, "
            "verify-ca or verify-full, not prefer",
        ),
        (
            PG.format(dsn="postgresql://u@h/db?sslmode=require&verify"),
            "feed.toml: connectors[0].dsn: has 'verify' in its query, which is not name=value",
        ),
        (
            PG.format(dsn="postgresql://u@h/?dbname=app"),
            "feed.toml: connectors[0].dsn: has ?dbname= after a bare / that asyncpg reads as an "
            "empty database name",
        ),
        (
            PG.format(dsn="postgresql://u@h/db?port=5433"),
            "feed.toml: connectors[0].dsn: has a host before the ? and ?port=, which asyncpg "
            "then ignores",
        ),
        (
            PG.format(dsn="postgresql://u:secret@h/db?password=secret2"),
            "feed.toml: connectors[0].dsn: gives the password before the @ and again as "
            "?password=, which asyncpg ignores: keep one",
        ),
        (
            PG.format(dsn="postgresql://u@h/db?keepalives_idle=30"),
            "feed.toml: connectors[0].dsn: ?keepalives_idle= is libpq's, which asyncpg does not "
            "read: it would reach the server as a setting it refuses; remove it",
        ),
        # redis-py hands a URL's ?name= it does not parse to its connection as is: refused at
        # connect, "AbstractConnection.__init__() got an unexpected keyword argument 'foo'".
        (
            "[[connectors]]\nname = 'c'\ntype = 'redis'\nurl = 'redis://h:6379/0?foo=bar'\n"
            "patterns = ['s:*']",
            "feed.toml: connectors[0].url: ?foo= is not a Redis connection option (redis-py's, "
            "such as socket_timeout)",
        ),
        (
            "[[connectors]]\nname = 'c'\ntype = 'redis'\n"
            "url = 'redis://h:6379/0?ssl_cert_reqs=required'\npatterns = ['s:*']",
            "feed.toml: connectors[0].url: ?ssl_cert_reqs= is for TLS: write rediss:// "
            "(redis:// connects without TLS)",
        ),
        (
            "[[connectors]]\nname = 'c'\ntype = 'redis'\n"
            "url = 'redis://h:6379/0?decode_responses=true'\npatterns = ['s:*']",
            "feed.toml: connectors[0].url: ?decode_responses= would hand the feed text where it "
            "reads bytes: remove it",
        ),
        (
            "[cluster]\nurl = 'redis://h:6379/1?socket_timeout=5&health_check=5'",
            "feed.toml: cluster.url: ?health_check= is not a Redis connection option",
        ),
        (
            "[auth]\noperator_role = ['oncall']",
            "feed.toml: auth.operator_role: is not a known setting here "
            "(did you mean 'operator_roles'?",
        ),
    ],
)
def test_config_errors_name_file_key_and_fix(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "feed.toml", SECRET_FILES)
    message = str(info.value)
    assert message.startswith(expected), message
    assert "\n" not in message
    assert "secret" not in message.replace("a secret file", "")  # a password is never shown


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://u:p@h:5432/db",
        "postgres://h1:5432,h2:5433/db?sslmode=disable&sslcert=/nonexistent/ignored.crt",
        "postgresql:///db?host=/var/run/postgresql",
        "postgresql://u@[::1]/db?sslmode=prefer&sslrootcert=/nonexistent/optional.crt",
        "postgresql://?host=h&port=5433&dbname=app&user=u",
        "postgresql://u@h:5432/db?target_session_attrs=read-write&application_name=x"
        "&sslnegotiation=direct&sslmode=require&ssl_min_protocol_version=TLSv1.3",
        "postgresql://u@h/db?options=-c%20statement_timeout%3D5000&gsslib=gssapi",
    ],
)
def test_dsns_asyncpg_takes_are_accepted(dsn: str) -> None:
    parse_config(PG.format(dsn=dsn), "feed.toml", {})


def test_third_party_connector_by_import_path() -> None:
    text = "[[connectors]]\nname='x'\ntype='connectors.memory:MemoryConnector'\ntargets=['t']"
    [connector] = parse_config(text, "feed.toml", {}).build_connectors()
    assert connector.kind == "memory"


def test_missing_file_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("/nonexistent/feed.toml")
    assert str(info.value) == (
        "/nonexistent/feed.toml: no such file; pass --config with the path of your feed.toml"
    )


def run_feed(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "feed", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )


def one_line_refusal(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_cli_version() -> None:
    result = run_feed("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"feed {__version__}"


@pytest.mark.parametrize("command", ["serve", "check", "migrate"])
def test_cli_config_mistake_is_one_line_and_exit_2(tmp_path: Path, command: str) -> None:
    config = tmp_path / "feed.toml"
    config.write_text("[server]\nport = 'eighty'\n")
    assert one_line_refusal(run_feed(command, "--config", str(config))) == (
        f"feed: {config}: server.port: must be a whole number, not 'eighty'"
    )


def test_cli_check_prints_a_table(tmp_path: Path) -> None:
    config = tmp_path / "feed.toml"
    config.write_text("[[connectors]]\nname='mem'\ntype='memory'\ntargets=['public.orders']\n")
    result = run_feed("check", "--config", str(config))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"config {config}: ok (1 connector(s))"
    assert lines[1].split() == ["connector", "type", "result", "detail"]
    assert lines[2].split() == ["mem", "memory", "ok", "reachable"]


def test_every_option_of_every_command_has_help_text() -> None:
    parser = build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, sub in commands.choices.items():
        for action in sub._actions:
            assert action.help, f"feed {name} {'/'.join(action.option_strings) or action.dest}"


MEMORY = "[[connectors]]\nname='mem'\ntype='memory'\ntargets=['public.orders']\n"


def test_serve_on_an_address_of_another_machine_says_to_change_the_host(tmp_path: Path) -> None:
    """192.0.2.1 (TEST-NET-1) is nobody's address here: the hint named --port, which cannot
    help."""
    config = tmp_path / "feed.toml"
    config.write_text(MEMORY)
    result = run_feed("serve", "--config", str(config), "--host", "192.0.2.1", "--port", "8000")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "feed: cannot listen on 192.0.2.1:8000 (Cannot assign requested address); pass --host "
        "with an address of this machine (127.0.0.1, or 0.0.0.0 for all of them), or change "
        "[server] host"
    ]


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    """A Latin-1 "é" in a comment was a UnicodeDecodeError traceback, exit 1."""
    config = tmp_path / "feed.toml"
    config.write_bytes(b"[server]\nport = 8123\n# caf\xe9\n")
    assert one_line_refusal(run_feed("check", "--config", str(config))) == (
        f"feed: {config}: is not UTF-8 text (byte 0xe9 at line 3, column 6); save it as UTF-8"
    )


def test_a_folder_or_an_empty_path_as_config_is_named(tmp_path: Path) -> None:
    """`--config ''` read the current folder: "feed: cannot read the file: Is a directory"."""
    assert one_line_refusal(run_feed("check", "--config", "", cwd=tmp_path)) == (
        "feed: --config is empty: pass the path of your feed.toml"
    )
    assert one_line_refusal(run_feed("check", "--config", str(tmp_path))) == (
        f"feed: {tmp_path}: is a folder; pass --config with the path of the feed.toml in it"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_an_unreadable_config_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "feed.toml"
    config.write_text(MEMORY)
    config.chmod(0)
    assert one_line_refusal(run_feed("check", "--config", str(config))) == (
        f"feed: {config}: cannot read the file: Permission denied"
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # The socket layer took 70000 modulo 65536: the feed listened on 4464, logging 70000.
        (
            ["serve", "--port", "70000"],
            "feed serve: argument --port: 70000 is not a port number (0 to 65535)",
        ),
        (
            ["demo", "--port", "-1"],
            "feed demo: argument --port: -1 is not a port number (0 to 65535)",
        ),
        # Ignored before: the user believed a forced prune had been asked for.
        (["migrate", "--force"], "feed: migrate --force only goes with --prune"),
        (["hash-token", "--generate", "mytoken"], "feed: give a token to hash or --generate"),
        # argparse printed its usage line first: two lines for one mistake.
        (
            ["serve", "--port", "abc"],
            "feed serve: argument --port: 'abc' is not a port number (0 to 65535); "
            "see feed serve --help",
        ),
        (["check", "--bogus"], "feed: unrecognized arguments: --bogus; see feed --help"),
        (["nosuch"], "feed: argument COMMAND: invalid choice: 'nosuch'"),
        # An empty --host was ignored in silence ([server] host was used instead); one with a
        # newline printed the listen error over two lines.
        (
            ["serve", "--host", ""],
            "feed serve: argument --host: '' is not an address to listen on, like 127.0.0.1 "
            "or 0.0.0.0; see feed serve --help",
        ),
        (["serve", "--host", "a\nb"], "feed serve: argument --host: 'a\\nb' is not an address"),
        (["demo", "--host", " "], "feed demo: argument --host: ' ' is not an address"),
    ],
)
def test_command_line_mistakes_are_one_line_and_exit_2(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    """Options that cannot work are refused before anything runs (a `serve` or `demo` that
    started instead fails on run_feed's timeout), in one line, exit 2."""
    config = tmp_path / "feed.toml"
    config.write_text(MEMORY)
    with_config = ["--config", str(config)] if args[0] in ("serve", "check", "migrate") else []
    line = one_line_refusal(run_feed(*args, *with_config))
    assert line.startswith(expected), line


def test_serve_refusing_to_run_without_auth_names_the_file(tmp_path: Path) -> None:
    """The refusal named the key but not the file: "feed: auth.mode: refusing ..."."""
    config = tmp_path / "feed.toml"
    config.write_text(MEMORY)
    line = one_line_refusal(run_feed("serve", "--config", str(config), "--host", "0.0.0.0"))
    assert line.startswith(
        f"feed: {config}: auth.mode: refusing to serve without authentication on 0.0.0.0"
    ), line


def test_a_number_a_connector_reads_without_bounds_is_still_64_bit() -> None:
    """Every built-in number has a range now; a third-party connector's key read without one
    is still refused past 64 bits (tomllib reads an integer of any length)."""
    with pytest.raises(ConfigError) as info:
        Options({"n": 10**20}, "connectors[0]").int("n", 1)
    assert str(info.value) == (
        "connectors[0].n: must be at most 9223372036854775807 (TOML integers are 64-bit), "
        "not 100000000000000000000"
    )
