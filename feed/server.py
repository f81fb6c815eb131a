"""The ASGI application: Socket.IO for clients, plain HTTP beside it, the hub behind both.

The hub lives for the ASGI lifespan, so uvicorn's graceful shutdown on SIGTERM stops the
connectors (saving their positions) and disconnects the clients.
"""

from __future__ import annotations

import logging
from typing import Any

import socketio

from connectors.base import Connector
from feed.config import Config
from feed.errors import ProtocolError
from feed.http import HttpApp
from feed.hub import Hub
from feed.protocol import SubscribeRequest, error_ack, unsubscribe_room
from feed.transport import SocketIOTransport

log = logging.getLogger("feed.server")


class FeedApp:
    """Everything `feed serve` runs, built from a config; `asgi` is what uvicorn serves."""

    def __init__(self, config: Config, connectors: list[Connector] | None = None) -> None:
        self.config = config
        settings = config.server
        self.hub = Hub(connectors or config.build_connectors(), settings)
        self.sio = socketio.AsyncServer(
            async_mode="asgi",
            cors_allowed_origins=settings.cors_allowed_origins or None,
            max_http_buffer_size=settings.max_message_bytes,
            logger=False,
            engineio_logger=False,
        )
        self.hub.transport = SocketIOTransport(self.sio)
        self._register_handlers()
        self.asgi = socketio.ASGIApp(
            self.sio,
            other_asgi_app=HttpApp(self.hub, dashboard=settings.dashboard),
            on_startup=self._startup,
            on_shutdown=self._shutdown,
        )

    async def _startup(self) -> None:
        await self.hub.__aenter__()
        log.info("feed serving %d connector(s)", len(self.hub.connectors))

    async def _shutdown(self) -> None:
        await self.hub.__aexit__(None, None, None)

    def _register_handlers(self) -> None:
        for event, handler in {
            "connect": self.on_connect,
            "disconnect": self.on_disconnect,
            "subscribe": self.on_subscribe,
            "unsubscribe": self.on_unsubscribe,
            "catalog": self.on_catalog,
            "*": self.on_unknown,
        }.items():
            self.sio.on(event, handler)

    async def on_connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> bool:
        self.hub.connect(sid)
        return True

    async def on_disconnect(self, sid: str, *reason: Any) -> None:
        self.hub.disconnect(sid)

    async def on_subscribe(self, sid: str, *args: Any) -> dict[str, Any]:
        settings = self.config.server

        async def handle() -> dict[str, Any]:
            request = SubscribeRequest.from_payload(
                args[0] if args else None,
                max_room=settings.max_room_length,
                max_filter=settings.max_filter_length,
            )
            return await self.hub.subscribe(sid, request)

        return await self._answer("subscribe", handle)

    async def on_unsubscribe(self, sid: str, *args: Any) -> dict[str, Any]:
        async def handle() -> dict[str, Any]:
            payload = args[0] if args else None
            room = unsubscribe_room(payload, max_room=self.config.server.max_room_length)
            return self.hub.unsubscribe(sid, room)

        return await self._answer("unsubscribe", handle)

    async def on_catalog(self, sid: str, *args: Any) -> dict[str, Any]:
        return self.hub.catalog()

    async def on_unknown(self, event: str, sid: str, *args: Any) -> dict[str, Any]:
        return error_ack(ProtocolError("unknown_event", f"no event {str(event)[:64]!r}"))

    async def _answer(self, event: str, handle: Any) -> dict[str, Any]:
        """Run a request; a client's mistake becomes an error ack, a bug an `internal` one."""
        try:
            result: dict[str, Any] = await handle()
            return result
        except ProtocolError as exc:
            self.hub.metrics.inc("feed_errors_total", code=exc.code)
            return error_ack(exc)
        except Exception:
            log.exception("%s failed", event)
            self.hub.metrics.inc("feed_errors_total", code="internal")
            return error_ack(ProtocolError("internal", "the server failed to handle this request"))
