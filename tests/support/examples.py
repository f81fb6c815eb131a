"""The example clients' set-up, shared by the tests that run them (tests/test_examples.py,
tests/test_auth_examples.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent.parent
EXAMPLES = ROOT / "examples"
NODE_DIR = EXAMPLES / "node"


def node_ready() -> bool:
    """node and the example's dependencies (npm ci, as examples/README.md says).

    The example installs dbfeed-client from clients/js as a copy (.npmrc: install-links), so
    the copy is refreshed whenever the library's sources have changed since.
    """
    if not shutil.which("node") or not shutil.which("npm"):
        return False
    installed = NODE_DIR / "node_modules" / "dbfeed-client"
    library = ROOT / "clients" / "js"
    stale = not (installed / "index.js").is_file() or any(
        (installed / name).read_bytes() != (library / name).read_bytes()
        for name in ("index.js", "package.json")
        if (installed / name).is_file()
    )
    if stale:
        subprocess.run(
            ["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE_DIR,
            check=True,
            timeout=300,
        )
    return True


def need_node() -> None:
    """Install the Node example's dependencies, or skip (fail under CI, where node must be)."""
    if not node_ready():
        if os.environ.get("CI"):
            pytest.fail("node and npm are needed (the dashboard build needs them too)")
        pytest.skip("node/npm not installed")
