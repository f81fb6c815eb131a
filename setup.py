"""Build hook: the dashboard's assets go into the package, so any install serves the dashboard.

Everything else about the package is in pyproject.toml. The dashboard (feed/dashboard/) is built
from dashboard/src/ and socket.io-client's browser bundle from the npm registry, pinned by
dashboard/package-lock.json, by the same `make -C dashboard build` a checkout uses. Hooking it into
`build_py` and `sdist` means `pip install .`, a wheel and an sdist all carry it; an sdist carries
the built assets, so building a wheel from one needs neither make nor npm.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

ROOT = Path(__file__).resolve().parent
SOURCES = ROOT / "dashboard"
BUILT = ROOT / "feed" / "dashboard" / "index.html"


def build_dashboard() -> None:
    """Build (or refresh) feed/dashboard/ from a checkout; in an sdist, use the shipped build."""
    if not (SOURCES / "Makefile").is_file():
        if not BUILT.is_file():
            raise SystemExit(
                "dbfeed: no dashboard to package: build from a checkout (which has dashboard/) "
                "or from an sdist made by one"
            )
        return
    if shutil.which("make") is None or (
        shutil.which("npm") is None and not (SOURCES / "node_modules" / ".installed").exists()
    ):
        raise SystemExit(
            "dbfeed: building the dashboard needs make and npm (Node.js): install them, then "
            "run pip again (the dashboard's only dependency, socket.io-client, comes from npm)"
        )
    result = subprocess.run(["make", "--no-print-directory", "-C", str(SOURCES), "build"])
    if result.returncode != 0:
        raise SystemExit("dbfeed: `make -C dashboard build` failed (see above)")


class BuildPy(build_py):  # type: ignore[misc]
    def run(self) -> None:
        build_dashboard()  # before package data is collected, so the assets are in it
        super().run()


class Sdist(sdist):  # type: ignore[misc]
    def run(self) -> None:
        build_dashboard()
        super().run()


cmdclass: dict[str, Any] = {"build_py": BuildPy, "sdist": Sdist}
setup(cmdclass=cmdclass)
