"""deploy/prometheus/alerts.yml against reality, not against a list of names.

Every series and label the rules read is in the /metrics of a real `feed serve` (a cluster node
reading Postgres in both modes and Redis in both modes); for the alerts that matter most, the
real condition is driven (the source taken down, Redis's keyspace flags cleared, a slot held
back) and the series the rule reads moves as the rule expects. With promtool installed (Debian's
`prometheus` package), the rules are then evaluated over the very scrapes the test took: one
scrape stands for one minute of Prometheus's clock (time is compressed, values are not made up).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml

from tests.support.cluster import FeedNode
from tests.support.postgres import (
    EmbeddedPostgres,
    PgDatabase,
    PgServer,
    create_database,
    start_embedded,
)
from tests.support.redis import RedisTarget, open_private_redis
from tests.support.server import FeedClient, feed_client

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
DOCS = ROOT / "docs" / "operations.md"
PROMTOOL = shutil.which("promtool")
WAIT = 30.0
PROMETHEUS_SERIES = {"up"}
"""Series Prometheus makes itself, not the feed."""
TARGET_LABELS = {"job", "instance"}
"""Labels Prometheus puts on every series it scrapes."""
TARGET = (("instance", "feed:8000"), ("job", "feed"))

Labels = tuple[tuple[str, str], ...]
Series = tuple[str, Labels]
Scrape = dict[Series, float]


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\b(feed_[a-z_]+)\b", expr))
    return names | {name for name in PROMETHEUS_SERIES if re.search(rf"\b{name}\s*\{{", expr)}


def labels_read(rule: dict[str, Any]) -> set[str]:
    """Labels the expression selects or groups by, and those its annotations show."""
    expr = rule["expr"]
    found: set[str] = set()
    for selector in re.findall(r"\{([^}]*)\}", expr):
        found |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector))
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        found |= {label.strip() for label in group.split(",") if label.strip()}
    for text in rule.get("annotations", {}).values():
        found |= set(re.findall(r"\$labels\.(\w+)", str(text)))
    return found


def parse(text: str) -> tuple[Scrape, set[str]]:
    """A /metrics body: its samples, and the names it declares (`# TYPE`)."""
    samples: Scrape = {}
    declared: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            declared.add(line.split()[2])
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        assert match, f"not a Prometheus sample line: {line!r}"
        labels = tuple(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        samples[(match.group(1), labels)] = float(match.group(3))
    return samples, declared


@dataclass
class Recording:
    """Every scrape a test took of one node, in order: the input the rules are evaluated on."""

    url: str
    scrapes: list[Scrape] = field(default_factory=list)
    declared: set[str] = field(default_factory=set)

    async def take(self) -> Scrape:
        async with (
            aiohttp.ClientSession() as http,
            http.get(self.url + "/metrics", timeout=aiohttp.ClientTimeout(total=5)) as response,
        ):
            assert response.status == 200
            samples, declared = parse(await response.text())
        self.scrapes.append(samples)
        self.declared |= declared
        return samples

    async def until(self, holds: Callable[[Scrape], bool], what: str) -> Scrape:
        """Scrape until `holds` (a metric has no event to await), each scrape recorded."""
        try:
            async with asyncio.timeout(WAIT):
                while not holds(scrape := await self.take()):  # noqa: ASYNC110 - no event
                    await asyncio.sleep(0.1)
                return scrape
        except TimeoutError:
            raise AssertionError(f"timed out after {WAIT}s waiting for {what}") from None

    async def hold(self, holds: Callable[[Scrape], bool], what: str, scrapes: int = 4) -> None:
        """`scrapes` more scrapes, each still showing the condition (it lasts, as `for:` asks)."""
        for _ in range(scrapes):
            await asyncio.sleep(0.1)
            assert holds(await self.take()), f"{what} did not last"

    @property
    def last(self) -> int:
        """The index of the last scrape: its minute on the evaluation clock."""
        return len(self.scrapes) - 1


def value(scrape: Scrape, name: str, **labels: str) -> float | None:
    return scrape.get((name, tuple(sorted(labels.items()))))


# -- the stack: one cluster node reading Postgres (both modes) and Redis (both modes) ----------

CONFIG = """
[server]
filter_room_grace = 0.5

[cluster]
url = "{cluster_url}"
prefix = "alerts"
lease = 1
node = "${{FEED_NODE}}"

[[connectors]]
name = "notify"
type = "postgres"
dsn = "{dsn}"
tables = ["public.orders"]
auto_migrate = true
capture_check_interval = 0.2
heartbeat_interval = 0.5
heartbeat_timeout = 1.0
reconnect_max = 0.5

[[connectors]]
name = "logical"
type = "postgres"
mode = "logical"
dsn = "{dsn}"
tables = ["public.orders"]
auto_migrate = true
poll_interval = 0.02
capture_check_interval = 0.2
heartbeat_interval = 0.5
heartbeat_timeout = 1.0
reconnect_max = 0.5

[[connectors]]
name = "keyspace"
type = "redis"
url = "{redis_url}"
patterns = ["k:*"]
capture_check_interval = 0.2
health_check_interval = 0.5

[[connectors]]
name = "streams"
type = "redis"
mode = "streams"
url = "{redis_url}"
patterns = ["s:events"]
capture_check_interval = 0.2
health_check_interval = 0.5
"""
CONNECTORS = ("notify", "logical", "keyspace", "streams")


@dataclass
class Stack:
    node: FeedNode
    postgres: EmbeddedPostgres
    db: PgDatabase
    redis: RedisTarget
    metrics: Recording


@asynccontextmanager
async def feed_stack(tmp_path: Path) -> AsyncIterator[Stack]:
    """`feed serve` as a process, on a Postgres (wal_level logical) and a Redis of its own (both
    are taken down or reconfigured by the tests), ready before it is handed over."""
    postgres = await asyncio.to_thread(start_embedded)
    try:
        db = await create_database(PgServer(postgres.url(), postgres))
        try:
            await db.conn.execute("CREATE TABLE public.orders (id int PRIMARY KEY, note text)")
            async with open_private_redis("--notify-keyspace-events", "KEA") as redis:
                server = redis.server
                assert server is not None
                config = tmp_path / "feed.toml"
                config.write_text(
                    CONFIG.format(cluster_url=server.url(1), dsn=db.url, redis_url=server.url(0))
                )
                node = FeedNode("alerts", config)
                await node.start()
                try:
                    await node.wait_ready()
                    stack = Stack(node, postgres, db, redis, Recording(node.url))
                    await stack.metrics.until(healthy, "every connector up")
                    yield stack
                finally:
                    await node.stop()
        finally:
            if not db.conn.is_closed():
                await db.conn.close()
    finally:
        await asyncio.to_thread(postgres.close)


def healthy(scrape: Scrape) -> bool:
    """Every connector up, capture whole where it is checked, the slot measured."""
    return (
        all(value(scrape, "feed_connector_up", connector=c) == 1 for c in CONNECTORS)
        and value(scrape, "feed_capture_ok", connector="notify") == 1
        and value(scrape, "feed_capture_ok", connector="keyspace") == 1
        and value(scrape, "feed_postgres_slot_retained_wal_bytes", connector="logical") is not None
        and value(scrape, "feed_postgres_journal_rows", connector="notify") is not None
    )


async def subscribed(client: FeedClient, room: str) -> None:
    ack = await client.subscribe(room)
    assert ack["ok"], ack


# -- promtool: the rules evaluated over the scrapes -----------------------------------------------


def series_text(series: Series) -> str:
    name, labels = series
    inner = ",".join(f'{k}="{v}"' for k, v in sorted((*labels, *TARGET)))
    return f"{name}{{{inner}}}"


def evaluate(
    recording: Recording,
    tmp_path: Path,
    expect: list[tuple[int, str, list[dict[str, str]]]],
    rewrite: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """`promtool test rules` over the recorded scrapes (scrape i at minute i; a series missing
    from a scrape is missing there too). `expect`: (scrape index, alert, the label sets of the
    alerts firing then: the series' labels, the target's and the severity). Annotations are
    left out of the copy evaluated (promtool compares them whole; `check rules` checks them).
    `rewrite`: a change to the copy's rules, said where it is used."""
    if PROMTOOL is None:
        pytest.skip(
            "promtool is not installed (Debian: apt-get install prometheus): the series moved "
            "as the rules read them; the rules themselves were not evaluated"
        )
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    for group in document["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
            if rewrite is not None:
                rewrite(rule)
    rules_copy = tmp_path / "alerts.yml"
    rules_copy.write_text(yaml.safe_dump(document), encoding="utf-8")
    every = sorted({series for scrape in recording.scrapes for series in scrape})
    values = {
        series: " ".join(
            repr(scrape[series]) if series in scrape else "_" for scrape in recording.scrapes
        )
        for series in every
    }
    test = {
        "rule_files": [str(rules_copy)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": series_text(series), "values": values[series]} for series in every
                ],
                "alert_rule_test": [
                    {
                        "eval_time": f"{minute}m",
                        "alertname": alert,
                        "exp_alerts": [
                            {"exp_labels": {**dict(TARGET), **labels}} for labels in firing
                        ],
                    }
                    for minute, alert, firing in expect
                ],
            }
        ],
    }
    path = tmp_path / "test.yml"
    path.write_text(yaml.safe_dump(test), encoding="utf-8")
    result = subprocess.run(
        [PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def quiet(minute: int) -> list[tuple[int, str, list[dict[str, str]]]]:
    """At `minute`, no alert at all fires."""
    return [(minute, rule["alert"], []) for rule in rules()]


# -- the file itself ------------------------------------------------------------------------------


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for a Markdown file's headings."""
    found = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def test_every_rule_says_how_long_how_bad_and_what_to_do() -> None:
    names = [rule["alert"] for rule in rules()]
    assert len(names) == len(set(names)), names
    documented = set(re.findall(r"^\| `(Feed\w+)` \|", DOCS.read_text(encoding="utf-8"), re.M))
    assert documented == set(names), "docs/operations.md's alert table lists every alert"
    known = anchors(DOCS)
    for rule in rules():
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", str(rule["for"])), f"{name}: for"
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        notes = rule["annotations"]
        assert notes["summary"] and len(notes["description"]) > 60, name
        page, _, anchor = notes["runbook"].partition("#")
        assert (ROOT / page).is_file() and anchor in known, f"{name}: runbook {notes['runbook']}"


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: prometheus)")
def test_promtool_accepts_the_rules_and_the_scrape_config() -> None:
    """Syntax, PromQL and templates; the config loads the rules beside it."""
    assert PROMTOOL is not None
    for args in (["rules", str(RULES)], ["config", str(RULES.parent / "prometheus.yml")]):
        result = subprocess.run(
            [PROMTOOL, "check", *args], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr


# -- a real server's /metrics -------------------------------------------------------------------


async def test_every_series_and_label_the_rules_read_is_in_real_metrics(tmp_path: Path) -> None:
    """The names and labels of every expression, against what a cluster node reading Postgres
    in both modes and Redis in both modes exposes, with a client subscribed and one capture
    fault (so that the event counters, which appear at their first event, appear)."""
    async with feed_stack(tmp_path) as stack, feed_client(stack.node.url) as client:
        metrics = stack.metrics
        await subscribed(client, "keyspace:k:*")
        await stack.redis.admin.config_set("notify-keyspace-events", "")
        await metrics.until(
            lambda s: (
                value(s, "feed_capture_faults_total", connector="keyspace", kind="keyspace_flags")
                is not None
            ),
            "a capture fault counted",
        )
        await stack.redis.admin.config_set("notify-keyspace-events", "KEA")
        await metrics.until(healthy, "capture whole again")
        # A request that is not HTTP: one `feed_client_errors_total{kind}`.
        _, writer = await asyncio.open_connection("127.0.0.1", stack.node.port)
        writer.write(b"\x16\x03\x01 not http\r\n\r\n")
        await writer.drain()
        await metrics.until(
            lambda s: any(name == "feed_client_errors_total" for name, _ in s), "a client error"
        )
        writer.close()

    labels_of: dict[str, set[frozenset[str]]] = {}
    for scrape in metrics.scrapes:
        for name, labels in scrape:
            labels_of.setdefault(name, set()).add(frozenset(k for k, _ in labels))
    for rule in rules():
        name = rule["alert"]
        read = metric_names(rule["expr"])
        assert read, f"{name} reads no metric"
        ours = read - PROMETHEUS_SERIES
        for metric in ours:
            assert metric in metrics.declared, f"{name}: {metric} is not in /metrics"
            assert metric in labels_of, f"{name}: {metric} had no sample in any scrape"
        for label in labels_read(rule) - TARGET_LABELS:
            for metric in ours:
                assert all(label in keys for keys in labels_of[metric]), (
                    f"{name}: {metric} has no label {label!r} ({labels_of[metric]})"
                )
        # Two metrics compared one to one must carry the same labels.
        assert len({frozenset().union(*labels_of[m]) for m in ours}) <= 1, name

    # Counters `increase()` reads are there, at 0, before their first event: a series that
    # first appears at 1 is one sample, and the rule never sees the first gap.
    first = metrics.scrapes[0]
    for connector in CONNECTORS:
        assert value(first, "feed_gaps_total", connector=connector) == 0, connector
        assert value(first, "feed_connector_restarts_total", connector=connector) == 0
    assert value(first, "feed_slow_clients_cut_total") == 0
    for reason in ("identity", "total"):
        assert value(first, "feed_rooms_refused_total", reason=reason) == 0


# -- the real conditions -------------------------------------------------------------------------


async def test_a_source_taken_down_fires_connector_down_and_its_return_ends_it(
    tmp_path: Path,
) -> None:
    async with feed_stack(tmp_path) as stack:
        metrics = stack.metrics
        await metrics.hold(healthy, "health")
        calm = metrics.last
        await stack.db.conn.close()
        await asyncio.to_thread(stack.postgres.stop)

        def postgres_down(scrape: Scrape) -> bool:
            return all(
                value(scrape, "feed_connector_up", connector=c) == 0 for c in ("notify", "logical")
            )

        await metrics.until(postgres_down, "both Postgres connectors down")
        down = metrics.last
        await metrics.hold(postgres_down, "Postgres down", scrapes=3)
        assert all(
            value(metrics.scrapes[-1], "feed_connector_up", connector=c) == 1
            for c in ("keyspace", "streams")
        ), "the Redis connectors are not touched"
        restarts = value(metrics.scrapes[-1], "feed_connector_restarts_total", connector="notify")
        assert restarts is not None and restarts > 0, "the reconnects are counted"
        still_down = metrics.last
        await asyncio.to_thread(stack.postgres.start)
        await metrics.until(healthy, "both Postgres connectors up again")
        await metrics.hold(healthy, "health after the return", scrapes=2)
        back = metrics.last

    def down_alerts(*connectors: str) -> list[dict[str, str]]:
        return [{"connector": c, "severity": "critical"} for c in connectors]

    evaluate(
        metrics,
        tmp_path,
        [
            *quiet(calm),
            (down, "FeedConnectorDown", []),  # `for: 1m`: pending at first
            (still_down, "FeedConnectorDown", down_alerts("logical", "notify")),
            # The node keeps reading (retrying) the connectors: one reader each, as before.
            (still_down, "FeedClusterReaders", []),
            (back, "FeedConnectorDown", []),
        ],
    )


async def test_keyspace_flags_cleared_fire_the_gap_and_capture_alerts(tmp_path: Path) -> None:
    """The gap is counted (the first gap too), the fault counted by kind, capture_ok goes 0
    while it stands, and the connector is down; all back once the flags are."""
    async with feed_stack(tmp_path) as stack, feed_client(stack.node.url) as client:
        metrics = stack.metrics
        await subscribed(client, "keyspace:k:*")
        await metrics.hold(healthy, "health")
        calm = metrics.last
        await stack.redis.admin.config_set("notify-keyspace-events", "")
        gap = await client.next_gap(timeout=WAIT)
        assert gap["connector"] == "keyspace", gap

        def stopped(scrape: Scrape) -> bool:
            return (
                value(scrape, "feed_capture_ok", connector="keyspace") == 0
                and value(scrape, "feed_connector_up", connector="keyspace") == 0
                and (value(scrape, "feed_gaps_total", connector="keyspace") or 0) >= 1
                and (
                    value(
                        scrape,
                        "feed_capture_faults_total",
                        connector="keyspace",
                        kind="keyspace_flags",
                    )
                    or 0
                )
                >= 1
            )

        await metrics.until(stopped, "the fault in capture_ok, connector_up, gaps and faults")
        fault = metrics.last
        await metrics.hold(stopped, "the standing fault", scrapes=3)
        standing = metrics.last
        await stack.redis.admin.config_set("notify-keyspace-events", "KEA")
        await metrics.until(healthy, "capture whole again")
        back = metrics.last

    keyspace = {"connector": "keyspace"}
    evaluate(
        metrics,
        tmp_path,
        [
            *quiet(calm),
            (fault, "FeedGapsAnnounced", [{**keyspace, "severity": "warning"}]),
            (
                fault,
                "FeedCaptureInterrupted",
                [{**keyspace, "kind": "keyspace_flags", "severity": "warning"}],
            ),
            (standing, "FeedCaptureStopped", [{**keyspace, "severity": "critical"}]),
            (standing, "FeedConnectorDown", [{**keyspace, "severity": "critical"}]),
            (back, "FeedCaptureStopped", []),
            (back, "FeedConnectorDown", []),
        ],
    )


async def test_a_slot_held_back_grows_the_retained_wal_the_alert_reads(tmp_path: Path) -> None:
    """A transaction left open after a write keeps the slot's restart point where it began
    (logical decoding needs its changes): the WAL written meanwhile is retained, and the gauge
    grows by it."""
    async with feed_stack(tmp_path) as stack:
        metrics = stack.metrics
        db = stack.db
        await metrics.hold(healthy, "health")
        calm = metrics.last
        before = value(
            metrics.scrapes[-1], "feed_postgres_slot_retained_wal_bytes", connector="logical"
        )
        assert before is not None
        holder = await asyncpg.connect(db.url, timeout=10)
        try:
            await holder.execute("BEGIN")
            await holder.execute("INSERT INTO orders VALUES (1, 'held open')")
            for n in range(4):  # four 16 MB segments
                await db.conn.execute(f"INSERT INTO orders VALUES ({n + 2}, 'wal')")
                await db.conn.execute("SELECT pg_switch_wal()")
            await db.conn.execute("CHECKPOINT")
            grown = before + 48 * 1024 * 1024

            def held(scrape: Scrape) -> bool:
                retained = value(
                    scrape, "feed_postgres_slot_retained_wal_bytes", connector="logical"
                )
                return retained is not None and retained > grown

            await metrics.until(held, "the retained WAL to grow by the segments written")
            await metrics.hold(held, "the held slot", scrapes=16)
            peak = metrics.last
        finally:
            await holder.execute("ROLLBACK")
            await holder.close()

    # The threshold is a share of a real disk (20 GiB); the copy evaluated puts it between the
    # two figures measured, to evaluate the expression (name, labels, `for: 15m`) as written.
    threshold = (before + grown) / 2

    def lower(rule: dict[str, Any]) -> None:
        if rule["alert"] == "FeedSlotRetainsWal":
            assert "> 20 * 1024 * 1024 * 1024" in rule["expr"], rule["expr"]
            rule["expr"] = rule["expr"].replace("20 * 1024 * 1024 * 1024", repr(threshold))

    evaluate(
        metrics,
        tmp_path,
        [
            *quiet(calm),
            (peak, "FeedSlotRetainsWal", [{"connector": "logical", "severity": "critical"}]),
        ],
        rewrite=lower,
    )
