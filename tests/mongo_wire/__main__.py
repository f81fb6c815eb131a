"""Serve the wire-protocol test server on a port until interrupted: `python -m tests.mongo_wire`.

For exercising code that wants a MongoDB URL (the MongoDB phase of `python -m bench`, a manual
`feed serve`) where no mongod can run. It is an in-memory fake, faithful at the protocol level
for what the tests drive; it is not a performance stand-in for a real server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from tests.mongo_wire.server import MongoWireServer


async def serve(host: str, port: int) -> None:
    async with MongoWireServer(host, port) as server:
        print(f"{server.url}?replicaSet={server.set_name}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.mongo_wire", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
