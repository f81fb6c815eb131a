"""The size of what the client sends, and the most the server takes in one message.

A message larger than the server's `[server] max_message_bytes` gets the connection cut (a
websocket closed with 1009, a long-polling POST answered 413). A request that large was sent
again after every reconnect, and cut again, for ever, with no error. The server announces its
limit in its Engine.IO handshake (`maxPayload`), which python-engineio reads and drops: the
classes here keep it, and notice a cut for a message too large, so that the client can refuse
such a request itself (`too_large`) and send everything else.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import engineio
import socketio

FRAMING = 12
"""Bytes a message takes besides its JSON: Engine.IO's and Socket.IO's packet types and the
answer's id (up to 10 digits)."""


def packet_bytes(data: Any) -> int:
    """What `data` takes on the wire as one Socket.IO packet (JSON as python-socketio writes it)."""
    return len(json.dumps(data, separators=(",", ":")).encode()) + FRAMING


def too_large_message(what: str, size: int, limit: int) -> str:
    return (
        f"{what} is {size} bytes, more than the {limit} the server takes in one message"
        " ([server] max_message_bytes): not sent"
    )


class Engine(engineio.AsyncClient):  # type: ignore[misc]
    """python-engineio's client, keeping the server's `maxPayload` and noticing a cut for a
    message too large (its own code drops the one and only logs the other)."""

    http: aiohttp.ClientSession | None  # python-engineio's, set in its __init__
    max_payload: int | None = None
    cut_too_large = False

    def _opened(self, text: str) -> None:
        """Read `maxPayload` from an Engine.IO OPEN packet (`0{...}`), if `text` is one."""
        if not text.startswith("0{"):
            return
        try:
            limit = json.loads(text[1:].split("\x1e", 1)[0]).get("maxPayload")
        except (ValueError, AttributeError):
            return
        if isinstance(limit, int) and limit > 0:
            self.max_payload = limit

    def _session(self) -> None:
        # A session of its own, as python-engineio would make, whose websockets report to us.
        if self.http is None or self.http.closed:
            self.http = aiohttp.ClientSession(ws_response_class=_recording(self))

    async def _connect_polling(self, *args: Any, **kwargs: Any) -> Any:
        self._session()
        return await super()._connect_polling(*args, **kwargs)

    async def _connect_websocket(self, *args: Any, **kwargs: Any) -> Any:
        self._session()
        return await super()._connect_websocket(*args, **kwargs)

    async def _send_request(self, method: str, *args: Any, **kwargs: Any) -> Any:
        response = await super()._send_request(method, *args, **kwargs)
        if isinstance(response, aiohttp.ClientResponse):
            if method == "GET" and self.sid is None and response.status == 200:
                # The handshake; aiohttp keeps the body for python-engineio's own read.
                self._opened((await response.read()).decode("utf-8", "replace"))
            elif method == "POST" and response.status == 413:
                self.cut_too_large = True
        return response


def _recording(engine: Engine) -> type[aiohttp.ClientWebSocketResponse]:
    class Recording(aiohttp.ClientWebSocketResponse):
        async def receive(self, *args: Any, **kwargs: Any) -> aiohttp.WSMessage:
            message = await super().receive(*args, **kwargs)
            if message.type == aiohttp.WSMsgType.TEXT and engine.max_payload is None:
                engine._opened(message.data)
            elif message.type == aiohttp.WSMsgType.CLOSE and message.data == 1009:
                engine.cut_too_large = True  # 1009: message too big
            return message

    return Recording


class SocketIO(socketio.AsyncClient):  # type: ignore[misc]
    """python-socketio's client on `Engine`, which does not send a token larger than the
    server takes: the attempt is refused at once with `too_large`, as the server refuses a
    token it does not accept, instead of getting the connection cut (then `unreachable`)."""

    def _engineio_client_class(self) -> type[Engine]:
        return Engine

    async def _handle_eio_connect(self) -> None:
        limit = self.eio.max_payload
        auth = await self._get_real_value(self.connection_auth) or {}
        size = packet_bytes(auth)
        if limit is not None and size > limit:
            message = too_large_message("the token", size, limit)
            await self._handle_error("/", {"message": message, "data": {"code": "too_large"}})
            return
        await super()._handle_eio_connect()
