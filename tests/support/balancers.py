"""Feed nodes behind a real load balancer (HAProxy, nginx) as an operator runs them, and what a
browser sends through it (tests/test_balancers.py, tests/test_balancer_nginx.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.cluster import ROOT, FeedNode, cluster_config, listens_on, running_cluster
from tests.support.redis import RedisTarget
from tests.support.server import PortTaken, on_free_port

WAIT = 30.0


@contextlib.asynccontextmanager
async def cluster_nodes(
    redis_target: RedisTarget, directory: Path, count: int = 2, extra: str = ""
) -> AsyncIterator[list[FeedNode]]:
    """`count` ready nodes of one cluster (memory connectors), with uvicorn's request lines on
    (`access_log`, in each node's `log`), each writing its standard output to
    `<directory>/<name>.out`; `extra` is added to their config; stopped at the end."""
    config = directory / "feed.toml"
    text = cluster_config(redis_target.url, redis_target.prefix)
    assert "[server]\n" in text
    text = text.replace("[server]\n", "[server]\naccess_log = true\n", 1)
    config.write_text(text.replace("[cluster]\n", '[cluster]\nnode = "${FEED_NODE}"\n') + extra)
    async with running_cluster(config, count, logs=directory) as nodes:
        yield nodes


def request_lines(nodes: list[FeedNode], marker: str) -> list[str]:
    """The nodes' request log lines (uvicorn's access log, with the rest of the log on standard
    error) that contain `marker`."""
    return [line for node in nodes for line in node.log if marker in line]


async def node_behind(http: aiohttp.ClientSession, url: str) -> str:
    """The name of the node that answers `url`'s /readyz (the cluster names it)."""
    async with http.get(
        f"{url}/readyz", ssl=False, timeout=aiohttp.ClientTimeout(total=10)
    ) as response:
        assert response.status == 200, await response.text()
        body = await response.json()
        name: str = body["cluster"]["node"]
        return name


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (PEM files)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl missing")
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


async def websocket_status(http: aiohttp.ClientSession, url: str, origin: str) -> int:
    """What a browser's Engine.IO websocket from page `origin` gets at `url` (the Socket.IO
    path's parent): 101 (then the Engine.IO open packet) or the refusal's status."""
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    address = f"{url}/socket.io/?EIO=4&transport=websocket"
    try:
        async with http.ws_connect(
            address, headers={"Origin": origin}, ssl=insecure, timeout=aiohttp.ClientWSTimeout(10)
        ) as ws:
            opened = await ws.receive_str(timeout=10)
            assert opened.startswith("0{"), opened
            return 101
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status


def nginx_binary() -> str | None:
    """Debian's nginx (`apt-get install nginx`), run with a config of the test's own."""
    return shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
    )


def nginx_config(directory: Path, port: int, backends: list[int], cert: Path, key: Path) -> str:
    """A whole nginx config: deploy/nginx.conf with this test's nodes, port and certificate,
    its files (pid, logs, temporary files) in `directory`."""
    site = (ROOT / "deploy" / "nginx.conf").read_text()
    head, _, rest = site.partition("    server 10.0.0.11:8000")
    _, _, rest = rest.partition("}\n")
    options = "max_fails=1 fail_timeout=5s"
    servers = "".join(f"    server 127.0.0.1:{p} {options};\n" for p in backends)
    site = head + servers + "}\n" + rest
    site = site.replace("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;")
    site = site.replace("/etc/nginx/feed.pem", str(cert))
    site = site.replace("/etc/nginx/feed.key", str(key))
    temp = "".join(
        f"    {kind}_temp_path {directory / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # As root, nginx's workers would run as nobody, who cannot enter pytest's directories.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return (
        f"daemon off;\n{user}pid {directory / 'nginx.pid'};\n"
        f"error_log {directory / 'nginx-error.log'} warn;\nevents {{}}\n"
        f"http {{\n    access_log off;\n{temp}{site}\n}}\n"
    )


class Nginx:
    """nginx with deploy/nginx.conf in front of the nodes, over TLS, on a free port."""

    def __init__(self, directory: Path, backends: list[int], cert: Path, key: Path) -> None:
        self.directory = directory
        self.backends = backends
        self.cert, self.key = cert, key
        self.port = 0
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def start(self) -> Nginx:
        await on_free_port(self._start_once)
        return self

    async def _start_once(self, port: int) -> None:
        self.port = port
        path = self.directory / "nginx.conf"
        path.write_text(nginx_config(self.directory, port, self.backends, self.cert, self.key))
        binary = nginx_binary()
        assert binary is not None
        check = await asyncio.create_subprocess_exec(
            binary, "-t", "-c", str(path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await check.communicate()
        assert check.returncode == 0, out.decode()
        process = self.process = await asyncio.create_subprocess_exec(
            binary, "-c", str(path),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        log = self.directory / "nginx-error.log"
        async with asyncio.timeout(WAIT):
            while not listens_on(process.pid, port):
                if process.returncode is not None:
                    self.process = None
                    text = log.read_text(errors="replace") if log.exists() else ""
                    if "address already in use" in text.lower():
                        raise PortTaken(f"nginx: port {port} is taken:\n{text}")
                    raise AssertionError(f"nginx exited at start:\n{text}")
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await asyncio.wait_for(self.process.wait(), WAIT)
