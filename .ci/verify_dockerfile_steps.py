"""Replay the Dockerfile's steps without Docker, then smoke-test what they installed.

No Docker engine runs where CI does, so this reads ./Dockerfile and carries out its instructions
on this machine: every stage's WORKDIR, ENV, COPY (honouring .dockerignore, and COPY --from
between stages) and RUN, inside one scratch directory that stands in for the image's filesystem
(container paths like /opt/feed are mapped into it). Creating the image's system user is the one
RUN step left out, since it would change this machine; the USER instruction is checked instead.

Then it checks what the final image would run: `feed --version`, the baked-in config parses, and
the image's CMD-style `feed serve` on a free port answers the HEALTHCHECK command and serves the
built dashboard. A new COPY forgotten in the Dockerfile, a package-data miss or a broken install
step fails here, in CI, rather than in someone's `docker compose up`.

`--plan` only parses and prints the steps (used by tests/test_stack.py).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAPPED = re.compile(r"(?<![\w./-])(/(?:opt|src|etc|home)(?:/[^\s'\"]*)?)")
SKIPPED_RUN = ("useradd ", "groupadd ", "adduser ")


@dataclass
class Step:
    instruction: str
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    steps: list[Step] = field(default_factory=list)


def parse(dockerfile: Path) -> list[Stage]:
    """Instructions per stage, with continuation lines joined and comments dropped."""
    stages: list[Stage] = []
    logical = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        instruction, _, args = logical.partition(" ")
        logical = ""
        instruction = instruction.upper()
        if instruction == "FROM":
            words = args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif not stages:
            raise SystemExit(f"Dockerfile: {instruction} before FROM")
        else:
            stages[-1].steps.append(Step(instruction, args.strip()))
    return stages


def ignored(relative: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps `relative` (or a folder above it) out of the context."""
    parts = relative.split("/")
    for depth in range(1, len(parts) + 1):
        prefix = "/".join(parts[:depth])
        for pattern in patterns:
            if fnmatch.fnmatch(prefix, pattern):
                return True
            if pattern.startswith("**/") and fnmatch.fnmatch(parts[depth - 1], pattern[3:]):
                return True
    return False


def dockerignore() -> list[str]:
    path = ROOT / ".dockerignore"
    if not path.exists():
        return []
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [line.rstrip("/") for line in lines if line and not line.startswith("#")]


class Replay:
    def __init__(self, fs: Path, plan_only: bool) -> None:
        self.fs = fs
        self.plan_only = plan_only
        self.patterns = dockerignore()
        self.user: str | None = None
        self.users_created: set[str] = set()
        self.env: dict[str, str] = {}
        self.workdir = "/"
        self.cmd: list[str] = []
        self.healthcheck: list[str] = []

    def path(self, container_path: str) -> Path:
        absolute = (
            container_path
            if container_path.startswith("/")
            else f"{self.workdir.rstrip('/')}/{container_path}"
        )
        return self.fs / absolute.lstrip("/")

    def map_text(self, text: str) -> str:
        return MAPPED.sub(lambda m: str(self.fs) + m.group(1), text)

    def run_stage(self, stage: Stage) -> None:
        print(f"== stage {stage.name or '(final)'} FROM {stage.base}", flush=True)
        self.env = {}
        self.workdir = "/"
        for step in stage.steps:
            print(f"   {step.instruction} {step.args}", flush=True)
            if self.plan_only:
                continue
            getattr(self, f"do_{step.instruction.lower()}", self.do_other)(step.args)

    def do_workdir(self, args: str) -> None:
        self.workdir = args if args.startswith("/") else f"{self.workdir.rstrip('/')}/{args}"
        self.path(self.workdir).mkdir(parents=True, exist_ok=True)

    def do_env(self, args: str) -> None:
        for word in shlex.split(args):
            key, _, value = word.partition("=")
            self.env[key] = self.map_text(value).replace("$PATH", os.environ.get("PATH", ""))

    def do_copy(self, args: str) -> None:
        words = shlex.split(args)
        from_stage = None
        while words and words[0].startswith("--"):
            flag = words.pop(0)
            if flag.startswith("--from="):
                from_stage = flag.split("=", 1)[1]
        *sources, dest = words
        target = self.path(dest)
        into_dir = dest.endswith("/") or len(sources) > 1
        for source in sources:
            if from_stage:
                origin = self.fs / source.lstrip("/")
                if origin.resolve() == target.resolve():
                    continue  # one scratch filesystem for all stages: already in place
            else:
                origin = ROOT / source
                if ignored(source.rstrip("/"), self.patterns):
                    raise SystemExit(f"COPY {source}: excluded by .dockerignore")
            if not origin.exists():
                raise SystemExit(f"COPY {source}: not found (stage {from_stage or 'context'})")
            if origin.is_dir():
                base = source.rstrip("/")
                self.copy_tree(origin, target, base if not from_stage else None)
            else:
                destination = target / origin.name if into_dir else target
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, destination)

    def copy_tree(self, origin: Path, target: Path, context_base: str | None) -> None:
        def ignore(directory: str, names: list[str]) -> list[str]:
            if context_base is None:
                return []
            rel_dir = Path(directory).relative_to(ROOT).as_posix()
            return [n for n in names if ignored(f"{rel_dir}/{n}", self.patterns)]

        shutil.copytree(origin, target, dirs_exist_ok=True, ignore=ignore, symlinks=True)

    def do_run(self, args: str) -> None:
        if args.startswith(SKIPPED_RUN):
            # Creating a system user would change this machine: note the user for USER instead.
            words = args.split()
            self.users_created.add(words[-1])
            print("      (skipped here: creates a system user)", flush=True)
            return
        command = self.map_text(args)
        env = {**os.environ, **self.env}
        subprocess.run(
            ["sh", "-c", command], cwd=self.path(self.workdir), env=env, check=True, timeout=900
        )

    def do_user(self, args: str) -> None:
        self.user = args.strip()

    def do_cmd(self, args: str) -> None:
        self.cmd = json.loads(args) if args.startswith("[") else shlex.split(args)

    def do_healthcheck(self, args: str) -> None:
        _, _, rest = args.partition("CMD ")
        self.healthcheck = json.loads(rest)

    def do_other(self, args: str) -> None:
        """EXPOSE, STOPSIGNAL, LABEL...: nothing to install."""


def smoke_test(replay: Replay) -> None:
    """What the final image would run, run from the replayed filesystem."""
    if replay.user in (None, "root", "0"):
        raise SystemExit("the final image must run as a non-root USER")
    if replay.user not in replay.users_created:
        raise SystemExit(f"USER {replay.user} is not created by the final stage")
    env = {**os.environ, **replay.env}
    feed = shutil.which("feed", path=env["PATH"])
    python = shutil.which("python", path=env["PATH"])
    if not feed or not python or not feed.startswith(str(replay.fs)):
        raise SystemExit("the final stage's PATH does not lead to the installed `feed`")
    print("== smoke test", flush=True)
    subprocess.run([feed, "--version"], env=env, check=True, timeout=60)

    if replay.cmd[:2] != ["feed", "serve"]:
        raise SystemExit(f"the image should run `feed serve`, not {replay.cmd}")
    config = Path(replay.map_text(replay.cmd[replay.cmd.index("--config") + 1]))
    check_env = {
        **env,
        "DATABASE_URL": "postgresql://feed:x@postgres:5432/feed",
        "MONGODB_URL": "mongodb://mongo:27017/?replicaSet=rs0",
        "REDIS_URL": "redis://redis:6379/0",
        "FEED_CLUSTER_URL": "redis://redis:6379/1",
    }
    subprocess.run(
        [python, "-I", "-c", f"from feed.app.config import load_config; load_config({str(config)!r})"],
        env=check_env, check=True, timeout=60, cwd=replay.fs,
    )  # fmt: skip
    print(f"   {config.name} in the image parses with the compose environment", flush=True)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    memory = replay.fs / "smoke.toml"
    memory.write_text(
        f'[server]\nport = {port}\n\n[[connectors]]\nname = "mem"\ntype = "memory"\ntargets = ["t"]\n'
    )
    server = subprocess.Popen(
        [feed, "serve", "--config", str(memory)], env=env, cwd=replay.fs,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    err = server.stderr.read().decode() if server.stderr else ""
                    raise SystemExit(f"`feed serve` from the image did not start:\n{err}") from None
                time.sleep(0.2)
        probe = [arg.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for arg in replay.healthcheck]
        probe[0] = shutil.which(probe[0], path=env["PATH"]) or probe[0]
        subprocess.run(probe, env=env, check=True, timeout=30)
        print("   HEALTHCHECK command passes against `feed serve`", flush=True)
        with urllib.request.urlopen(f"{url}/", timeout=5) as response:
            page = response.read().decode()
        if "socket.io.esm.min.js" not in page:
            raise SystemExit("the installed feed does not serve the built dashboard at /")
        print("   the built dashboard is served at /", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
        if server.stderr:
            server.stderr.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", action="store_true", help="parse and print the steps only")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()
    stages = parse(ROOT / "Dockerfile")
    fs = Path(tempfile.mkdtemp(prefix="feed-dockerfile-"))
    try:
        replay = Replay(fs, args.plan)
        for stage in stages:
            replay.run_stage(stage)
        if not args.plan:
            smoke_test(replay)
            print("the Dockerfile's steps pass without Docker", flush=True)
    finally:
        if args.keep:
            print(f"scratch filesystem kept at {fs}")
        else:
            shutil.rmtree(fs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
