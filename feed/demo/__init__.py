"""The demo (`feed demo`): embedded Postgres and Redis, the writer that changes rows, and the
packaged Postgres install it starts from.

The top layer: may import anything in feed/ and connectors/; nothing imports it but the command
line, which loads it lazily by name (feed.app.cli).
"""
