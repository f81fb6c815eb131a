"""The reference docs against the code, so they cannot drift apart again.

Every config key a docs table lists is one the config reader accepts, with the stated default, and
every key the reader accepts is listed; every metric the code exports is in docs/operations.md
and every metric listed there is exported; every error code the server can send is in
docs/protocol.md or docs/security.md and every code listed there can be sent; every option a doc
gives a `feed` command is one that command has. The known keys come from the config reader
itself (the "known: ..." list of its unknown-key error), so a key added to the code without a
line in the docs fails here, and so does a default changed on one side only.
"""

from __future__ import annotations

import argparse
import ast
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from feed.app.cli import build_parser
from feed.app.config import Config, load_config, parse_config
from feed.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MEMORY = '[[connectors]]\nname = "m"\ntype = "memory"\ntargets = ["t"]\n'
CONNECTORS = {
    "postgres": 'dsn = "postgresql://127.0.0.1/db"\ntables = ["public.orders"]\n',
    "mongodb": 'uri = "mongodb://127.0.0.1/?replicaSet=rs0"\nwatch = ["shop.orders"]\n',
    "redis": 'url = "redis://127.0.0.1:6379/0"\npatterns = ["session:*"]\n',
}
PRIMITIVE = (int, float, str, bool, type(None), list, tuple, dict, set, frozenset)


def section(path: Path, heading: str) -> list[str]:
    """The lines under a Markdown heading, up to the next heading of the same or a higher level."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = lines.index(heading) + 1
    level = len(heading) - len(heading.lstrip("#"))
    fenced = False
    for end in range(start, len(lines)):
        fenced ^= lines[end].startswith("```")
        if not fenced and re.match(rf"#{{1,{level}}} ", lines[end]):
            return lines[start:end]
    end = len(lines)
    return lines[start:end]


def table(lines: list[str], header: str) -> dict[str, str]:
    """The first table whose first column is headed `header`: first cell (names) -> second."""
    rows: dict[str, str] = {}
    found = False
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not found:
            found = line.startswith("|") and cells[0] == header
            continue
        if not line.startswith("|"):
            break
        if set(cells[0]) <= set("-: "):
            continue
        for name in re.findall(r"`([^`]+)`", cells[0]):
            rows[name] = cells[1] if len(cells) > 1 else ""
    assert found, f"no table headed {header!r}"
    return rows


def documented_default(cell: str, name: str = "m") -> tuple[bool, Any]:
    """A default cell read as TOML (`"info"`, `8000`, `[]`), or (False, None) when it is prose."""
    text = cell.strip().strip("`").replace("<name>", name)
    try:
        return True, tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return False, None


def known_keys(text: str) -> set[str]:
    """The keys the config reader knows in the table that holds `zz_not_a_key`."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "feed.toml", {})
    match = re.search(r"known: ([^)]*)\)", str(info.value))
    assert match, str(info.value)
    return set(match.group(1).split(", "))


def config(text: str = "") -> Config:
    return parse_config(text + "\n" + MEMORY, "feed.toml", {})


@pytest.mark.parametrize(
    ("heading", "minimal"),
    [
        ("## `[server]`", "[server]\n"),
        ("## `[cluster]`", '[cluster]\nurl = "redis://127.0.0.1/0"\n'),
    ],
)
def test_configuration_md_tables_match_the_config_reader(heading: str, minimal: str) -> None:
    rows = table(section(DOCS / "configuration.md", heading), "key")
    assert set(rows) == known_keys(minimal + "zz_not_a_key = 1\n" + MEMORY)
    name = heading.strip("#` []")
    loaded = getattr(config(minimal), name)
    checked = 0
    for key, cell in rows.items():
        ok, value = documented_default(cell)
        if ok:
            assert getattr(loaded, key) == value, f"[{name}] {key}: docs say {cell}"
            checked += 1
    assert checked >= 3


def test_security_md_limits_block_matches_the_config_reader() -> None:
    """The block that lists "every limit, with its default" holds every [limits] key at it."""
    lines = section(DOCS / "security.md", "## Limits")
    start = lines.index("```toml") + 1
    block = tomllib.loads("\n".join(lines[start : lines.index("```", start)]))
    assert set(block["limits"]) == known_keys("[limits]\nzz_not_a_key = 1\n" + MEMORY)
    defaults = config()
    for key, value in block["limits"].items():
        assert getattr(defaults.limits, key) == value, f"[limits] {key}"
    for key, value in block["server"].items():
        assert getattr(defaults.server, key) == value, f"[server] {key}"


@pytest.mark.parametrize(
    "probe",
    [
        "[auth]\nzz_not_a_key = 1\n",
        '[auth]\nmode = "jwt"\n[auth.jwt]\nalgorithms = ["HS256"]\nsecret = "'
        + "s" * 32
        + '"\nzz_not_a_key = 1\n',
        '[[auth.tokens]]\nname = "a"\nsha256 = "' + "a" * 64 + '"\nzz_not_a_key = 1\n',
        '[[auth.rules]]\nallow = ["*"]\nzz_not_a_key = 1\n',
        '[[auth.masks]]\nfields = ["a"]\nzz_not_a_key = 1\n',
    ],
)
def test_every_auth_key_is_in_security_md(probe: str) -> None:
    text = (DOCS / "security.md").read_text(encoding="utf-8")
    for key in known_keys(probe + MEMORY) - {"tokens", "rules", "masks", "jwt"}:
        assert re.search(rf"(^|`| ){key}( =|`)", text, re.M), f"{key} is not in docs/security.md"


_THIRD = MEMORY + MEMORY.replace('"m"', '"m2"') + '[[connectors]]\nname = "c"\ntype = "redis"\n'
# A feed.toml each documented error line comes from (None: the file is missing).
ERROR_CASES: dict[str, str | bytes | None] = {
    "empty tables": '[[connectors]]\nname = "m"\ntype = "postgres"\ndsn = "postgresql://h/d"\n'
    "tables = []\n",
    "typo in [server]": "[server]\nprot = 8000\n" + MEMORY,
    "typo of a required key": '[[connectors]]\nname = "m"\ntype = "postgres"\n'
    'dsn = "postgresql://h/d"\ntabels = ["public.orders"]\n',
    "unset variable": MEMORY + '[[connectors]]\nname = "main"\ntype = "postgres"\n'
    'dsn = "${DATABASE_URL}"\ntables = ["public.orders"]\n',
    "missing file": None,
    "not a Redis URL": _THIRD + 'url = "http://h:6379/0"\npatterns = ["session:*"]\n',
    "bad pattern": _THIRD + 'url = "redis://h:6379/0"\npatterns = ["session:[ab"]\n',
    "two databases": _THIRD + 'url = "redis://h/0"\npatterns = ["s:*"]\ndb = 2\n',
    "a database by name": _THIRD + 'url = "redis://h:6379/cache"\npatterns = ["s:*"]\n',
    "no CA file": _THIRD
    + 'url = "rediss://h:6379/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/feed/ca.pem"\n'
    'patterns = ["s:*"]\n',
    "not UTF-8": b"[server]\nport = 8123\n# caf\xe9\n",
    "an infinite number": '[cluster]\nurl = "redis://h:6379/0"\nlease = inf\n',
    "a timeout in milliseconds": "[limits]\nrequest_timeout = 1e12\n" + MEMORY,
    "a newline from a secret file": '[[connectors]]\nname = "m"\ntype = "postgres"\n'
    'dsn = "postgresql://u:pw@h:5432/db\\n"\ntables = ["public.orders"]\n',
}


def test_the_documented_config_errors_are_the_ones_the_reader_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one-line errors the docs show, word for word ("…" ends a shortened line)."""
    monkeypatch.chdir(tmp_path)
    given = set()
    for text in ERROR_CASES.values():
        if isinstance(text, bytes):
            (tmp_path / "feed.toml").write_bytes(text)
        elif text is not None:
            (tmp_path / "feed.toml").write_text(text)
        else:
            (tmp_path / "feed.toml").unlink()
        with pytest.raises(ConfigError) as info:
            load_config("feed.toml", {}).build_connectors()
        given.add(f"feed: {info.value}")
    documented = [
        line
        for page in (DOCS / "configuration.md", DOCS / "connectors" / "redis.md")
        for line in page.read_text(encoding="utf-8").splitlines()
        if line.startswith("feed: feed.toml: ")
    ]
    assert len(documented) == len(given)
    for line in documented:
        if line.endswith("…)"):
            assert any(g.startswith(line.removesuffix("…)")) for g in given), line
        else:
            assert line in given, line


def test_memory_connector_keys_are_in_configuration_md() -> None:
    lines = "\n".join(section(DOCS / "configuration.md", "### `memory`"))
    for key in known_keys(MEMORY + "zz_not_a_key = 1\n"):
        assert f"`{key}" in lines, key


@pytest.mark.parametrize("kind", sorted(CONNECTORS))
def test_connector_page_tables_match_the_connector(kind: str) -> None:
    base = f'[[connectors]]\nname = "m"\ntype = "{kind}"\n{CONNECTORS[kind]}'
    rows = table(
        (DOCS / "connectors" / f"{kind}.md").read_text(encoding="utf-8").splitlines(), "key"
    )
    assert set(rows) == known_keys(base + "zz_not_a_key = 1\n")

    def state(text: str) -> dict[str, Any]:
        [connector] = parse_config(text, "feed.toml", {}).build_connectors()
        return {k: v for k, v in vars(connector).items() if isinstance(v, PRIMITIVE)}

    defaults = state(base)
    checked = 0
    for key, cell in rows.items():
        ok, value = documented_default(cell)
        if ok and key not in CONNECTORS[kind]:
            line = f"{key} = {_toml(value)}\n"
            assert state(base + line) == defaults, f"{kind}.{key}: docs say {cell}"
            checked += 1
    assert checked >= 5


# -- every number's range, as the reader states it and as the docs write it ---------------------

DOC_RANGE = re.compile(
    r"(\d[\d,]*(?:\.\d+)?)(?: (KiB|MiB|GiB))? to (\d[\d,]*(?:\.\d+)?)(?: (KiB|MiB|GiB))?"
)
UNITS = {None: 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def documented_range(text: str) -> tuple[float, float] | None:
    """The first `LOW to HIGH` in a docs cell or comment (`0.1 to 3600`, `16 KiB to 1 GiB`)."""
    match = DOC_RANGE.search(text)
    if match is None:
        return None
    low, low_unit, high, high_unit = match.groups()
    return (
        float(low.replace(",", "")) * UNITS[low_unit],
        float(high.replace(",", "")) * UNITS[high_unit],
    )


def stated_range(text_with: Any) -> tuple[float, float] | None:
    """The range the reader states refusing a huge number for a key (`text_with(value)` is a
    config setting the key to it), or None when the key is not a number. A number that takes
    a huge value has no range: that fails here."""
    answers = []
    for huge in ("1e300", "1000000000000000000"):
        try:
            parse_config(text_with(huge), "feed.toml", {}).build_connectors()
        except ConfigError as exc:
            answers.append(str(exc))
            match = re.search(r": must be from (\S+) to (\S+), not ", str(exc))
            if match:
                return float(match.group(1)), float(match.group(2))
        else:
            raise AssertionError(f"{text_with(huge)!r} is accepted: give the key a maximum")
    return None


def range_column(lines: list[str]) -> dict[str, str]:
    """The `| key | default | range | meaning |` table: each key's range cell."""
    header = next(line for line in lines if line.startswith("| key |"))
    names = [c.strip() for c in header.strip().strip("|").split("|")]
    assert "range" in names, f"no range column in {header!r}"
    at = names.index("range")
    cells = {}
    for line in lines[lines.index(header) + 2 :]:
        if not line.startswith("|"):
            break
        row = [c.strip() for c in line.strip().strip("|").split("|")]
        [key] = re.findall(r"`([^`]+)`", row[0])
        cells[key] = row[at]
    return cells


def _connector_table(kind: str) -> tuple[str, str, str]:
    heading = "## Configuration" if kind == "postgres" else "## Settings"
    return f"connectors/{kind}.md", heading, f'[[connectors]]\nname = "m"\ntype = "{kind}"\n'


RANGE_TABLES = [
    ("configuration.md", "## `[server]`", "[server]\n"),
    ("configuration.md", "## `[cluster]`", '[cluster]\nurl = "redis://127.0.0.1/0"\n'),
    *(_connector_table(kind) for kind in sorted(CONNECTORS)),
]


@pytest.mark.parametrize(("page", "heading", "base"), RANGE_TABLES, ids=lambda p: str(p)[:20])
def test_every_number_has_its_range_in_the_docs_table(page: str, heading: str, base: str) -> None:
    """Each number's range column says what the reader refuses past (`lease = 1e308` passed
    before), and a range written for a key that is no number, or a wrong one, fails here."""
    cells = range_column(section(DOCS / page, heading))
    required = CONNECTORS.get(page.removeprefix("connectors/").removesuffix(".md"), "")
    checked = 0
    for key, cell in cells.items():
        if f"{key} = " in base + required:  # required, and no number: url, dsn, tables, ...
            assert not cell, f"{page} {key}: not a number, but the docs give a range"
            continue
        stated = stated_range(
            lambda v, key=key: (
                base + required + f"{key} = {v}\n" + (MEMORY if "connectors" not in base else "")
            )
        )
        assert documented_range(cell) == stated, f"{page} {key}: docs say {cell!r}, reader {stated}"
        checked += stated is not None
    assert checked >= 4


def test_every_limit_and_the_leeway_have_their_range_in_security_md() -> None:
    """[limits] lives in security.md's block of every limit: each line's comment (with the lines
    that continue it) states the range the reader refuses past; the same for `leeway`."""
    lines = section(DOCS / "security.md", "## Limits")
    block = lines[lines.index("```toml") + 1 :]
    block = block[: block.index("```")]
    comments: dict[str, str] = {}
    key = ""
    for line in block:
        if line.startswith("["):
            key = ""
        elif re.match(r"\w+ = ", line):
            key = line.split(" = ")[0]
            comments[key] = line.partition("#")[2]
        elif key and line.lstrip().startswith("#"):
            comments[key] += " " + line.lstrip().lstrip("#")
    for key in known_keys("[limits]\nzz_not_a_key = 1\n" + MEMORY):
        stated = stated_range(lambda v, key=key: f"[limits]\n{key} = {v}\n" + MEMORY)
        assert stated is not None
        assert documented_range(comments[key]) == stated, f"[limits] {key}: {comments[key]!r}"
    text = (DOCS / "security.md").read_text(encoding="utf-8")
    [leeway] = re.findall(r"^leeway = 30 +#(.*)$", text, re.M)[:1]
    assert documented_range(leeway) == stated_range(lambda v: f"[auth]\nleeway = {v}\n" + MEMORY)


SAMPLE_ENV = {
    "DATABASE_URL": "postgresql://127.0.0.1/db",
    "MONGODB_URL": "mongodb://127.0.0.1/?replicaSet=rs0",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "FEED_CLUSTER_URL": "redis://127.0.0.1:6379/1",
    "JWT_SECRET": "s" * 32,
    "HOSTNAME": "node-1",
}


def _toml_samples() -> list[Any]:
    pages = [ROOT / "README.md", *sorted(DOCS.rglob("*.md")), ROOT / "examples" / "README.md"]
    samples = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for match in re.finditer(r"^```toml\n(.*?)^```", text, re.M | re.S):
            line = text.count("\n", 0, match.start()) + 1
            where = f"{page.relative_to(ROOT)}:{line}"
            samples.append(pytest.param(where, match.group(1), id=where))
    return samples


@pytest.mark.parametrize(("where", "sample"), _toml_samples())
def test_every_toml_sample_in_the_docs_is_a_config_the_reader_accepts(
    where: str, sample: str
) -> None:
    """A user copies these: each must load (with `${VAR}` set, `"..."` a placeholder for a hash),
    alone or, when it has no `[[connectors]]`, beside one."""
    raw = tomllib.loads(sample)
    if "project" in raw:  # a connector package's pyproject.toml, not a feed.toml
        return
    text = sample.replace('"..."', '"' + "a" * 64 + '"')
    if "connectors" not in raw:
        text += "\n" + MEMORY
    try:
        parse_config(text, where, SAMPLE_ENV)
    except ConfigError as exc:  # a third-party type is an import path this checkout lacks
        assert "cannot import 'mycompany." in str(exc), str(exc)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def _sources() -> list[ast.Module]:
    files = [*(ROOT / "feed").rglob("*.py"), *(ROOT / "connectors").rglob("*.py")]
    return [ast.parse(f.read_text(encoding="utf-8")) for f in files]


def _first_arg_strings(names: set[str]) -> set[str]:
    """String constants passed first to calls of these functions or methods."""
    found: set[str] = set()
    for tree in _sources():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if name in names and isinstance(first, ast.Constant) and isinstance(first.value, str):
                found.add(first.value)
    return found


def test_every_metric_is_documented_and_every_documented_metric_exists() -> None:
    exported = {
        m for m in _first_arg_strings({"inc", "describe", "counter"}) if m.startswith("feed_")
    }
    for tree in _sources():  # gauges: ("feed_name", labels, value) tuples read at scrape time
        for node in ast.walk(tree):
            if isinstance(node, ast.Tuple) and len(node.elts) == 3:
                first = node.elts[0]
                if isinstance(first, ast.Constant) and str(first.value).startswith("feed_"):
                    exported.add(str(first.value))
    text = (DOCS / "operations.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `(feed_[a-z_]+)` \|", text, re.M))
    assert exported == documented


def test_every_capture_fault_kind_is_documented_and_back() -> None:
    """`feed_capture_faults_total{kind}`: the kinds docs/operations.md lists are the ones the
    connectors count (a column change was announced as a gap but counted under no kind)."""
    counted: set[str] = set()
    for path in (ROOT / "connectors").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            # the logical reader's `self.gap_kind = "..."`, counted with its pending gap
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Constant)
                and any(isinstance(t, ast.Attribute) and t.attr == "gap_kind" for t in node.targets)
            ):
                counted.add(str(node.value.value))
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            # count_fault(kind); the partition watch's _gap(kind, ...); CaptureFault(target, kind,
            # ...), each counted by kind when the running connector announces it.
            at = {"count_fault": 0, "_gap": 0, "CaptureFault": 1}.get(name)
            if at is not None and len(node.args) > at:
                kind = node.args[at]
                if isinstance(kind, ast.Constant) and isinstance(kind.value, str):
                    counted.add(kind.value)
    counted.discard("not_attached")  # `feed check`'s own verdict, never counted
    [row] = [
        line
        for line in section(DOCS / "operations.md", "### Capture metrics")
        if line.startswith("| `feed_capture_faults_total` |")
    ]
    meaning = row.strip().strip("|").split("|")[-1]
    assert counted == set(re.findall(r"`([a-z_]+)`", meaning))


def test_readyz_cluster_object_fields_are_documented() -> None:
    """Every field of `/readyz`'s `cluster` object (the engine's `describe()`) is named in
    docs/operations.md's health table, and every field named there is one it has."""
    tree = ast.parse((ROOT / "feed" / "engine" / "redis.py").read_text(encoding="utf-8"))
    [describe] = [
        n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "describe"
    ]
    fields = {
        key.value
        for node in ast.walk(describe)
        if isinstance(node, ast.Dict)
        for key in node.keys
        if isinstance(key, ast.Constant) and isinstance(key.value, str)
    }
    [row] = [
        line
        for line in section(DOCS / "operations.md", "## Health endpoints")
        if line.startswith("| `GET /readyz` |")
    ]
    match = re.search(r"a `cluster` object \(([^)]*)\)", row)
    assert match, row
    assert fields == set(re.findall(r"`([a-z_]+)`", match.group(1)))


def test_every_error_code_the_server_sends_is_documented_and_back() -> None:
    sent = _first_arg_strings({"ProtocolError", "AuthError"})
    for tree in _sources():  # {"ok": False, "code": "..."} answers between cluster nodes
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    if (
                        isinstance(key, ast.Constant)
                        and key.value == "code"
                        and isinstance(value, ast.Constant)
                    ):
                        sent.add(str(value.value))
    protocol = table(section(DOCS / "protocol.md", "### Error codes"), "code")
    auth = table(section(DOCS / "security.md", "## Connecting with a token"), "code")
    assert sent == set(protocol) | set(auth)


COMMAND = re.compile(r"\bfeed (serve|check|migrate|unwatch|demo|hash-token)\b([^`#|\n]*)")


def test_every_option_the_docs_give_a_command_exists() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    pages = [ROOT / "README.md", *DOCS.rglob("*.md"), ROOT / "examples" / "README.md"]
    seen = 0
    for page in pages:
        for command, rest in COMMAND.findall(page.read_text(encoding="utf-8")):
            options = {s for a in commands[command]._actions for s in a.option_strings}
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", rest):
                assert flag in options, f"{page.name}: feed {command} has no {flag}"
                seen += 1
    assert seen >= 10


def test_the_client_options_in_clients_md_are_the_libraries_options() -> None:
    """The JavaScript options table is `FeedClientOptions` (clients/js/index.d.ts), and the
    Python signature docs/clients.md gives is `FeedClient`'s, parameter for parameter."""
    import inspect

    from dbfeed_client import FeedClient

    lines = section(DOCS / "clients.md", "## JavaScript")
    declared = (ROOT / "clients" / "js" / "index.d.ts").read_text(encoding="utf-8")
    body = re.search(r"interface FeedClientOptions \{(.*?)\n\}", declared, re.S)
    assert body, "no FeedClientOptions in index.d.ts"
    options = set(re.findall(r"^  (\w+)\??:", body.group(1), re.M))
    assert set(table(lines, "option")) == options
    text = "\n".join(section(DOCS / "clients.md", "## Python"))
    match = re.search(r"`FeedClient\(url, \*, ([^`]*)\)`", text)
    assert match, "no FeedClient(...) signature in docs/clients.md"
    documented = dict(part.split("=", 1) for part in re.split(r",\s*(?=\w+=)", match.group(1)))
    parameters = inspect.signature(FeedClient).parameters
    assert set(documented) == set(parameters) - {"url"}
    for name, default in documented.items():
        assert repr(parameters[name].default) == default.replace('"', "'"), name


def test_every_bench_command_the_docs_give_exists_with_its_options() -> None:
    """`python -m bench.idle --cpu 50 10000` and the like: the module answers `--help` (bench.idle
    read its arguments by hand, and `--help` was a traceback) and has each option shown."""
    import subprocess
    import sys

    pages = [ROOT / "README.md", *DOCS.rglob("*.md")]
    shown: dict[str, set[str]] = {}
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for module, rest in re.findall(r"python -m (bench(?:\.\w+)?)\b([^`|\n)]*)", text):
            flags = shown.setdefault(module, set())
            flags.update(re.findall(r"(?<![\w-])--[a-z][a-z-]*", rest))
    assert "bench.idle" in shown
    for module, flags in sorted(shown.items()):
        done = subprocess.run(
            [sys.executable, "-m", module, "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0 and "usage:" in done.stdout, (module, done.stderr[-500:])
        for flag in flags:
            assert flag in done.stdout, f"python -m {module} has no {flag}"


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to '-'."""
    anchors: set[str] = set()
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        fenced ^= line.startswith("```")
        if not fenced and line.startswith("#"):
            title = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower())
            anchors.add(title.replace(" ", "-"))
    return anchors


def test_every_link_between_the_docs_resolves() -> None:
    pages = [
        ROOT / "README.md",
        *DOCS.rglob("*.md"),
        *(ROOT / "clients").glob("*/README.md"),
        ROOT / "examples" / "README.md",
    ]
    broken = []
    for page in pages:
        for link in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if link.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            if not target.exists():
                broken.append(f"{page.relative_to(ROOT)}: {link}")
            elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
                broken.append(f"{page.relative_to(ROOT)}: {link} (no such heading)")
    assert not broken


def test_the_readme_lists_every_doc() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for page in DOCS.rglob("*.md"):
        assert f"({page.relative_to(ROOT)})" in readme, f"README.md does not link {page.name}"


def test_every_test_the_docs_name_exists() -> None:
    """Docs cite tests as evidence ("tested by test_x"); a renamed or deleted test must not linger."""
    defined: set[str] = set()
    for path in (ROOT / "tests").rglob("*.py"):
        defined.add(path.stem)
        defined.update(re.findall(r"def (test_\w+)", path.read_text(encoding="utf-8")))
    pages = [ROOT / "README.md", *DOCS.rglob("*.md"), ROOT / "examples" / "README.md"]
    missing = []
    for page in pages:
        for name, prefix in re.findall(r"\b(test_\w+?)(_?\.\.\.)?(?!\w)", page.read_text()):
            found = any(d.startswith(name) for d in defined) if prefix else name in defined
            if not found:
                missing.append(f"{page.name}: {name}{prefix}")
    assert not missing


def _section_names(page: Path) -> list[str]:
    """A page's headings and bold paragraph leads (`**Load balancer.**`), lower case, no backticks."""
    names: list[str] = []
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        fenced ^= line.startswith("```")
        if fenced:
            continue
        if line.startswith("#"):
            names.append(line.lstrip("#").strip())
        names += re.findall(r"^\s*(?:- )?\*\*([^*]+)\*\*", line)
    return [name.replace("`", "").lower() for name in names]


def test_every_section_the_docs_name_in_quotes_exists() -> None:
    """Prose names sections too: `see "Refused connections" below`, `docs/operations.md, "Several
    nodes"`. A heading or bold lead renamed must not leave those pointing at nothing."""
    pages = [
        ROOT / "README.md",
        *DOCS.rglob("*.md"),
        *(ROOT / "clients").glob("*/README.md"),
        ROOT / "examples" / "README.md",
    ]
    broken = []
    for page in pages:
        text = re.sub(r"\s+", " ", page.read_text(encoding="utf-8"))
        named = [(page, n) for n in re.findall(r'"([^"]{3,80})" (?:below|above)', text)]
        for doc, name in re.findall(r'((?:docs/)?[a-z_/]+\.md),? "([^"]{3,80})"', text):
            target = next(
                (p for p in (ROOT / doc, DOCS / doc, page.parent / doc) if p.exists()), None
            )
            if target is None:
                broken.append(f"{page.relative_to(ROOT)}: {doc} (no such page)")
                continue
            named.append((target, name))
        for target, name in named:
            wanted = name.replace("`", "").lower().rstrip(".,")
            if not any(s.startswith(wanted) for s in _section_names(target)):
                broken.append(f"{page.relative_to(ROOT)}: {name!r} is no section of {target.name}")
    assert not broken


def test_the_client_libraries_own_error_codes_agree_with_the_docs() -> None:
    """The codes the libraries give a connection's error themselves: the same list in the
    TypeScript declarations, docs/clients.md and both READMEs, each one made by both libraries."""
    typings = (ROOT / "clients" / "js" / "index.d.ts").read_text(encoding="utf-8")
    union = re.search(r"export type ClientErrorCode = ([^;]+);", typings)
    assert union, "index.d.ts has no ClientErrorCode"
    codes = set(re.findall(r'"(\w+)"', union.group(1)))
    clients = re.sub(r"\s+", " ", (DOCS / "clients.md").read_text(encoding="utf-8"))
    listed = re.search(r"The codes the libraries give themselves are (.*?); any other", clients)
    assert listed, "docs/clients.md does not list the libraries' own codes"
    assert set(re.findall(r"`(\w+)`", listed.group(1))) == codes
    js = (ROOT / "clients" / "js" / "index.js").read_text(encoding="utf-8")
    python = "".join(
        p.read_text(encoding="utf-8") for p in (ROOT / "clients" / "python").rglob("*.py")
    )
    for code in codes:
        assert f'"{code}"' in js, f"clients/js/index.js never gives {code}"
        assert f'"{code}"' in python, f"dbfeed_client never gives {code}"
        for readme in (ROOT / "clients").glob("*/README.md"):
            assert f"`{code}`" in readme.read_text(encoding="utf-8"), f"{readme} lacks {code}"
