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


class OptionStore:
    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self.collection: AsyncCollection[Document] = db["options"]

    async def get(self, user: str) -> dict[str, Any]:
        document = await self.collection.find_one({"_id": user})
        return dict(document["data"]) if document else {}

    async def update(self, user: str, changes: dict[str, Any], *, replace: bool = False) -> int:
        """Store a new snapshot (``changes`` merged into the old one unless ``replace``)."""
        data = changes if replace else {**await self.get(user), **changes}
        result = await self.collection.find_one_and_update(
            {"_id": user},
            {
                "$set": {"data": data, "modified_at": dt.datetime.now(dt.UTC)},
                "$inc": {"version": 1},
            },
            upsert=True,
            return_document=True,
        )
        assert result is not None  # upsert with return_document=True always returns one
        return int(result["version"])
