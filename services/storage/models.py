"""Model registry: one MongoDB document per registered model, ``_id`` = its name.

The name is what clients send (``stable_diffusion_model``); the model key derived
from it names the checkpoint's subject, consumer and workers.
"""

from __future__ import annotations

import datetime as dt

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from proto import ModelStatus, ModelType, names
from services.storage.mongo import Document


def model_document(
    *,
    name: str,
    model_type: ModelType,
    path: str,
    family: str | None,
    size_bytes: int,
    sha256: str | None = None,
    mtime: float | None = None,
    prediction_type: str | None = None,
) -> Document:
    now = dt.datetime.now(dt.UTC)
    return {
        "_id": name,
        "type": model_type.value,
        "model_key": names.model_key(name),
        "path": path,
        "family": family,
        "size_bytes": size_bytes,
        "sha256": sha256,
        "mtime": mtime,
        "prediction_type": prediction_type,
        "status": ModelStatus.UNLOADED.value,
        "registered_at": now,
        "modified_at": now,
        "error": None,
    }


class ModelStore:
    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self.collection: AsyncCollection[Document] = db["models"]

    async def ensure_indexes(self) -> None:
        await self.collection.create_index("model_key", unique=True)

    async def upsert(self, document: Document) -> None:
        """Register or refresh a model; the registration time of an existing one is kept."""
        fields = {k: v for k, v in document.items() if k not in ("_id", "registered_at")}
        await self.collection.update_one(
            {"_id": document["_id"]},
            {"$set": fields, "$setOnInsert": {"registered_at": document["registered_at"]}},
            upsert=True,
        )

    async def get(self, name: str) -> Document | None:
        return await self.collection.find_one({"_id": name, "status": {"$ne": "deleted"}})

    async def by_key(self, model_key: str) -> Document | None:
        return await self.collection.find_one({"model_key": model_key})

    async def list(self, model_type: ModelType | None = None) -> list[Document]:
        query: Document = {"status": {"$ne": ModelStatus.DELETED.value}}
        if model_type is not None:
            query["type"] = model_type.value
        return [doc async for doc in self.collection.find(query).sort("_id", 1)]

    async def set_status(
        self, name: str, status: ModelStatus, error: str | None = None, workers: int = 0
    ) -> None:
        await self.collection.update_one(
            {"_id": name},
            {
                "$set": {
                    "status": status.value,
                    "error": error,
                    "loaded_workers": workers,
                    "modified_at": dt.datetime.now(dt.UTC),
                }
            },
        )
