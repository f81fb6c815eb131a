"""What tenants learn besides their rows (issue 18 item 7): connector status details, which name
hosts, databases and roles, go to operators only; tenants get a generic line."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import pytest

from connectors.base import State
from connectors.memory import MemoryConnector
from feed.security.access import covers_under, may_match_under
from feed.security.auth import hash_token
from tests.auth_helpers import BASE, TOKENS, source, token_config
from tests.support.cluster import memory, reader_of, subscribed
from tests.support.mongodb import MongoSource, db, mongodb, shop_connector  # noqa: F401
from tests.support.redis import open_redis_target
from tests.support.server import FeedClient, feed_client, free_port, running_feed
from tests.support.waiting import wait_until

SECRET_DETAIL = 'connection to "db.internal:5432" refused for role "feed_rw" on database "prod"'


async def next_down(client: FeedClient) -> dict[str, Any]:
    while True:
        status = await asyncio.wait_for(client.statuses.get(), 10)
        if status["state"] == "down":
            return status


async def test_status_details_reach_operators_and_tenants_get_a_generic_line() -> None:
    async with running_feed(token_config()) as feed:
        ops_auth, acme_auth = {"token": TOKENS["ops"]}, {"token": TOKENS["acme-svc"]}
        async with (
            feed_client(feed.url, auth=ops_auth) as ops,
            feed_client(feed.url, auth=acme_auth) as acme,
        ):
            source(feed).set_status(State.DOWN, SECRET_DETAIL)
            seen_by_ops, seen_by_acme = await next_down(ops), await next_down(acme)
            assert seen_by_ops["detail"] == SECRET_DETAIL
            assert (
                seen_by_acme["detail"]
                == "the source is unavailable; changes resume when it is back"
            )
            assert "db.internal" not in str(seen_by_acme)
            ops_catalog, acme_catalog = await ops.call("catalog"), await acme.call("catalog")
            assert ops_catalog["connectors"][0]["status"]["detail"] == SECRET_DETAIL
            assert acme_catalog["connectors"][0]["status"]["state"] == "down"
            assert "db.internal" not in str(acme_catalog)
        async with aiohttp.ClientSession() as http, http.get(feed.url + "/readyz") as ready:
            body = await ready.json()  # operators' own endpoint keeps the detail
        assert body["connectors"]["mem"]["detail"] == SECRET_DETAIL


async def test_operator_roles_are_configurable_and_a_loopback_server_without_auth_tells_all() -> (
    None
):
    config = token_config().replace(
        'mode = "token"', 'mode = "token"\noperator_roles = ["support"]'
    )
    support_auth = {"token": TOKENS["globex-svc"]}
    async with running_feed(config) as feed, feed_client(feed.url, auth=support_auth) as support:
        source(feed).set_status(State.DOWN, SECRET_DETAIL)
        assert (await next_down(support))["detail"] == SECRET_DETAIL
    async with running_feed(BASE) as feed, feed_client(feed.url) as anonymous:
        source(feed).set_status(State.DOWN, SECRET_DETAIL)
        assert (await next_down(anonymous))["detail"] == SECRET_DETAIL


async def test_a_failed_snapshot_tells_the_source_detail_to_operators_only() -> None:
    """A `snapshot_failed` carried the driver's words (`postgres 127.0.0.1:5432/prod: not
    connected`) to every client, the host and database that `status` withholds from tenants."""
    config = token_config().replace(
        BASE.strip(),
        BASE.strip()
        + f"""

[[connectors]]
name = "main"
type = "postgres"
dsn = "postgresql://feed_rw@127.0.0.1:{free_port()}/prod_secrets"
tables = ["public.orders"]
""",
    )
    config = config.replace(
        'allow = ["mem:public.orders", "mem:public.customers"]',
        'allow = ["mem:public.orders", "mem:public.customers", "main:public.orders"]',
    )
    async with running_feed(config) as feed:
        ops_auth, acme_auth = {"token": TOKENS["ops"]}, {"token": TOKENS["acme-svc"]}
        async with (
            feed_client(feed.url, auth=ops_auth) as ops,
            feed_client(feed.url, auth=acme_auth) as acme,
        ):
            told_ops = await ops.subscribe("main:public.orders", snapshot=True)
            told_acme = await acme.subscribe("main:public.orders", snapshot=True)
    assert told_ops["error"]["code"] == told_acme["error"]["code"] == "snapshot_failed"
    assert "prod_secrets" in told_ops["error"]["message"]
    assert "prod_secrets" not in str(told_acme) and "127.0.0.1" not in str(told_acme)


async def test_status_goes_only_to_those_who_may_follow_the_connector() -> None:
    """The catalog lists only what an identity may follow; `status` went to everyone, so a
    tenant learnt of every connector (its name, whether it was down) all the same."""
    config = token_config().replace(
        BASE.strip(),
        BASE.strip() + '\n\n[[connectors]]\nname = "billing"\ntype = "memory"\ntargets = ["t"]\n',
    )
    async with running_feed(config) as feed:
        ops_auth, acme_auth = {"token": TOKENS["ops"]}, {"token": TOKENS["acme-svc"]}
        async with (
            feed_client(feed.url, auth=ops_auth) as ops,
            feed_client(feed.url, auth=acme_auth) as acme,
        ):
            billing = feed.hub.connectors["billing"]
            assert isinstance(billing, MemoryConnector)
            billing.set_status(State.DOWN, SECRET_DETAIL)
            source(feed).set_status(State.DOWN, SECRET_DETAIL)
            assert (await next_down(ops))["connector"] == "billing"
            assert (await next_down(ops))["connector"] == "mem"
            # The second status reached acme, so the first would have come before it.
            assert (await next_down(acme))["connector"] == "mem"
            catalog = await acme.call("catalog")
        assert [c["name"] for c in catalog["connectors"]] == ["mem"]


OTHER_TENANTS_WORDS = "the value of 'user:globex:alice@globex.example' could not be read"


@pytest.mark.parametrize("in_cluster", [False, True], ids=["single", "cluster"])
async def test_a_gap_reaches_a_tenants_room_without_the_connectors_words(in_cluster: bool) -> None:
    """A gap's reason is the connector's account of the whole source: a Redis value it could not
    read names that key (another tenant's, an e-mail say), a truncated partition its name
    (`orders_globex`). It reached every room of the target, tenants' shaped rooms too, so a
    tenant read another tenant's key in it. Shaped rooms now get a generic line; unshaped
    rooms (operators, and anyone who may see every row) keep the connector's words."""
    config = token_config()
    async with AsyncExitStack() as stack:
        if in_cluster:
            target = await stack.enter_async_context(open_redis_target())
            prefix = target.prefix.rstrip(":")
            config += f'\n[cluster]\nurl = "{target.url}"\nprefix = "{prefix}"\nlease = 1.0\n'
        nodes = [
            await stack.enter_async_context(
                running_feed(config + (f'node = "n{i}"\n' if in_cluster else ""))
            )
            for i in range(2 if in_cluster else 1)
        ]
        reader = await reader_of(nodes) if in_cluster else nodes[0]
        other = next((n for n in nodes if n is not reader), reader)
        ops = await stack.enter_async_context(feed_client(other.url, auth={"token": TOKENS["ops"]}))
        acme = await stack.enter_async_context(
            feed_client(other.url, auth={"token": TOKENS["acme-svc"]})
        )
        await subscribed(ops, "mem:public.orders")
        shaped = (await subscribed(acme, "mem:public.orders"))["room"]
        if in_cluster:
            await wait_until(
                lambda: shaped in reader.engine._index["mem"]["public.orders"].filtered,
                10,
                "the reader to route the tenant's room",
            )
        memory(reader).announce_gap(OTHER_TENANTS_WORDS)
        told_ops, told_acme = await ops.next_gap(), await acme.next_gap()
    assert told_ops["reason"] == OTHER_TENANTS_WORDS
    assert told_acme["room"] == shaped
    assert told_acme["reason"] == "the source may have lost changes; reload"


def whole_database_config(source: MongoSource, database: str, rules: str) -> str:
    return f"""
[server]
replay_buffer = 50
{shop_connector(source, database)}
[auth]
mode = "token"

[[auth.tokens]]
name = "ops"
sha256 = "{hash_token(TOKENS["ops"])}"
roles = ["admin", "tenant"]
claims = {{ tenant = "ops" }}

[[auth.tokens]]
name = "acme-svc"
sha256 = "{hash_token(TOKENS["acme-svc"])}"
roles = ["tenant"]
claims = {{ tenant = "acme" }}

[[auth.rules]]
roles = ["admin"]
allow = ["*"]
{rules}
[[auth.masks]]
rooms = ["shop:{database}.people"]
fields = ["password_hash"]
except_roles = ["admin"]
"""


@pytest.mark.mongodb
async def test_a_whole_databases_room_is_shaped_as_its_collections_are(
    mongodb: MongoSource,  # noqa: F811
    db: str,  # noqa: F811
) -> None:
    """A database watched whole has a room (`shop:crm`) that receives every change of every
    collection. Masks and rules were decided by that room's own name, so a mask on
    `shop:crm.people` did not apply there, and a rule that row-filtered `shop:crm.people`
    was bypassed by a later one allowing `shop:*`: a tenant read another tenant's people,
    password hashes included, through the database's room."""
    await mongodb.client[db].create_collection("people")
    one_rule = """
[[auth.rules]]
roles = ["tenant"]
allow = ["shop:*"]
row_filter = "tenant_id=eq.{tenant}"
"""
    two_rules = f"""
[[auth.rules]]
roles = ["tenant"]
allow = ["shop:{db}.people"]
row_filter = "tenant_id=eq.{{tenant}}"

[[auth.rules]]
roles = ["tenant"]
allow = ["shop:*"]
"""
    people = mongodb.client[db]["people"]
    async with running_feed(whole_database_config(mongodb, db, one_rule)) as feed:
        await wait_connector_up(feed, "shop")
        async with (
            feed_client(feed.url, auth={"token": TOKENS["acme-svc"]}) as acme,
            feed_client(feed.url, auth={"token": TOKENS["ops"]}) as ops,
        ):
            await subscribed(acme, f"shop:{db}")
            await subscribed(ops, f"shop:{db}")
            await people.insert_one({"_id": 1, "tenant_id": "globex", "password_hash": "G"})
            await people.insert_one({"_id": 2, "tenant_id": "acme", "password_hash": "A"})
            seen_by_acme = await acme.next_change()
            seen_by_ops = await ops.take(2)
    assert seen_by_acme["after"] == {"_id": 2, "tenant_id": "acme"}
    assert [c["after"]["password_hash"] for c in seen_by_ops] == ["G", "A"]
    async with running_feed(whole_database_config(mongodb, db, two_rules)) as feed:
        await wait_connector_up(feed, "shop")
        async with (
            feed_client(feed.url, auth={"token": TOKENS["acme-svc"]}) as acme,
            feed_client(feed.url, auth={"token": TOKENS["ops"]}) as ops,
        ):
            refused = await acme.subscribe(f"shop:{db}")
            assert (await ops.subscribe(f"shop:{db}"))["ok"]
            assert (await acme.subscribe(f"shop:{db}.people"))["ok"]
    assert refused["error"]["code"] == "forbidden", refused
    assert f"shop:{db}.<collection>" in refused["error"]["message"]


async def wait_connector_up(feed: Any, name: str) -> None:
    await wait_until(
        lambda: feed.hub.connectors[name].status.state is State.UP, 15, f"{name} to be up"
    )


@pytest.mark.parametrize(
    ("pattern", "may", "covers"),
    [
        ("*", True, True),
        ("shop:*", True, True),
        ("shop:crm.*", True, True),
        ("shop:crm*", True, True),
        ("shop:crm.people", True, False),
        ("shop:crm.p?ople:4*", True, False),
        ("shop:cr[mx].people", True, False),
        ("shop:crm", False, False),
        ("shop:crmx.people", False, False),
        ("cache:*", False, False),
        ("shop:c*m.people", True, False),
    ],
)
def test_which_rule_patterns_reach_the_targets_a_room_carries(
    pattern: str, may: bool, covers: bool
) -> None:
    assert may_match_under(pattern, "shop:crm.") is may
    assert covers_under(pattern, "shop:crm.") is covers
