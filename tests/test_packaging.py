"""`pip install .`, a wheel and an sdist all carry the built dashboard (setup.py's build hook).

`python -m build` makes the sdist from a copy of this checkout (without any built dashboard), then
the wheel from that sdist, as a release would: both must hold feed/dashboard/ with the same files
as dashboard/src/ plus the client library (clients/js) and socket.io-client's bundle at the version
package-lock.json pins.
`pip install .` runs the same `build_py` hook as the wheel build.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SKIP = {
    ".git",
    ".venv",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".hypothesis",
    "__pycache__",
}
TOP_SKIP = {"build", "dist"}


def checkout_copy(dest: Path) -> Path:
    def ignore(folder: str, names: list[str]) -> set[str]:
        skipped = {n for n in names if n in SKIP or n.endswith(".egg-info")}
        if Path(folder).resolve() == ROOT.resolve():
            skipped |= TOP_SKIP & set(names)
        if Path(folder).resolve() == (ROOT / "feed").resolve():
            skipped.add("dashboard")  # the build must make it, not find it
        return skipped

    shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)
    return dest


def read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    file = tar.extractfile(member)
    assert file is not None, f"{member.name} in the sdist is not a regular file"
    return file.read()


@pytest.mark.timeout(300)
def test_wheel_and_sdist_carry_the_built_dashboard(tmp_path: Path) -> None:
    pytest.importorskip("build", reason="pip install build (in the test extra)")
    if shutil.which("npm") is None and not (ROOT / "dashboard" / "node_modules").is_dir():
        pytest.skip("no npm to fetch socket.io-client")
    source = checkout_copy(tmp_path / "src")
    out = tmp_path / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [sdist] = out.glob("*.tar.gz")
    [wheel] = out.glob("*.whl")  # built from the sdist by `python -m build`

    expected = {p.name: p.read_bytes() for p in (ROOT / "dashboard" / "src").iterdir()}
    expected["dbfeed-client.js"] = (ROOT / "clients" / "js" / "index.js").read_bytes()
    lock = json.loads((ROOT / "dashboard" / "package-lock.json").read_text())
    version = lock["packages"]["node_modules/socket.io-client"]["version"]

    with zipfile.ZipFile(wheel) as whl:
        in_wheel = {
            name.removeprefix("feed/dashboard/"): whl.read(name)
            for name in whl.namelist()
            if name.startswith("feed/dashboard/")
        }
    with tarfile.open(sdist) as tar:
        prefix = f"{sdist.name.removesuffix('.tar.gz')}/feed/dashboard/"
        in_sdist = {
            member.name.removeprefix(prefix): read_member(tar, member)
            for member in tar.getmembers()
            if member.name.startswith(prefix) and member.isfile()
        }
    for built in (in_wheel, in_sdist):
        assert {k: v for k, v in built.items() if k in expected} == expected
        assert set(built) == set(expected) | {"socket.io.esm.min.js", "socket.io.esm.min.js.map"}
        assert f"Socket.IO v{version}".encode() in built["socket.io.esm.min.js"][:200]

    # Every module of every layer package is packaged, and the `feed` command names one of them.
    sources = {
        p.relative_to(ROOT).as_posix()
        for package in ("feed", "connectors")
        for p in (ROOT / package).rglob("*.py")
        if "dashboard" not in p.parts
    }
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        assert sources <= names, sorted(sources - names)
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        [target] = [
            line.split("=", 1)[1].strip()
            for line in whl.read(entry_points).decode().splitlines()
            if line.startswith("feed ")
        ]
        module, _, function = target.partition(":")
        path = module.replace(".", "/") + ".py"
        assert path in names, f"the feed command names {target}, which the wheel does not have"
        assert f"def {function}(" in whl.read(path).decode()
