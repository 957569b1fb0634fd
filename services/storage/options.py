"""Per-user option snapshots (the seed's ``POST /options``, A1111's ``/sdapi/v1/options``).

One document per user; each write replaces the snapshot and bumps its version. Later
requests get the snapshot merged into their ``override_settings`` (the request wins);
``sd_model_checkpoint`` is the user's default checkpoint for A1111 clients.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from services.storage.mongo import Document
from services.storage.readcache import ReadCache


class OptionStore:
    def __init__(self, db: AsyncDatabase[Document], *, cache_s: float = 0.0) -> None:
        """``cache_s``: how long :meth:`get` answers are remembered (see
        :class:`~services.storage.readcache.ReadCache`; writes here forget them)."""
        self.collection: AsyncCollection[Document] = db["options"]
        self.reads = ReadCache(cache_s)

    async def get(self, user: str) -> dict[str, Any]:
        return await self.reads.get(user, lambda: self._read(user))

    async def _read(self, user: str) -> dict[str, Any]:
        document = await self.collection.find_one({"_id": user})
        return dict(document["data"]) if document else {}

    async def update(self, user: str, changes: dict[str, Any], *, replace: bool = False) -> int:
        """Store a new snapshot (``changes`` merged into the old one unless ``replace``)."""
        data = changes if replace else {**await self._read(user), **changes}
        result = await self.collection.find_one_and_update(
            {"_id": user},
            {
                "$set": {"data": data, "modified_at": dt.datetime.now(dt.UTC)},
                "$inc": {"version": 1},
            },
            upsert=True,
            return_document=True,
        )
        await self.reads.wrote()
        assert result is not None  # upsert with return_document=True always returns one
        return int(result["version"])
