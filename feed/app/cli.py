"""`feed`: serve, check, migrate, demo.

A user's mistake (bad config, unreachable source) ends with one line on stderr and a non-zero
exit; only a bug in the feed itself prints a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import shlex
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from feed import __version__
from feed.app.config import Config, load_config, valid_host
from feed.errors import ConnectorError, FeedError, one_line

EXIT_USAGE = 2  # a configuration or command-line mistake
EXIT_UNREACHABLE = 1  # a source failed: unreachable, or refusing what the command needs
EXIT_CANNOT_LISTEN = 1  # `feed serve`: the host and port cannot be listened on
CHECK_TIMEOUT = 15.0
CONFIG_HELP = "the config file (default: feed.toml in the current folder)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        result: int = args.handler(args)
        return result
    except ConnectorError as exc:  # `feed migrate`/`unwatch`: the source, not the config
        print(f"feed: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except FeedError as exc:
        print(f"feed: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


class Parser(argparse.ArgumentParser):
    """argparse with its mistakes on one line, as the feed's own are: argparse prints its usage
    line first, two lines for one mistake."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {one_line(message)}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="feed", description="A live change feed from Postgres, MongoDB and Redis.")
    parser.add_argument("--version", action="version", version=f"feed {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--config", "-c", default="feed.toml", help=CONFIG_HELP)
    serve.add_argument(
        "--host", type=listen_host, help="address to listen on (overrides [server] host)"
    )
    serve.add_argument(
        "--port", type=port_number, help="port to listen on (overrides [server] port)"
    )
    serve.set_defaults(handler=cmd_serve)

    check = commands.add_parser("check", help="validate the config and reach every source")
    check.add_argument("--config", "-c", default="feed.toml", help=CONFIG_HELP)
    check.set_defaults(handler=cmd_check)

    migrate = commands.add_parser("migrate", help="apply migrations/ to each Postgres connector")
    migrate.add_argument("--config", "-c", default="feed.toml", help=CONFIG_HELP)
    migrate.add_argument(
        "--prune",
        action="store_true",
        help="also stop capturing tables this config no longer lists",
    )
    migrate.add_argument(
        "--force",
        action="store_true",
        help="with --prune: even while a running feed reads the connector",
    )
    migrate.set_defaults(handler=cmd_migrate)

    hash_token = commands.add_parser(
        "hash-token", help="print the sha256 to store in [[auth.tokens]] for an API token"
    )
    hash_token.add_argument(
        "token",
        nargs="?",
        help="the token (read from stdin when omitted, to keep it out of history)",
    )
    hash_token.add_argument(
        "--generate", action="store_true", help="make a new random token and print it with its hash"
    )
    hash_token.set_defaults(handler=cmd_hash_token)

    unwatch = commands.add_parser(
        "unwatch", help="stop capturing tables (drop triggers, forget positions) on Postgres"
    )
    unwatch.add_argument("--config", "-c", default="feed.toml", help=CONFIG_HELP)
    unwatch.add_argument("--connector", help="only this connector (default: every postgres one)")
    unwatch.add_argument(
        "--table", action="append", dest="tables", help="schema.table to stop (default: all)"
    )
    unwatch.add_argument(
        "--force",
        action="store_true",
        help="even while a running feed reads the connector (it will re-attach, with a gap)",
    )
    unwatch.set_defaults(handler=cmd_unwatch)

    demo = commands.add_parser("demo", help="run a self-contained demo (embedded databases)")
    demo.add_argument(
        "--host",
        type=listen_host,
        default="127.0.0.1",
        help="address to listen on, loopback only (127.0.0.1)",
    )
    demo.add_argument(
        "--port",
        type=port_number,
        default=8000,
        help="port for the dashboard and Socket.IO (8000)",
    )
    demo.set_defaults(handler=cmd_demo)
    return parser


def port_number(text: str) -> int:
    """`--port`: 0 to 65535. The socket layer takes a larger number modulo 65536, so
    `--port 70000` listened on 4464 while the log said 70000."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0 to 65535)") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0 to 65535)")
    return value


def listen_host(text: str) -> str:
    """`--host`: an empty one was ignored in silence ([server] host was used instead)."""
    if not valid_host(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an address to listen on, like 127.0.0.1 or 0.0.0.0"
        )
    return text


def cmd_serve(args: argparse.Namespace) -> int:
    from feed.app.listen import PortInUse, check_port_free

    config = load_config(args.config)
    host = config.server.host if args.host is None else args.host
    port = config.server.port if args.port is None else args.port
    try:  # before connecting to any source: a busy port is one line, not a traceback
        check_port_free(
            host,
            port,
            fix="pass --port with a free port, or change [server] port",
            host_fix="pass --host with an address of this machine (127.0.0.1, or 0.0.0.0 for "
            "all of them), or change [server] host",
        )
    except PortInUse as exc:
        print(f"feed: {exc}", file=sys.stderr)
        return EXIT_CANNOT_LISTEN
    serve(config, host=host, port=port)
    return 0


def serve(config: Config, host: str | None = None, port: int | None = None) -> None:

    from feed.app import logs
    from feed.app.server import FeedApp, FeedServer

    # Before the app is built: it logs (the authentication line) as it starts, and with
    # log_level = "warning" that INFO line was printed anyway.
    logging.getLogger().setLevel(config.server.log_level.upper())
    app = FeedApp(config, host=host or config.server.host)
    uvicorn_config = app.uvicorn_config(
        host or config.server.host,
        config.server.port if port is None else port,
        log_level=config.server.log_level,
        timeout_graceful_shutdown=10,
        # uvicorn's lines through the feed's handler and format (feed.app.logs)
        log_config=None,
        access_log=config.server.access_log,
    )
    logs.configure(config.server.access_log)
    # uvicorn shuts down gracefully on SIGTERM and SIGINT, then re-raises the signal with the
    # handler that was installed before it; make that a clean exit, as service managers expect
    # (Python's own SIGINT handler turned a clean Ctrl-C stop into KeyboardInterrupt, exit 130).
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, lambda signum, frame: sys.exit(0))
    FeedServer(uvicorn_config).run()


def cmd_hash_token(args: argparse.Namespace) -> int:
    from feed.security.auth import hash_token, new_token

    if args.generate and args.token is not None:
        print("feed: give a token to hash or --generate a new one, not both", file=sys.stderr)
        return EXIT_USAGE
    if args.generate:
        token = new_token()
        print(f"token:  {token}")
        print(f"sha256: {hash_token(token)}")
        print("Give the token to the client; put only the sha256 in feed.toml.", file=sys.stderr)
        return 0
    token = args.token if args.token is not None else sys.stdin.readline().strip()
    if not token:
        print("feed: give a token (argument or stdin), or --generate a new one", file=sys.stderr)
        return EXIT_USAGE
    print(hash_token(token))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from feed.app.rule_check import rule_warnings

    config = load_config(args.config)
    connectors = config.build_connectors()
    print(f"config {args.config}: ok ({len(connectors)} connector(s))")

    async def reach() -> list[tuple[str, str, str, str]]:
        rows = []
        for connector in connectors:
            try:
                detail = await asyncio.wait_for(connector.check(), CHECK_TIMEOUT)
                detail += "".join(f"; {line}" for line in rule_warnings(config.auth, connector))
                rows.append((connector.name, connector.kind, "ok", detail))
            except TimeoutError:
                rows.append((connector.name, connector.kind, "FAIL", "timed out"))
            except (FeedError, OSError) as exc:
                # Hints name `--config <file>`: print the command as it runs here.
                detail = str(exc).replace("--config <file>", f"--config {shlex.quote(args.config)}")
                rows.append((connector.name, connector.kind, "FAIL", detail))
        if config.cluster is not None:
            from feed.engine.redis import check

            names = [c.name for c in connectors]
            try:
                detail = await asyncio.wait_for(check(config.cluster, names), CHECK_TIMEOUT)
                rows.append(("[cluster]", "redis", "ok", detail))
            except TimeoutError:
                rows.append(("[cluster]", "redis", "FAIL", "timed out"))
            except FeedError as exc:
                rows.append(("[cluster]", "redis", "FAIL", str(exc)))
        return rows

    rows = asyncio.run(reach())
    print_table(("connector", "type", "result", "detail"), rows)
    return 0 if all(row[2] == "ok" for row in rows) else EXIT_UNREACHABLE


def cmd_migrate(args: argparse.Namespace) -> int:
    if args.force and not args.prune:  # it would be ignored: say so before changing anything
        print(
            "feed: migrate --force only goes with --prune (it detaches tables even while a "
            "running feed reads the connector); add --prune, or leave --force out",
            file=sys.stderr,
        )
        return EXIT_USAGE
    config = load_config(args.config)
    connectors = config.build_connectors()

    async def apply() -> None:
        for connector in connectors:
            # Only asked when given: a third-party connector's migrate() may take no options.
            options = {"prune": True, "force": args.force} if args.prune else {}
            lines = await connector.migrate(**options)
            for line in lines or ["nothing to do"]:
                print(f"{connector.name}: {line}")

    asyncio.run(apply())
    return 0


def cmd_unwatch(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    connectors = [
        c
        for c in config.build_connectors()
        if hasattr(c, "unwatch") and args.connector in (None, c.name)
    ]
    if not connectors:
        which = f"named {args.connector!r} " if args.connector else ""
        print(f"feed: {args.config}: no Postgres connector {which}to unwatch", file=sys.stderr)
        return EXIT_USAGE

    async def apply() -> None:
        for connector in connectors:
            lines = await connector.unwatch(args.tables, force=args.force)
            for line in lines or ["nothing to do"]:
                print(f"{connector.name}: {line}")

    asyncio.run(apply())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        demo = importlib.import_module("feed.demo.demo")
    except ImportError as exc:
        print(
            "feed: the demo needs the embedded extras: from a checkout, "
            f"pip install '.[embedded]' ({exc})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    result: int = demo.run(host=args.host, port=args.port)
    return result


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = (str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
