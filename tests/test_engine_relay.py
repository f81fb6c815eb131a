"""The payload text a cluster node relays: the reader's JSON with `seq` spliced in, not re-encoded.

A node without [cluster] writes `{"room":...,"seq":N,...}` spliced from the change's JSON
(feed.core.rooms.Payload); a cluster node must write the same text for the same room and seq,
from the bytes the reader put in Redis (feed.engine.relay), whatever the room's name holds.
"""

from __future__ import annotations

import datetime as dt
import json

import orjson
import pytest

from feed.core.change import Change
from feed.core.filters import MAX_CONDITIONS, parse_filter
from feed.core.rooms import Payload, Room
from feed.engine.relay import LEFT, numbered, room_head
from feed.engine.routes import room_spec, routed_from_spec
from feed.security.access import Shape, ShapedRoom


def change() -> Change:
    return Change(
        id="c1",
        connector="main",
        source="postgres",
        target="public.orders",
        op="update",
        key={"id": 7},
        before={"id": 7, "status": "new", "note": 'é "quoted" \\ line\u2028'},
        after={"id": 7, "status": "paid", "note": None},
        ts=dt.datetime(2026, 12, 2, 8, 0, tzinfo=dt.UTC),
    )


@pytest.mark.parametrize(
    "room", ["main:public.orders", 'main:public.orders?note=eq."a,b"', 'main:t:{"id":7}']
)
def test_a_relayed_payload_is_the_text_a_single_node_sends(room: str) -> None:
    c = change()
    assert c.wire_tail is not None
    raw = room_head(room) + c.wire_tail  # what the reader publishes (feed.engine.publisher)
    single = Payload(c.wire, room=room, seq=41)
    single.change = c
    relayed = orjson.dumps(numbered(room, 41, raw))
    assert relayed == single.json_body()
    assert json.loads(relayed) == {**c.wire, "room": room, "seq": 41}
    # A room's own payload starts from the name it encoded once (Room.head): the same text.
    numbered_here = Room(room, "main", "public.orders", seq=40)
    assert numbered_here.record(c).json_body() == relayed  # type: ignore[attr-defined]


def test_a_payload_written_room_last_gets_its_seq_in_front() -> None:
    c = change()
    raw = orjson.dumps({**c.wire, "room": "main:public.orders"})  # a reader before the splice
    relayed = orjson.dumps([numbered("main:public.orders", 3, raw)])
    assert json.loads(relayed) == [{**c.wire, "room": "main:public.orders", "seq": 3}]


def test_a_row_leaving_a_filter_room_is_the_text_a_single_node_sends() -> None:
    c = change()
    assert c.wire_tail is not None
    room = "main:public.orders?status=eq.new"
    raw = room_head(room) + LEFT + c.wire_tail
    single = Payload(c.wire, room=room, seq=9, left=True)
    single.change = c
    assert orjson.dumps(numbered(room, 9, raw)) == single.json_body()


def test_a_tenant_room_past_the_client_condition_limit_is_routed_by_the_reader() -> None:
    """A client may send 20 conditions; a tenant's forced one makes the room's filter 21. The
    reader rebuilds the room from its registry spec: before, it re-applied the client limit,
    logged the spec as bad, and the room (whose subscribe had been acknowledged) never heard
    of a change."""
    client = parse_filter("&".join(f"amount=neq.{i}" for i in range(MAX_CONDITIONS)))
    forced = parse_filter("tenant_id=eq.acme")
    room = ShapedRoom(
        "main:public.orders?...@p", "main", "public.orders", filter=client.merged(forced)
    )
    room.shape = Shape(forced, (("secret",),))
    routed = routed_from_spec(json.loads(json.dumps(room_spec(room))))
    assert routed.filter == room.filter and routed.shape == room.shape
    assert routed.filter is not None and len(routed.filter.conditions) == MAX_CONDITIONS + 1
