"""Where the MongoDB connector keeps its resume token between runs.

The default is a small collection in the watched deployment itself (`dbfeed.resume_tokens`, one
document per connector). A token only means something to the oplog it came from, so keeping it
next to that oplog means it is backed up, restored and failed over together with it, needs no
extra service (a file is lost with its container, Redis would be one more dependency), and a
write acknowledged by the replica set survives a primary change. The connector's own stream
filters this collection out, so saving a token never produces a change.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("feed.connectors.mongodb")


class TokenStore:
    """Load and save one connector's resume token (a no-op when `collection` is None)."""

    def __init__(self, client: Any, collection: tuple[str, str] | None, connector: str) -> None:
        self._coll = client[collection[0]][collection[1]] if collection else None
        self._id = connector
        self.saved: Mapping[str, Any] | None = None

    @property
    def enabled(self) -> bool:
        return self._coll is not None

    async def load(self) -> Mapping[str, Any] | None:
        if self._coll is None:
            return None
        doc = await self._coll.find_one({"_id": self._id})
        token = doc.get("token") if doc else None
        self.saved = token if isinstance(token, Mapping) and "_data" in token else None
        return self.saved

    async def save(self, token: Mapping[str, Any] | None, watch: list[str]) -> None:
        if self._coll is None or token is None or token == self.saved:
            return
        await self._coll.update_one(
            {"_id": self._id},
            {"$set": {"token": dict(token), "watch": watch, "saved_at": dt.datetime.now(dt.UTC)}},
            upsert=True,
        )
        self.saved = token

    async def forget(self) -> None:
        """Drop the saved token (its history is gone): the next start begins from now."""
        self.saved = None
        if self._coll is not None:
            await self._coll.delete_one({"_id": self._id})
