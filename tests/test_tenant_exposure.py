"""What tenants learn besides their rows (issue 18 item 7): connector status details, which name
hosts, databases and roles, go to operators only; tenants get a generic line."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from connectors.base import State
from connectors.memory import MemoryConnector
from tests.auth_helpers import BASE, TOKENS, source, token_config
from tests.support.server import FeedClient, feed_client, free_port, running_feed

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
