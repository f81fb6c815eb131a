"""Routing: the hub, which runs connectors and routes each change into its rooms and out through
delivery, in one process; and the `[server]` settings it reads.

May import: the shared modules at the top of feed/, feed.core, connectors/, feed.security and
feed.delivery. The cluster engine sits above it and is reached only through the hub's `Engine`
protocol, so the hub never imports feed.engine.
"""
