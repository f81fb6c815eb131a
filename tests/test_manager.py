"""The feed's Socket.IO client manager keeps exactly the state python-socketio's own would.

feed.delivery.manager indexes each client's rooms so that a disconnect costs only those (the
cost itself is checked end to end in test_serve_process.py). Here random runs of connects,
room joins and leaves, disconnects and half-finished disconnects go to both managers, and
their rooms, connection answers and room lists must agree at every step.
"""

from __future__ import annotations

from typing import Any

import socketio
from hypothesis import given, settings
from hypothesis import strategies as st

from feed.delivery.manager import IndexedManager

SIDS = [f"s{i}" for i in range(5)]
ROOMS = ["a", "b", "c"]
NAMESPACES = ["/", "/other"]

steps = st.lists(
    st.tuples(
        st.sampled_from(["connect", "enter", "leave", "pre_disconnect", "disconnect", "close"]),
        st.sampled_from(SIDS),
        st.sampled_from(ROOMS),
        st.sampled_from(NAMESPACES),
    ),
    max_size=60,
)


def apply(manager: Any, step: tuple[str, str, str, str]) -> None:
    action, sid, room, namespace = step
    connected = sid in manager.rooms.get(namespace, {}).get(None, {})
    if action == "connect" and not connected:
        manager.basic_enter_room(sid, namespace, None, eio_sid=f"e{sid}")
        manager.basic_enter_room(sid, namespace, sid, eio_sid=f"e{sid}")
    elif action == "enter" and connected:
        manager.basic_enter_room(sid, namespace, room)
    elif action == "leave":
        manager.basic_leave_room(sid, namespace, room)
    elif action == "pre_disconnect" and connected and manager.is_connected(sid, namespace):
        # Once per disconnect, as the server calls it: python-socketio keeps pending sids in a
        # list, so a second call left the sid "not connected" after it connected again (a run
        # hypothesis found: connect, pre_disconnect twice, disconnect, connect), which no
        # server does (nor does Engine.IO reuse a sid).
        manager.pre_disconnect(sid, namespace)
    elif action == "disconnect":
        manager.basic_disconnect(sid, namespace)
    elif action == "close":
        manager.basic_close_room(room, namespace)


def state(manager: Any) -> Any:
    rooms = {
        (ns, room): dict(members) for ns, by_room in manager.rooms.items()
        for room, members in by_room.items()
    }  # fmt: skip
    answers = {
        (ns, sid): (manager.is_connected(sid, ns), sorted(manager.get_rooms(sid, ns)))
        for ns in NAMESPACES
        for sid in SIDS
    }
    return rooms, answers


@settings(max_examples=300, deadline=None)
@given(steps)
def test_the_indexed_manager_agrees_with_python_socketios(run: list[Any]) -> None:
    ours, theirs = IndexedManager(), socketio.AsyncManager()
    for step in run:
        apply(ours, step)
        apply(theirs, step)
        assert state(ours) == state(theirs), step


def test_a_disconnect_leaves_no_index_behind() -> None:
    manager = IndexedManager()
    for sid in SIDS:
        apply(manager, ("connect", sid, "", "/"))
        apply(manager, ("enter", sid, "a", "/"))
        manager.pre_disconnect(sid, "/")
        manager.basic_disconnect(sid, "/")
    assert manager.rooms == {} and manager._joined == {} and manager._leaving == {}
