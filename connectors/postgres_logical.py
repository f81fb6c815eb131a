"""Logical decoding mode (placeholder until the reader lands)."""

from __future__ import annotations

from typing import Any


async def drop_slot(conn: Any, slot: str) -> bool:
    """Drop the connector's replication slot if it exists and nobody reads it."""
    found = await conn.fetchval(
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1", slot
    )
    if not found:
        return False
    await conn.execute("SELECT pg_drop_replication_slot($1)", slot)
    return True
