"""The compose stack and the Dockerfile, checked without a Docker engine.

Debian's docker-compose parses, interpolates and validates docker-compose.yml (`config`) with no
engine; these tests read what it resolved and assert what `docker compose up` depends on: start
order by healthchecks, named volumes, Redis keyspace events, a Mongo replica set, the feed's
config parsing with the environment compose gives it. The Dockerfile's install steps themselves
run in CI (.ci/verify-dockerfile-steps.sh); here its shape is checked and its steps parsed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from feed.app.config import load_config
from feed.demo.demo_writer import MONGODB_WATCH, POSTGRES_TABLES, REDIS_PATTERNS, SCHEMA_SQL

ROOT = Path(__file__).parent.parent
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"


def docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail(
            "docker-compose is missing: .ci/run installs it (apt-get install docker-compose)"
        )
    pytest.skip("docker-compose is not installed (apt-get install docker-compose)")


def compose_config(
    *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    # Only the variables compose needs, so a developer's own .env or shell does not leak in.
    base = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(
        [docker_compose(), *extra, "-f", str(COMPOSE), "--project-directory", str(ROOT), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    result = compose_config("--env-file", str(ENV_EXAMPLE))
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def test_compose_file_is_valid_and_has_every_service(stack: dict[str, Any]) -> None:
    assert set(stack["services"]) == {
        *("postgres", "mongo", "redis", "feed", "lb", "writer"),
        "prometheus",
    }


def test_prometheus_is_optional_and_loads_the_alerting_rules(stack: dict[str, Any]) -> None:
    """`docker compose up` alone leaves it out; with the profile it scrapes the replicas with
    deploy/prometheus/ (its rules are checked in tests/test_alert_rules.py)."""
    prometheus = stack["services"]["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    [mount] = prometheus["volumes"]
    assert mount.split(":")[:2] == [str(ROOT / "deploy" / "prometheus"), "/etc/prometheus"]
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    [job] = config["scrape_configs"]
    assert job["job_name"] == "feed"
    assert job["dns_sd_configs"] == [{"names": ["feed"], "type": "A", "port": 8000}]
    assert prometheus["depends_on"] == {"feed": {"condition": "service_healthy"}}


def test_sources_have_healthchecks_and_named_volumes(stack: dict[str, Any]) -> None:
    services = stack["services"]
    for name in ("postgres", "mongo", "redis", "feed"):
        check = services[name].get("healthcheck")
        assert check and check["test"], f"{name} has no healthcheck"
        assert check.get("interval") and check.get("retries"), name
    named = set(stack["volumes"])
    for name, mount in (
        ("postgres", "/var/lib/postgresql/data"),
        ("mongo", "/data/db"),
        ("redis", "/data"),
    ):
        volumes = [str(v) for v in services[name]["volumes"]]
        source = next(v.split(":")[0] for v in volumes if v.split(":")[1] == mount)
        assert source in named, f"{name} keeps {mount} in {source}, not a named volume"


def test_start_order_is_enforced_by_health(stack: dict[str, Any]) -> None:
    services = stack["services"]
    assert services["feed"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "mongo": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
    }
    # The writer waits for a ready feed, so its first changes are already captured.
    assert services["writer"]["depends_on"] == {"feed": {"condition": "service_healthy"}}
    assert "readyz" in " ".join(services["feed"]["healthcheck"]["test"])


def test_sources_are_configured_for_capture(stack: dict[str, Any]) -> None:
    services = stack["services"]
    redis_command = services["redis"]["command"]
    flags = redis_command[redis_command.index("--notify-keyspace-events") + 1]
    assert "K" in flags and ("A" in flags or "g" in flags), flags

    mongo_command = services["mongo"]["command"]
    assert "--replSet" in mongo_command
    replica_set = mongo_command[mongo_command.index("--replSet") + 1]
    initiate = " ".join(services["mongo"]["healthcheck"]["test"])
    assert "rs.initiate" in initiate and f'_id: "{replica_set}"' in initiate
    assert f"replicaSet={replica_set}" in services["feed"]["environment"]["MONGODB_URL"]

    init_mounts = [v for v in services["postgres"]["volumes"] if "docker-entrypoint-initdb.d" in v]
    assert init_mounts, "the demo tables must exist before `feed migrate` attaches to them"


def test_feed_is_built_here_migrates_then_serves(stack: dict[str, Any]) -> None:
    feed = stack["services"]["feed"]
    assert Path(feed["build"]["context"]).resolve() == ROOT.resolve()
    command = " ".join(feed["command"])
    assert re.search(r"feed migrate .*&& exec feed serve", command), command


def test_two_replicas_behind_a_sticky_load_balancer(stack: dict[str, Any]) -> None:
    services = stack["services"]
    assert services["feed"]["deploy"]["replicas"] == 2
    assert "ports" not in services["feed"], "clients reach the replicas through the balancer"
    lb = services["lb"]
    # Published on the host's loopback only: the dev stack runs without authentication.
    assert all(published(p)[0] == "127.0.0.1" for p in lb["ports"]), lb["ports"]
    mount = next(v for v in lb["volumes"] if "haproxy.cfg" in str(v))
    source = mount["source"] if isinstance(mount, dict) else mount.split(":")[0]
    text = Path(source).read_text()
    assert "balance source" in text, "long-polling clients must stay on one node"
    assert "option httpchk GET /healthz" in text
    # The client's address in the replicas' log: lb sets the header (a client's own is
    # replaced), and the replicas believe it from any address of the stack's network.
    assert "http-request set-header X-Forwarded-For %[src]" in text
    assert services["feed"]["environment"]["FORWARDED_ALLOW_IPS"] == "*"
    # The replicas share one cluster, in a Redis database apart from the watched keys.
    cluster_url = services["feed"]["environment"]["FEED_CLUSTER_URL"]
    assert cluster_url.endswith("/1")
    assert services["feed"]["environment"]["REDIS_URL"].endswith("/0")


def test_feed_config_parses_with_the_compose_environment(stack: dict[str, Any]) -> None:
    feed = stack["services"]["feed"]
    mount = next(v for v in feed["volumes"] if v.endswith(":/etc/feed/feed.toml:ro"))
    config = load_config(mount.split(":")[0], env=feed["environment"])
    assert config.cluster is not None and config.cluster.url.endswith("/1")
    by_name = {c.name: c for c in config.connectors}
    assert {c.type for c in config.connectors} == {"postgres", "mongodb", "redis"}
    # The writer writes where the feed watches.
    assert by_name["main"].table["tables"] == POSTGRES_TABLES
    assert by_name["shop"].table["watch"] == MONGODB_WATCH
    assert by_name["cache"].table["patterns"] == REDIS_PATTERNS
    writer = stack["services"]["writer"]["environment"]
    for key in ("DATABASE_URL", "MONGODB_URL", "REDIS_URL"):
        assert writer[key] == feed["environment"][key]


def test_compose_up_works_without_env_with_the_documented_defaults(tmp_path: Path) -> None:
    """`docker compose up` alone: no .env needed; its defaults are .env.example's values."""
    # An empty --env-file stands in for a missing .env, whatever a developer keeps in theirs.
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = compose_config("--env-file", str(empty), env={})
    assert result.returncode == 0, result.stderr
    bare: dict[str, Any] = yaml.safe_load(result.stdout)
    example = compose_config("--env-file", str(ENV_EXAMPLE))
    assert example.returncode == 0, example.stderr
    assert bare == yaml.safe_load(example.stdout), "compose's defaults differ from .env.example"
    # Every variable the compose file reads has a default, and .env.example documents it.
    text = COMPOSE.read_text()
    used = set(re.findall(r"\$\{([A-Z_]+)", text))
    assert used == set(re.findall(r"\$\{([A-Z_]+):-", text)), "a variable without a default"
    assert used == set(env_example()), "every variable is documented in .env.example"
    # Those defaults are safe only because nothing is published beyond loopback.
    for name, service in bare["services"].items():
        for port in service.get("ports", []):
            assert published(port)[0] == "127.0.0.1", f"{name} publishes {port} beyond loopback"


def test_env_changes_the_defaults(tmp_path: Path) -> None:
    env = tmp_path / "custom.env"
    env.write_text("POSTGRES_PASSWORD=another-one\nFEED_PORT=8010\n")
    result = compose_config("--env-file", str(env), env={})
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    feed = services["feed"]
    assert ":another-one@postgres:5432/feed" in feed["environment"]["DATABASE_URL"]
    # The replicas are published through the load balancer.
    assert published(services["lb"]["ports"][0]) == ("127.0.0.1", "8010")


def published(port: str | dict[str, Any]) -> tuple[str, str]:
    """(host address, host port) of a resolved port: docker-compose v1 writes the short form."""
    if isinstance(port, dict):
        return str(port.get("host_ip", "")), str(port.get("published", ""))
    parts = port.split("/")[0].split(":")
    return (parts[0], parts[1]) if len(parts) == 3 else ("", parts[0])


def test_init_sql_matches_the_writers_tables() -> None:
    def statements(sql: str) -> list[str]:
        body = "\n".join(line for line in sql.splitlines() if not line.startswith("--"))
        return [" ".join(s.split()) for s in body.split(";") if s.strip()]

    init = (ROOT / "deploy" / "postgres" / "init.sql").read_text()
    assert statements(init) == statements(SCHEMA_SQL)


# -- Dockerfile ---------------------------------------------------------------------------------


def replayer() -> ModuleType:
    path = ROOT / ".ci" / "verify_dockerfile_steps.py"
    spec = importlib.util.spec_from_file_location("verify_dockerfile_steps", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_dockerfile_is_multi_stage_small_and_non_root() -> None:
    stages = replayer().parse(ROOT / "Dockerfile")
    assert len(stages) >= 3
    dashboard, final = stages[0], stages[-1]
    assert any(
        s.instruction == "RUN" and "make -C dashboard build" in s.args for s in dashboard.steps
    )
    assert final.base.endswith("-slim"), "the final image starts from a slim base"
    steps = {s.instruction: s.args for s in final.steps}
    assert steps["USER"] not in ("root", "0")
    assert steps["CMD"].startswith('["feed", "serve"')
    # Nothing is built in the final stage: it only copies the finished environment.
    assert not any(s.instruction == "RUN" and "pip" in s.args for s in final.steps)


def test_dockerfile_steps_replay_plan() -> None:
    """The CI replay (.ci/verify-dockerfile-steps.sh) understands every instruction."""
    result = subprocess.run(
        [str(ROOT / ".ci" / "verify-dockerfile-steps.sh"), "--plan"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "RUN sh deploy/install.sh /opt/feed" in result.stdout


def test_dockerignore_keeps_local_environments_out() -> None:
    module = replayer()
    patterns = module.dockerignore()
    for path in (
        ".venv/bin/python",
        "dashboard/node_modules/x",
        "feed/dashboard/index.html",
        ".env",
    ):
        assert module.ignored(path, patterns), path
    for path in ("feed/app/server.py", "migrations/0001_journal.sql", "dashboard/src/app.js"):
        assert not module.ignored(path, patterns), path
