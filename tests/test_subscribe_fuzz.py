"""Property-based fuzz of subscribe payloads: every payload is answered, nothing escapes."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.memory import MemoryConnector
from feed.delivery.protocol import SubscribeRequest
from feed.errors import ProtocolError
from feed.options import Options
from feed.routing.hub import Hub

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=50),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=10,
)
rooms = st.sampled_from(
    [
        "mem:public.orders",
        "mem:public.orders:1",
        "mem:",
        "mem",
        ":",
        "",
        "x:y:z",
        "mem:public.orders:",
    ]
) | st.text(max_size=80)
payloads = (
    st.fixed_dictionaries(
        {"room": rooms | json_values},
        optional={
            "filter": st.sampled_from(["status=eq.paid", "a=in.(1,2)", "bad", ""]) | json_values,
            "since": st.integers(min_value=-5, max_value=2**70) | json_values,
            "snapshot": st.booleans() | json_values,
            "epoch": st.text(max_size=80) | json_values,
        },
    )
    | json_values
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(payload=payloads)
def test_every_payload_gets_an_ack_or_a_structured_error(payload: Any) -> None:
    async def attempt() -> None:
        connector = MemoryConnector("mem", Options({"targets": ["public.orders"]}, "fuzz"))
        hub = Hub([connector])
        try:
            request = SubscribeRequest.from_payload(payload, max_room=512, max_filter=1024)
            ack = await hub.subscribe("sid-1", request)
        except ProtocolError as exc:
            assert exc.code and exc.message
            return
        assert ack["ok"] is True and ack["room"].startswith("mem:public.orders")
        await asyncio.sleep(0)  # let the catch-up task finish
        assert hub.clients["sid-1"] == {ack["room"]}

    asyncio.run(attempt())
