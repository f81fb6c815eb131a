"""python-socketio's client manager, with each client's rooms indexed.

python-socketio finds the rooms of a leaving client by scanning every room of the namespace,
after copying that dict (`BaseManager.basic_disconnect`), and every client is a room of its own.
So one disconnect costs time in proportion to the number of clients, and N clients leaving at
once (a load balancer restarted, a network blip, a node shutting down) cost N²: measured here
with one room per client, 0.2 s of blocked event loop for 1,000 clients, 6 s for 4,000, and
minutes at the tens of thousands a node is sized for (docs/scaling.md). Meanwhile no change is
delivered and no ping answered. This manager keeps the rooms each client is in, so a disconnect
costs its own rooms only; the stored structure (`rooms[namespace][room]`) is python-socketio's,
unchanged, so everything else in python-socketio reads it as before.
"""

from __future__ import annotations

from typing import Any

import socketio


class IndexedManager(socketio.AsyncManager):  # type: ignore[misc]
    """`socketio.AsyncManager` whose disconnect and `get_rooms` cost a client's own rooms."""

    def __init__(self) -> None:
        super().__init__()
        self._joined: dict[tuple[str, str], set[Any]] = {}
        """(namespace, sid) -> the rooms it is in, `None` (the namespace's sid registry) and
        its own sid room included."""
        self._leaving: dict[str, set[str]] = {}
        """The sids of each namespace being disconnected: python-socketio keeps them in a
        list, which a storm of disconnects makes long and every `is_connected` scans."""

    def basic_enter_room(self, sid: str, namespace: str, room: Any, eio_sid: Any = None) -> None:
        super().basic_enter_room(sid, namespace, room, eio_sid=eio_sid)
        self._joined.setdefault((namespace, sid), set()).add(room)

    def basic_leave_room(self, sid: str, namespace: str, room: Any) -> None:
        super().basic_leave_room(sid, namespace, room)
        joined = self._joined.get((namespace, sid))
        if joined is not None:
            joined.discard(room)
            if not joined:
                del self._joined[(namespace, sid)]

    def basic_disconnect(self, sid: str, namespace: str, **kwargs: Any) -> None:
        """`BaseManager.basic_disconnect`, leaving only the rooms the client is in."""
        if namespace not in self.rooms:
            return
        for room in list(self._joined.get((namespace, sid), ())):
            self.basic_leave_room(sid, namespace, room)
        self.callbacks.pop(sid, None)
        connecting = self.pending_connect.get(namespace)
        if connecting is not None and sid in connecting:
            connecting.remove(sid)
            if not connecting:
                del self.pending_connect[namespace]
        leaving = self._leaving.get(namespace)
        if leaving is not None and sid in leaving:
            leaving.discard(sid)
            if not leaving:
                del self._leaving[namespace]

    def pre_disconnect(self, sid: str, namespace: str) -> Any:
        self._leaving.setdefault(namespace, set()).add(sid)
        return self.rooms[namespace][None].get(sid)

    def is_connected(self, sid: str, namespace: str) -> bool:
        if sid in self._leaving.get(namespace, ()):
            return False
        connecting = self.pending_connect.get(namespace)
        if connecting is not None and sid in connecting:
            return False
        try:
            return self.rooms[namespace][None][sid] is not None
        except KeyError:
            return False

    def get_rooms(self, sid: str, namespace: str) -> list[Any]:
        return [r for r in self._joined.get((namespace, sid), ()) if r is not None]
