"""Authorization: rules, forced row filters and masks, with no leak on any delivery path.

The property tests drive the real hub (real MemoryConnector, real routing, replay and snapshot
code) through a transport that behaves like Socket.IO rooms, and compare what every client
received with an independent oracle written from the rules. The end-to-end tests then repeat the
important paths over real Socket.IO connections.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.base import RoomAddress
from connectors.memory import MemoryConnector
from feed.app.config import parse_config
from feed.core.change import Change, to_json
from feed.core.filters import parse_filter
from feed.delivery.protocol import SubscribeRequest, error_ack
from feed.errors import ProtocolError
from feed.options import Options
from feed.routing.hub import Hub
from feed.routing.settings import ServerConfig
from feed.security.access import Authorizer, Shape, render_filter, strip
from feed.security.auth import Identity, hash_token
from tests.auth_helpers import SPECIAL_CLAIMS, TOKENS, jwt_config, make_jwt, source, token_config
from tests.support.server import FeedClient, feed_client, running_feed
from tests.support.waiting import wait_until

WAIT = 10.0
TENANTS = ("acme", "globex")
REFUSED = {"null"}  # of SPECIAL_CLAIMS: the claim "null" cannot be filled in, so it is refused
ROW_TENANTS = (*TENANTS, None, *SPECIAL_CLAIMS.values())
IDENTITIES = {
    "ops": Identity("ops", frozenset({"admin"}), {"sub": "ops"}),
    "acme": Identity("acme-svc", frozenset({"tenant"}), {"tenant": "acme"}),
    "globex": Identity("globex-svc", frozenset({"tenant", "support"}), {"tenant": "globex"}),
    "nobody": Identity("nobody", frozenset(), {}),
    **{
        who: Identity(f"{who}-svc", frozenset({"tenant"}), {"tenant": claim})
        for who, claim in SPECIAL_CLAIMS.items()
    },
}
MASKS: dict[str, dict[str, list[tuple[str, ...]]]] = {
    "ops": {},
    "acme": {"public.customers": [("password_hash",), ("profile", "ssn")]},
    "globex": {
        "public.customers": [("password_hash",), ("profile", "ssn"), ("internal_note",)],
        "public.orders": [("internal_note",)],
    },
    **{
        who: {"public.customers": [("password_hash",), ("profile", "ssn")]}
        for who in SPECIAL_CLAIMS
    },
}


def authorizer() -> Authorizer:
    return Authorizer(parse_config(token_config(), "feed.toml", {}).auth)


# -- the oracle ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One subscription: who, which target, and optionally a row key or a client filter."""

    who: str
    target: str
    key: int | None = None
    filter: str | None = None

    @property
    def room(self) -> str:
        return f"mem:{self.target}" + (f":{self.key}" if self.key is not None else "")

    def tenant(self) -> str | None:
        return IDENTITIES[self.who].claims.get("tenant")

    @property
    def refused(self) -> bool:
        """Its identity's claim cannot be filled into the row filter: every subscribe fails."""
        return self.who in REFUSED

    def matches(self, image: Mapping[str, Any] | None) -> bool:
        """Does this image satisfy the forced filter and the client's filter?"""
        if image is None:
            return False
        tenant = self.tenant()
        if tenant is not None and image.get("tenant_id") != tenant:
            return False
        return self.filter is None or image.get("status") == "paid"

    def expected(self, change: Change) -> dict[str, Any] | None:
        """What this subscriber must receive for a change (None: nothing at all)."""
        if change.target != self.target or self.refused:
            return None
        if self.key is not None and change.row_key != str(self.key):
            return None
        filtered = self.filter is not None or self.tenant() is not None
        if filtered and not (self.matches(change.before) or self.matches(change.after)):
            return None
        masked = MASKS[self.who].get(self.target, [])
        tenant = self.tenant()

        def shown(image: Mapping[str, Any] | None) -> Any:
            if image is None or (tenant is not None and image.get("tenant_id") != tenant):
                return None
            return to_json(strip(image, masked))

        return {"id": change.id, "before": shown(change.before), "after": shown(change.after)}

    def snapshot_row(self, row: Mapping[str, Any]) -> Any:
        if (
            self.refused
            or not self.matches(row)
            or (self.key is not None and row["id"] != self.key)
        ):
            return None
        return to_json(strip(row, MASKS[self.who].get(self.target, [])))


rows = st.fixed_dictionaries(
    {
        "id": st.integers(1, 4),
        "tenant_id": st.sampled_from(ROW_TENANTS),
        "status": st.sampled_from(["new", "paid"]),
    },
    optional={
        "password_hash": st.just("$argon2$secret"),
        "profile": st.fixed_dictionaries({"ssn": st.just("078-05-1120"), "city": st.just("Oslo")}),
        "internal_note": st.just("vip"),
    },
)
writes = st.lists(
    st.tuples(
        st.sampled_from(["public.orders", "public.customers"]),
        st.sampled_from(["insert", "update", "update", "delete"]),
        rows,
    ),
    max_size=12,
)
specs = st.builds(
    Spec,
    who=st.sampled_from(["ops", "acme", "globex", *SPECIAL_CLAIMS]),
    target=st.sampled_from(["public.orders", "public.customers"]),
    key=st.none() | st.integers(1, 4),
    filter=st.none() | st.just("status=eq.paid"),
)


# -- a hub with Socket.IO-like rooms -------------------------------------------------------------


@dataclass
class RoomsTransport:
    """Delivers like python-socketio rooms: to members of a room, minus the skipped sids."""

    members: dict[str, set[str]] = field(default_factory=dict)
    received: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def hold(self, first_at_once: bool = True) -> None:
        pass

    def flush(self) -> None:
        pass

    def enter(self, sid: str, room: str) -> None:
        self.members.setdefault(room, set()).add(sid)

    def leave(self, sid: str, room: str) -> None:
        self.members.get(room, set()).discard(sid)

    async def send_room(self, room: str, event: str, data: Any, skip: list[str]) -> None:
        for sid in self.members.get(room, set()) - set(skip):
            await self.send_to(sid, event, data)

    def send_change(self, room: str, data: Any, skip: list[str]) -> bool:
        for sid in self.members.get(room, set()) - set(skip):
            self.received.setdefault(sid, []).append(data)
        return False

    async def send_to(self, sid: str, event: str, data: Any) -> None:
        if event in ("change", "changes"):
            self.received.setdefault(sid, []).extend(data if isinstance(data, list) else [data])

    async def send_paced(self, sid: str, event: str, data: Any) -> None:
        await self.send_to(sid, event, data)

    async def broadcast(self, event: str, data: Any) -> None:
        pass

    async def disconnect_all(self) -> None:
        pass


async def settle(hub: Hub, db: MemoryConnector) -> None:
    await wait_until(lambda: db._delivered == db._written, what="every write routed")
    while hub._background:
        await asyncio.wait_for(asyncio.gather(*list(hub._background)), WAIT)


async def subscribe(hub: Hub, sid: str, spec: Spec, **fields: Any) -> dict[str, Any]:
    _, address = hub.resolve(spec.room)
    client_filter = parse_filter(spec.filter) if spec.filter else None
    try:
        shape = authorizer().grant(IDENTITIES[spec.who], "mem", address, client_filter)
    except ProtocolError as exc:
        assert spec.refused and exc.code == "forbidden", (spec, exc)
        return error_ack(exc)
    assert not spec.refused, spec
    request = SubscribeRequest(spec.room, spec.filter, **fields)
    return await hub.subscribe(sid, request, shape=shape)


def payload_view(payload: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": payload["id"], "before": payload["before"], "after": payload["after"]}


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(subscriptions=st.lists(specs, min_size=1, max_size=6), first=writes, second=writes)
async def test_no_leak_on_live_replay_and_snapshot_paths(
    subscriptions: list[Spec],
    first: list[tuple[str, str, dict[str, Any]]],
    second: list[tuple[str, str, dict[str, Any]]],
) -> None:
    db = MemoryConnector(
        "mem", Options({"targets": ["public.orders", "public.customers"]}, "connectors[0]")
    )
    hub = Hub([db], ServerConfig(replay_buffer=1000))
    transport = RoomsTransport()
    hub.transport = transport
    changes: list[Change] = []
    async with hub:
        await wait_until(lambda: db.started == 1, what="connector started")
        for i, spec in enumerate(subscriptions):
            await subscribe(hub, f"live{i}", spec)
        changes += [db.write(t, op, row) for t, op, row in first]
        await settle(hub, db)
        snapshots: dict[int, list[Any]] = {}
        for i, spec in enumerate(subscriptions):
            ack = await subscribe(hub, f"replay{i}", spec, since=0)
            assert ack.get("recovered") is True or spec.refused
            ack = await subscribe(hub, f"snap{i}", spec, snapshot=True)
            snapshots[i] = ack.get("snapshot", [])
        tables = {t: [dict(r) for r in db._tables[t].values()] for t in db._tables}
        split = len(changes)
        changes += [db.write(t, op, row) for t, op, row in second]
        await settle(hub, db)

    for i, spec in enumerate(subscriptions):
        everything = [e for e in (spec.expected(c) for c in changes) if e is not None]
        later = [e for e in (spec.expected(c) for c in changes[split:]) if e is not None]
        for sid, expected in ((f"live{i}", everything), (f"replay{i}", everything)):
            got = [payload_view(p) for p in transport.received.get(sid, [])]
            assert got == expected, (sid, spec)
        got = [payload_view(p) for p in transport.received.get(f"snap{i}", [])]
        assert got == later, (f"snap{i}", spec)
        current = [spec.snapshot_row(r) for r in tables[spec.target]]
        expected_rows = sorted((r for r in current if r is not None), key=lambda r: r["id"])
        assert sorted(snapshots[i], key=lambda r: r["id"]) == expected_rows, spec
        for payload in transport.received.get(f"live{i}", []):
            assert "meta" not in payload or spec.who == "ops"


@given(
    before=st.none() | rows,
    after=st.none() | rows,
    tenant=st.sampled_from(TENANTS),
    masked=st.sets(st.sampled_from(["password_hash", "profile.ssn", "internal_note"])),
)
def test_a_shaped_payload_never_shows_another_tenant_or_a_masked_field(
    before: dict[str, Any] | None, after: dict[str, Any] | None, tenant: str, masked: set[str]
) -> None:
    shape = Shape(
        parse_filter(f"tenant_id=eq.{tenant}"), tuple(tuple(m.split(".")) for m in masked)
    )
    change = Change("c:1", "mem", "memory", "public.orders", "update", 1, before, after)
    payload = dict(change.wire)
    shape.apply(change, payload)
    for image in (payload["before"], payload["after"]):
        if image is not None:
            assert image["tenant_id"] == tenant
            assert not {"password_hash", "internal_note"} & set(image) & masked
            assert "profile.ssn" not in masked or "ssn" not in image.get("profile", {})
    assert change.wire["before"] == to_json(before)  # the shared payload is untouched


def test_rules_decide_in_order_and_deny_by_default() -> None:
    rules = authorizer()
    address = RoomAddress
    assert rules.grant(IDENTITIES["ops"], "mem", address("public.audit")) is None
    acme = rules.grant(IDENTITIES["acme"], "mem", address("public.orders", "7"))
    assert acme is not None and acme.forced is not None
    assert acme.forced.canonical == "tenant_id=eq.acme"
    with pytest.raises(ProtocolError) as denied:
        rules.grant(IDENTITIES["acme"], "mem", address("public.audit"))
    assert denied.value.code == "forbidden"
    with pytest.raises(ProtocolError) as nobody:
        rules.grant(IDENTITIES["nobody"], "mem", address("public.orders"))
    assert nobody.value.code == "forbidden"
    no_claim = Identity("x", frozenset({"tenant"}), {})
    with pytest.raises(ProtocolError, match="no 'tenant' claim"):
        rules.grant(no_claim, "mem", address("public.orders"))
    for claim in ("null", ["acme", "null"]):  # would read as NULL, not as the text "null"
        special = Identity("x", frozenset({"tenant"}), {"tenant": claim})
        with pytest.raises(ProtocolError, match="'tenant' claim is 'null'") as refused:
            rules.grant(special, "mem", address("public.orders"))
        assert refused.value.code == "forbidden"
    halves = Identity("x", frozenset(), {"a": "nu", "b": "ll"})
    with pytest.raises(ProtocolError, match="would not read as text"):
        render_filter("tenant_id=eq.{a}{b}", halves)
    kept = render_filter("deleted=eq.null&tenant_id=eq.{a}", halves)  # the rule's own null
    assert kept.canonical == "deleted=eq.null&tenant_id=eq.nu"
    hostile = Identity("x", frozenset({"tenant"}), {"tenant": "acme&tenant_id=neq.acme"})
    shape = rules.grant(hostile, "mem", address("public.orders"))
    assert shape is not None and shape.forced is not None and len(shape.forced.conditions) == 1
    with pytest.raises(ProtocolError) as oracle:
        rules.grant(
            IDENTITIES["acme"],
            "mem",
            address("public.customers"),
            parse_filter("password_hash=gt.$a"),
        )
    assert oracle.value.code == "forbidden_filter"
    with pytest.raises(ProtocolError):
        rules.grant(
            IDENTITIES["acme"], "mem", address("public.customers"), parse_filter("profile=eq.x")
        )


# -- end to end over Socket.IO -------------------------------------------------------------------


async def test_tenants_get_only_their_rows_over_socketio() -> None:
    async with running_feed(token_config()) as feed:
        db = source(feed)
        ops_auth = {"token": TOKENS["ops"]}
        acme_auth = {"token": TOKENS["acme-svc"]}
        globex_auth = {"token": TOKENS["globex-svc"]}
        async with (
            feed_client(feed.url, auth=ops_auth) as ops,
            feed_client(feed.url, auth=acme_auth) as acme,
            feed_client(feed.url, auth=globex_auth) as globex,
        ):
            assert (await acme.subscribe("mem:public.audit"))["error"]["code"] == "forbidden"
            ack = await acme.subscribe("mem:public.orders", filter="tenant_id=eq.globex")
            assert ack["ok"]  # allowed, but the forced filter makes it empty
            acme_room = (await acme.subscribe("mem:public.orders"))["room"]
            assert acme_room.startswith("mem:public.orders?tenant_id=eq.acme@")
            await globex.subscribe("mem:public.orders")
            await ops.subscribe("mem:public.orders")
            db.write("public.orders", "insert", {"id": 1, "tenant_id": "globex", "amount": 5})
            db.write("public.orders", "update", {"id": 1, "tenant_id": "acme"})  # moved
            db.write("public.orders", "update", {"id": 1, "amount": 7})
            db.write("public.orders", "update", {"id": 1, "tenant_id": "globex"})  # moved back
            seen_by_ops = await ops.take(4)
            seen_by_acme = await acme.take(3)
            seen_by_globex = await globex.take(3)
            catalog = await acme.call("catalog")
        assert [c["seq"] for c in seen_by_ops] == [1, 2, 3, 4]
        assert seen_by_ops[1]["before"]["tenant_id"] == "globex"  # admins see everything
        moved_in, own, moved_out = seen_by_acme
        assert moved_in["before"] is None and moved_in["after"]["tenant_id"] == "acme"
        assert own["before"]["amount"] == 5 and own["after"]["amount"] == 7
        assert moved_out["before"]["tenant_id"] == "acme" and moved_out["after"] is None
        assert {c["room"] for c in seen_by_acme} == {acme_room}
        assert seen_by_globex[0]["after"]["tenant_id"] == "globex"
        assert seen_by_globex[1]["after"] is None and seen_by_globex[2]["before"] is None
        assert acme.changes.empty()
        assert [t for c in catalog["connectors"] for t in c["targets"]] == [
            "public.orders",
            "public.customers",
        ]


async def test_masks_apply_on_live_replay_and_snapshot_over_socketio() -> None:
    secret_row = {
        "id": 1,
        "tenant_id": "acme",
        "password_hash": "$argon2$x",
        "profile": {"ssn": "078-05-1120", "city": "Oslo"},
    }
    async with running_feed(token_config()) as feed:
        db = source(feed)
        db.write("public.customers", "insert", secret_row)
        db.write("public.customers", "insert", {"id": 2, "tenant_id": "other"})
        async with feed_client(feed.url, auth={"token": TOKENS["acme-svc"]}) as first:
            ack = await first.subscribe("mem:public.customers", snapshot=True)
            assert ack["snapshot"] == [{"id": 1, "tenant_id": "acme", "profile": {"city": "Oslo"}}]
            assert ack["snapshot_keys"] == ["1"]  # the hidden row's key went with it
            db.write("public.customers", "update", {"id": 1, "password_hash": "$argon2$y"})
            live = await first.next_change()
        async with feed_client(feed.url, auth={"token": TOKENS["acme-svc"]}) as second:
            replay_ack = await second.subscribe("mem:public.customers", since=0)
            assert replay_ack["recovered"] is True and replay_ack["room"] == ack["room"]
            replayed = await second.next_change()
            row_ack = await second.subscribe("mem:public.customers:1", snapshot=True)
            assert "password_hash" not in row_ack["snapshot"][0]
        async with feed_client(feed.url, auth={"token": TOKENS["ops"]}) as ops:
            ops_ack = await ops.subscribe("mem:public.customers", snapshot=True)
        for image in (live["before"], live["after"], replayed["before"], replayed["after"]):
            assert "password_hash" not in image and image["profile"] == {"city": "Oslo"}
        assert ops_ack["snapshot"][0]["password_hash"] == "$argon2$y"


async def test_a_shaped_room_is_told_the_key_a_row_it_was_shown_moved_from() -> None:
    """Masks withhold a change's `meta`, but not the old key of a row the identity was shown:
    without it a client keeps that row under a key that no longer exists."""
    async with running_feed(token_config()) as feed:
        db = source(feed)
        db.write("public.customers", "insert", {"id": 1, "tenant_id": "acme", "password_hash": "x"})
        db.write("public.customers", "insert", {"id": 2, "tenant_id": "other"})
        async with feed_client(feed.url, auth={"token": TOKENS["acme-svc"]}) as acme:
            assert (await acme.subscribe("mem:public.customers"))["ok"]
            db.write("public.customers", "update", {"id": 5}, moved_from={"id": 2})  # not acme's
            db.write("public.customers", "update", {"id": 7}, moved_from={"id": 1})
            seen = await acme.next_change()
    assert seen["key"] == 7 and seen["meta"] == {"old_key": 1}
    assert "password_hash" not in seen["before"] and "password_hash" not in seen["after"]


async def test_a_row_moved_to_another_tenant_under_a_new_key_shows_only_the_old_key() -> None:
    """A row that leaves a tenant and changes its key at once: the tenant learns that its row
    left, under the key it knew; the new key is the other tenant's (a natural key, an order
    number, can be their data). Before, `key` carried the new one."""
    async with running_feed(token_config()) as feed:
        db = source(feed)
        db.write("public.orders", "insert", {"id": 6, "tenant_id": "acme", "status": "new"})
        async with feed_client(feed.url, auth={"token": TOKENS["acme-svc"]}) as acme:
            assert (await acme.subscribe("mem:public.orders"))["ok"]
            row = await acme.subscribe("mem:public.orders:6")
            assert row["ok"], row
            db.write(
                "public.orders",
                "update",
                {"id": 777, "tenant_id": "globex"},
                moved_from={"id": 6},
            )
            seen = [await acme.next_change(), await acme.next_change()]
    for change in seen:
        assert change["key"] == 6 and change["after"] is None and change["left"] is True
        assert change["meta"] == {"old_key": 6}
        assert "777" not in json.dumps(change)


async def test_masks_reach_into_arrays_as_dotted_paths_read() -> None:
    """`profile.ssn` is masked in every object of an array at `profile`, as a MongoDB dotted
    path reads; before, only an object at `profile` was masked, and an array of them went out
    whole."""
    async with running_feed(token_config()) as feed:
        db = source(feed)
        async with feed_client(feed.url, auth={"token": TOKENS["acme-svc"]}) as acme:
            assert (await acme.subscribe("mem:public.customers"))["ok"]
            profile = [{"city": "Oslo", "ssn": "S-1"}, [{"ssn": "S-2"}], "S-3"]
            db.write(
                "public.customers", "insert", {"id": 1, "tenant_id": "acme", "profile": profile}
            )
            seen = await acme.next_change()
            snap = await acme.subscribe("mem:public.customers", snapshot=True)
    assert seen["after"]["profile"] == [{"city": "Oslo"}, [{}], "S-3"]
    assert snap["snapshot"][0]["profile"] == [{"city": "Oslo"}, [{}], "S-3"]


async def test_jwt_claims_drive_rules_over_socketio() -> None:
    async with running_feed(jwt_config()) as feed:
        db = source(feed)
        async with (
            feed_client(feed.url, auth={"token": make_jwt("a", tenant="acme")}) as a,
            feed_client(feed.url, auth={"token": make_jwt("b", tenant="globex")}) as b,
            feed_client(feed.url, auth={"token": make_jwt("c", roles=[])}) as c,
        ):
            assert (await c.subscribe("mem:public.orders"))["error"]["code"] == "forbidden"
            for client in (a, b):
                assert (await client.subscribe("mem:public.orders:1"))["ok"]
            db.write("public.orders", "insert", {"id": 1, "tenant_id": "globex"})
            db.write("public.orders", "update", {"id": 1, "tenant_id": "acme"})
            got_b = await b.take(2)
            got_a = await a.next_change()
        assert got_a["before"] is None and got_a["after"]["tenant_id"] == "acme"
        assert got_b[1]["after"] is None
        assert a.changes.empty()
        refusals = {}
        claims: list[Any] = [None, {"id": "acme"}, "", []]
        for claim in claims:
            async with feed_client(feed.url, auth={"token": make_jwt("d", tenant=claim)}) as d:
                ack = await d.subscribe("mem:public.orders")
                refusals[json.dumps(claim)] = (ack["error"]["code"], ack["error"]["message"])
    assert refusals == {  # a claim of no use is not called missing
        "null": ("forbidden", "your identity has no 'tenant' claim, which the rules need"),
        **{
            text: (
                "forbidden",
                f"your 'tenant' claim is {kind}; the rules need a string or a "
                "number (or a list of them)",
            )
            for text, kind in (
                ('{"id": "acme"}', "an object"),
                ('""', "empty"),
                ("[]", "an empty list"),
            )
        },
    }


SPEC_TOKENS = {
    "ops": TOKENS["ops"],
    "acme": TOKENS["acme-svc"],
    "globex": TOKENS["globex-svc"],
    **{who: TOKENS[f"{who}-svc"] for who in SPECIAL_CLAIMS},
}


def sentinel(spec: Spec, serial: int) -> tuple[str, str, dict[str, Any]]:
    """A write this subscription must see, so a test knows when its stream has caught up."""
    row = {"id": spec.key or 1, "tenant_id": spec.tenant() or "acme", "status": "paid"}
    return spec.target, "update", {**row, "serial": serial}


@settings(max_examples=12, deadline=None)
@given(subscriptions=st.lists(specs, min_size=1, max_size=4), first=writes, second=writes)
async def test_no_leak_over_real_socketio(
    subscriptions: list[Spec],
    first: list[tuple[str, str, dict[str, Any]]],
    second: list[tuple[str, str, dict[str, Any]]],
) -> None:
    """The same matrix end to end: real server, real clients, the real batching transport."""
    async with running_feed(token_config()) as feed:
        db = source(feed)
        clients: dict[str, Any] = {}
        try:

            async def connect(name: str, spec: Spec) -> Any:
                auth = {"token": SPEC_TOKENS[spec.who]}
                clients[name] = await FeedClient().connect(feed.url, auth=auth)
                return clients[name]

            for i, spec in enumerate(subscriptions):
                client = await connect(f"live{i}", spec)
                ack = await client.subscribe(spec.room, filter=spec.filter)
                assert ack["ok"] is not spec.refused, (spec, ack)
                if spec.refused:
                    assert ack["error"]["code"] == "forbidden", ack
            changes = [db.write(t, op, row) for t, op, row in first]
            await wait_until(lambda: db._delivered == db._written, what="first writes routed")
            snapshots = {}
            for i, spec in enumerate(subscriptions):
                client = await connect(f"replay{i}", spec)
                ack = await client.subscribe(spec.room, filter=spec.filter, since=0)
                assert ack.get("recovered") is True or spec.refused, ack
                client = await connect(f"snap{i}", spec)
                ack = await client.subscribe(spec.room, filter=spec.filter, snapshot=True)
                snapshots[i] = ack.get("snapshot", [])
            tables = {t: [dict(r) for r in db._tables[t].values()] for t in db._tables}
            split = len(changes)
            tail = second + [sentinel(s, n) for n, s in enumerate(subscriptions)]
            changes += [db.write(t, op, row) for t, op, row in tail]
            await wait_until(lambda: db._delivered == db._written, what="all writes routed")

            for i, spec in enumerate(subscriptions):
                everything = [e for e in map(spec.expected, changes) if e is not None]
                later = [e for e in map(spec.expected, changes[split:]) if e is not None]
                for name, expected in (
                    (f"live{i}", everything),
                    (f"replay{i}", everything),
                    (f"snap{i}", later),
                ):
                    client = clients[name]
                    got = [payload_view(p) for p in await client.take(len(expected))]
                    assert got == expected, (name, spec)
                    await client.call("catalog")  # a round trip: anything extra is queued by now
                    assert client.changes.empty(), (name, spec, client.changes.get_nowait())
                current = [spec.snapshot_row(r) for r in tables[spec.target]]
                rows_expected = sorted((r for r in current if r is not None), key=lambda r: r["id"])
                assert sorted(snapshots[i], key=lambda r: r["id"]) == rows_expected, spec
        finally:
            for client in clients.values():
                await client.close()


async def test_an_unshaped_room_never_takes_the_name_of_a_shaped_one() -> None:
    """A shaped room is named `<room>@<profile>`; a key or filter value ending in `@<profile>`
    gave an unshaped room that very name. An identity with masks that asked for the other room
    then joined the unshaped one and received the masked fields (and the other room's rows)."""
    support = "support-token-0000000000000005"
    config = (
        token_config()
        + f"""
[[auth.tokens]]
name = "support-svc"
sha256 = "{hash_token(support)}"
roles = ["support"]

[[auth.rules]]
roles = ["support"]
allow = ["mem:public.audit"]
"""
    )
    async with running_feed(config) as feed:
        db = source(feed)
        async with (
            feed_client(feed.url, auth={"token": support}) as masked,
            feed_client(feed.url, auth={"token": TOKENS["ops"]}) as ops,
        ):
            probe = await masked.subscribe("mem:public.audit", filter="status=eq.probe")
            profile = probe["room"].rsplit("@", 1)[1]
            for request in (
                {"room": "mem:public.audit", "filter": f"status=eq.x@{profile}"},
                {"room": f"mem:public.audit:7@{profile}"},
            ):
                refused = await ops.call("subscribe", request)
                assert refused["error"]["code"] == "bad_request", refused
            ack = await masked.subscribe("mem:public.audit", filter="status=eq.x")
            assert ack["ok"] and ack["room"].endswith(f"@{profile}")
            db.write(
                "public.audit", "insert", {"id": 1, "status": f"x@{profile}", "internal_note": "a"}
            )
            db.write("public.audit", "insert", {"id": 2, "status": "x", "internal_note": "b"})
            seen = await masked.next_change()
        assert seen["key"] == 2 and seen["after"] == {"id": 2, "status": "x"}
