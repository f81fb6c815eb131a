"""The change and its routing data: changes, row filters, rooms, the filter index, the rooms of a
target (shared by the hub and the cluster reader), snapshot chunks.

Plain values and synchronous code, no sockets and no network: what a change is, which rooms it
belongs to and how a room keeps its numbers and replay buffer. Connectors build on this layer.

May import: feed.errors, feed.options, feed.metrics (the shared modules at the top of feed/) and
feed.core itself. Nothing else in feed/, and not connectors/.
"""
