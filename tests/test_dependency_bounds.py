"""The lean websocket path is the one in use, and the packages it builds on are the tested ones.

feed/delivery/eio_websocket.py relies on private parts of uvicorn, python-engineio and
python-socketio. When an upgrade moves them, the module quietly falls back to Engine.IO's own
machinery (the server still works, at several times the memory per client, docs/benchmarks.md).
These tests turn that silence into a failure that says what happened and where to look.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import re
import tomllib
from pathlib import Path

import uvicorn
from packaging.requirements import Requirement
from websockets.asyncio.client import connect

from feed.delivery import eio_websocket
from feed.delivery.eio_websocket import LeanSocket
from tests.auth_helpers import BASE, ws_url
from tests.support.server import WAIT, running_feed

ROOT = Path(__file__).parent.parent
INTERNALS = ("uvicorn", "python-engineio", "python-socketio")
HINT = (
    "feed/delivery/eio_websocket.py's lean websocket path is off: the installed {package} no "
    "longer has what it builds on; keep it within pyproject.toml's range (pip install -c constraints.txt)"
)


def requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = [Requirement(line) for line in project["dependencies"]]
    return {r.name.lower(): r for r in found}


def pinned() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==([^ ;]+)", line)
        if match:
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def test_uvicorn_s_sans_io_websocket_protocol_is_importable_and_the_default() -> None:
    assert eio_websocket._SansIO is not None, HINT.format(package="uvicorn")
    config = uvicorn.Config(lambda scope, receive, send: None)  # as `feed serve` builds it
    config.load()
    assert config.ws_protocol_class is eio_websocket._SansIO, (
        f"uvicorn's default websocket protocol is {config.ws_protocol_class}, not the sans-I/O "
        "one; " + HINT.format(package="uvicorn")
    )


async def test_a_websocket_client_is_served_by_the_lean_path() -> None:
    async with running_feed(BASE) as feed:
        ws = await connect(ws_url(feed), compression=None, proxy=None, open_timeout=WAIT)
        try:
            opened = await asyncio.wait_for(ws.recv(), WAIT)
            assert isinstance(opened, str) and opened.startswith("0")
            sid = json.loads(opened[1:])["sid"]
            socket = feed.app.sio.eio.sockets[sid]
            assert type(socket) is LeanSocket, HINT.format(package="python-engineio")
            assert socket.protocol is not None, HINT.format(package="uvicorn")
        finally:
            await ws.close()


def test_packages_whose_internals_we_use_are_bounded_and_locked_within_the_bounds() -> None:
    wanted, pins = requirements(), pinned()
    for package in INTERNALS:
        requirement = wanted.get(package)
        assert requirement is not None, f"{package} is not a direct dependency in pyproject.toml"
        assert any(s.operator == "<" for s in requirement.specifier), (
            f"{package} has no upper bound in pyproject.toml"
        )
        pin = pins.get(package)
        assert pin is not None, f"constraints.txt does not pin {package}: run `make lock`"
        assert pin in requirement.specifier, (
            f"constraints.txt pins {package}=={pin}, outside {requirement}: run `make lock`"
        )
        installed = importlib.metadata.version(package)
        assert installed in requirement.specifier, (
            f"{package} {installed} is installed, outside the tested {requirement}"
        )


def test_every_runtime_dependency_is_locked() -> None:
    pins = pinned()
    missing = [name for name in requirements() if name not in pins]
    assert not missing, f"not in constraints.txt: {missing}; run `make lock`"
