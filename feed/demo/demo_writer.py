"""The demo writer: a small shop that changes rows, documents and keys about once a second.

It exists so that a dashboard opened on a fresh demo or compose stack is alive at once. `feed demo`
runs it in-process against its embedded Postgres and Redis; the compose stack runs it as its own
service (`python -m feed.demo.demo_writer`) against all three sources, reading DATABASE_URL,
REDIS_URL and MONGODB_URL. Each source is optional, and a source that is briefly unreachable costs
one log line per tick rather than the writer: the point is a steady trickle of inserts, updates and
deletes, not a benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import sys
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

log = logging.getLogger("feed.demo_writer")

# The demo's tables. deploy/postgres/init.sql holds the same statements for the compose stack,
# where the tables must exist before the feed's `feed migrate` attaches its triggers to them.
SCHEMA_SQL = """\
CREATE TABLE IF NOT EXISTS public.customers (
    id serial PRIMARY KEY,
    name text NOT NULL,
    email text NOT NULL,
    tier text NOT NULL DEFAULT 'standard'
);
CREATE TABLE IF NOT EXISTS public.orders (
    id serial PRIMARY KEY,
    customer_id integer NOT NULL REFERENCES public.customers (id) ON DELETE CASCADE,
    status text NOT NULL DEFAULT 'pending',
    amount numeric(10, 2) NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
"""

POSTGRES_TABLES = ["public.orders", "public.customers"]
REDIS_PATTERNS = ["session:*", "user:*"]
MONGODB_WATCH = ["shop.orders"]

NAMES = ["Ada", "Grace", "Linus", "Barbara", "Ken", "Margaret", "Dennis", "Frances", "Edsger"]
NEXT_STATUS = {"pending": "paid", "paid": "shipped"}
KEEP_ROWS = 25  # the writer deletes the oldest finished order beyond this many
SESSION_TTL = 20  # seconds: sessions expire by themselves, so `expired` events show too


class DemoWriter:
    """One tick writes to every configured source; `run` ticks until stopped."""

    def __init__(
        self,
        postgres_dsn: str | None = None,
        redis_url: str | None = None,
        mongodb_url: str | None = None,
        interval: float = 1.0,
        seed: int | None = None,
        mongodb_namespace: str = MONGODB_WATCH[0],
    ) -> None:
        self.postgres_dsn = postgres_dsn
        self.redis_url = redis_url
        self.mongodb_url = mongodb_url
        self.mongodb_db, _, self.mongodb_collection = mongodb_namespace.partition(".")
        self.interval = interval
        self.random = random.Random(seed)
        self.ticks = 0
        self._pg: Any = None
        self._redis: Any = None
        self._mongo: Any = None
        self._failing: set[str] = set()

    async def setup(self) -> None:
        """Create the demo's tables (idempotent), so the Postgres connector can attach to them."""
        if self.postgres_dsn:
            conn = await self._postgres()
            await conn.execute(SCHEMA_SQL)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                await self.tick()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval)
        finally:
            await self.close()

    async def tick(self) -> None:
        self.ticks += 1
        for name, enabled, step in (
            ("postgres", self.postgres_dsn, self._postgres_step),
            ("redis", self.redis_url, self._redis_step),
            ("mongodb", self.mongodb_url, self._mongo_step),
        ):
            if not enabled:
                continue
            try:
                await asyncio.wait_for(step(), timeout=10)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a source restarting must not end the demo
                if name not in self._failing:
                    log.warning("demo writer: %s write failed (%s); retrying", name, exc)
                self._failing.add(name)
                await self._drop(name)
            else:
                if name in self._failing:
                    log.info("demo writer: %s writes resumed", name)
                self._failing.discard(name)

    async def close(self) -> None:
        for name in ("postgres", "redis", "mongodb"):
            await self._drop(name)

    # -- Postgres ------------------------------------------------------------------------------

    async def _postgres(self) -> Any:
        import asyncpg

        if self._pg is None or self._pg.is_closed():
            self._pg = await asyncpg.connect(self.postgres_dsn, timeout=10)
        return self._pg

    async def _postgres_step(self) -> None:
        conn = await self._postgres()
        rnd = self.random
        customers = await conn.fetchval("SELECT count(*) FROM public.customers")
        if customers < 5 or rnd.random() < 0.1:
            name = rnd.choice(NAMES)
            await conn.execute(
                "INSERT INTO public.customers (name, email) VALUES ($1, $2)",
                name,
                f"{name.lower()}{rnd.randint(1, 999)}@example.com",
            )
        elif rnd.random() < 0.3:
            await conn.execute(
                "UPDATE public.customers SET tier = $1"
                " WHERE id = (SELECT id FROM public.customers ORDER BY random() LIMIT 1)",
                rnd.choice(["standard", "silver", "gold"]),
            )
        await conn.execute(
            "INSERT INTO public.orders (customer_id, amount)"
            " SELECT id, $1 FROM public.customers ORDER BY random() LIMIT 1",
            Decimal(rnd.randint(500, 50000)) / 100,
        )
        row = await conn.fetchrow(
            "SELECT id, status FROM public.orders WHERE status <> 'shipped'"
            " ORDER BY updated_at LIMIT 1"
        )
        if row is not None and row["status"] in NEXT_STATUS:
            await conn.execute(
                "UPDATE public.orders SET status = $1, updated_at = now() WHERE id = $2",
                NEXT_STATUS[row["status"]],
                row["id"],
            )
        await conn.execute(
            "DELETE FROM public.orders WHERE id = ("
            " SELECT id FROM public.orders WHERE status = 'shipped' ORDER BY id LIMIT 1)"
            " AND (SELECT count(*) FROM public.orders) > $1",
            KEEP_ROWS,
        )

    # -- Redis ---------------------------------------------------------------------------------

    async def _redis_step(self) -> None:
        from redis.asyncio import Redis

        if self._redis is None:
            self._redis = Redis.from_url(self.redis_url or "", socket_timeout=10)
        client = self._redis
        rnd = self.random
        user = rnd.randint(1, 8)
        session = f"session:{rnd.getrandbits(32):08x}"
        await client.set(
            session, json.dumps({"user": user, "page": rnd.choice(["/", "/cart", "/orders"])}),
            ex=SESSION_TTL,
        )  # fmt: skip
        await client.hset(
            f"user:{user}",
            mapping={"name": NAMES[user % len(NAMES)], "visits": str(self.ticks)},
        )
        if self.ticks % 5 == 0:
            # Sign one session out early: a `del` rather than an expiry.
            async for key in client.scan_iter(match="session:*", count=100):
                if key.decode() != session:
                    await client.delete(key)
                    break

    # -- MongoDB -------------------------------------------------------------------------------

    async def _mongo_step(self) -> None:
        from pymongo import AsyncMongoClient

        if self._mongo is None:
            self._mongo = AsyncMongoClient(self.mongodb_url, serverSelectionTimeoutMS=10_000)
        orders = self._mongo[self.mongodb_db][self.mongodb_collection]
        rnd = self.random
        await orders.insert_one(
            {
                "sku": rnd.choice(["tea", "coffee", "cocoa", "mate"]),
                "qty": rnd.randint(1, 5),
                "status": "pending",
                "tick": self.ticks,
            }
        )
        doc = await orders.find_one({"status": {"$ne": "shipped"}}, sort=[("tick", 1)])
        if doc is not None and doc["status"] in NEXT_STATUS:
            await orders.update_one(
                {"_id": doc["_id"]}, {"$set": {"status": NEXT_STATUS[doc["status"]]}}
            )
        if await orders.count_documents({}) > KEEP_ROWS:
            oldest = await orders.find_one({"status": "shipped"}, sort=[("tick", 1)])
            if oldest is not None:
                await orders.delete_one({"_id": oldest["_id"]})

    async def _drop(self, name: str) -> None:
        """Close one source's client so the next tick reconnects from scratch."""
        with contextlib.suppress(Exception):
            if name == "postgres" and self._pg is not None:
                await self._pg.close(timeout=5)
            elif name == "redis" and self._redis is not None:
                await self._redis.aclose()
            elif name == "mongodb" and self._mongo is not None:
                await self._mongo.close()
        if name == "postgres":
            self._pg = None
        elif name == "redis":
            self._redis = None
        elif name == "mongodb":
            self._mongo = None


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m feed.demo.demo_writer`: the compose stack's writer service."""
    parser = argparse.ArgumentParser(
        prog="python -m feed.demo.demo_writer",
        description="Write demo changes to the sources named by DATABASE_URL, REDIS_URL and "
        "MONGODB_URL (each optional) about once a second.",
    )
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between ticks")
    parser.add_argument(
        "--mongodb-namespace",
        default=MONGODB_WATCH[0],
        help=f"database.collection to write documents to (default {MONGODB_WATCH[0]})",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    writer = DemoWriter(
        postgres_dsn=os.environ.get("DATABASE_URL") or None,
        redis_url=os.environ.get("REDIS_URL") or None,
        mongodb_url=os.environ.get("MONGODB_URL") or None,
        interval=args.interval,
        mongodb_namespace=args.mongodb_namespace,
    )
    if not (writer.postgres_dsn or writer.redis_url or writer.mongodb_url):
        print(
            "demo writer: set DATABASE_URL, REDIS_URL or MONGODB_URL to say where to write",
            file=sys.stderr,
        )
        return 2

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await writer.setup()
        sources = [
            name
            for name, url in (
                ("postgres", writer.postgres_dsn),
                ("redis", writer.redis_url),
                ("mongodb", writer.mongodb_url),
            )
            if url
        ]
        log.info("demo writer: writing to %s every %.1fs", ", ".join(sources), writer.interval)
        await writer.run(stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
