"""Delivery to sockets: the client wire protocol, the Socket.IO transport and the lean websocket.

Takes already-routed payloads to connected clients, fast and within each client's outbound limit.

May import: the shared modules at the top of feed/, feed.core and feed.security (the outbound
limit). Not routing, the engine, the application shell or the demo.
"""
