"""The application shell: the config file, the command line, the ASGI server and its HTTP routes,
status and metrics pages, port checks.

May import every lower layer: the shared modules, feed.core, connectors/, feed.security,
feed.delivery, feed.routing and feed.engine. Not feed.demo.
"""
