"""How the hub reaches clients: a thin layer over python-socketio's AsyncServer.

The hub speaks only to this interface, so delivery mechanics (batching several changes into one
`changes` frame, per-client queues) change here without touching routing.
"""

from __future__ import annotations

from typing import Any, Protocol


class Transport(Protocol):
    def enter(self, sid: str, room: str) -> None: ...

    def leave(self, sid: str, room: str) -> None: ...

    async def send_room(self, room: str, event: str, data: Any, skip: list[str]) -> None: ...

    async def send_to(self, sid: str, event: str, data: Any) -> None: ...

    async def broadcast(self, event: str, data: Any) -> None: ...

    async def disconnect_all(self) -> None: ...


class SocketIOTransport:
    """Rooms are python-socketio rooms in the default namespace."""

    namespace = "/"

    def __init__(self, sio: Any) -> None:
        self.sio = sio

    def enter(self, sid: str, room: str) -> None:
        # The manager's basic_* methods are synchronous: joining cannot interleave with routing.
        self.sio.manager.basic_enter_room(sid, self.namespace, room)

    def leave(self, sid: str, room: str) -> None:
        self.sio.manager.basic_leave_room(sid, self.namespace, room)

    async def send_room(self, room: str, event: str, data: Any, skip: list[str]) -> None:
        await self.sio.emit(event, data, room=room, skip_sid=skip or None)

    async def send_to(self, sid: str, event: str, data: Any) -> None:
        await self.sio.emit(event, data, to=sid)

    async def broadcast(self, event: str, data: Any) -> None:
        await self.sio.emit(event, data)

    async def disconnect_all(self) -> None:
        for sid in list(self.sio.manager.get_participants(self.namespace, None)):
            await self.sio.disconnect(sid[0], namespace=self.namespace)
