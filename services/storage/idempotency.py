"""Idempotency keys: the same key and body give the same task; another body is a conflict.

One document per (user, key) holds a hash of the request and the task id it created.
The reservation is inserted *before* the task is submitted, so two concurrent retries
cannot both create a task. Keys are kept at least ``KEEP_S`` (a TTL index removes them
later on servers that support TTL indexes).
"""

from __future__ import annotations

import datetime as dt
import hashlib

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from services.storage.mongo import Document

KEEP_S = 48 * 3600


class IdempotencyConflictError(Exception):
    pass


def request_hash(path: str, body: bytes) -> str:
    return hashlib.sha256(path.encode() + b"\n" + body).hexdigest()


class IdempotencyStore:
    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self.collection: AsyncCollection[Document] = db["idempotency"]

    async def ensure_indexes(self) -> None:
        await self.collection.create_index("created_at", expireAfterSeconds=KEEP_S)

    async def reserve(self, user: str, key: str, digest: str, task_id: str) -> str | None:
        """None if the reservation is new (go ahead), else the earlier request's task id."""
        document = {
            "_id": f"{user}\n{key}",
            "hash": digest,
            "task_id": task_id,
            "created_at": dt.datetime.now(dt.UTC),
        }
        try:
            await self.collection.insert_one(document)
            return None
        except DuplicateKeyError:
            existing = await self.collection.find_one({"_id": document["_id"]})
        if existing is None:  # expired in between: take it
            return await self.reserve(user, key, digest, task_id)
        if existing["hash"] != digest:
            raise IdempotencyConflictError(existing["task_id"])
        earlier: str = existing["task_id"]
        return earlier

    async def release(self, user: str, key: str) -> None:
        """Forget a reservation whose submission failed, so a retry can succeed."""
        await self.collection.delete_one({"_id": f"{user}\n{key}"})
