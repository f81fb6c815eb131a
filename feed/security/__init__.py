"""Security: who a client is (auth), what it may see (access), and what it may cost (limits, guard,
room budgets).

May import: the shared modules at the top of feed/, feed.core, and connectors/ (room addresses).
Not delivery, routing, the engine, the application shell or the demo.
"""
