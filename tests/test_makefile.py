"""The Makefile's user-facing knobs, read with `make -n` (what would run, without running it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def dry_run(*args: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("no make")
    result = subprocess.run(
        ["make", "-n", "--no-print-directory", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def test_make_demo_takes_a_port() -> None:
    assert ".venv/bin/feed demo --port 8010" in dry_run("demo", "PORT=8010").splitlines()
    assert ".venv/bin/feed demo --port 8000" in dry_run("demo").splitlines()


def test_setup_installs_from_the_lock() -> None:
    lines = dry_run("-B", ".venv/.installed").splitlines()
    install = [line for line in lines if "pip install" in line and "-e" in line]
    assert install and all("-c constraints.txt" in line for line in install), lines
