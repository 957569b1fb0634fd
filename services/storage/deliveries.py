"""Where webhook deliveries keep their state: signing secrets, attempts, failures.

- ``webhook_secrets``: one signing secret per user, made on first use.
- ``webhook_attempts``: failed attempts of a delivery still being retried (the count
  survives redeliveries and restarts; forgotten once the delivery ends).
- ``webhook_failures``: deliveries given up on, which their owner can list.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import secrets

from pymongo import ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from services.storage.mongo import Document


class WebhookStore:
    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self.secrets = db["webhook_secrets"]
        self.attempts = db["webhook_attempts"]
        self.failures = db["webhook_failures"]

    async def ensure_indexes(self) -> None:
        await self.failures.create_index([("user", 1), ("at", -1)])

    async def secret(self, user: str) -> str:
        """The user's signing secret (``whsec_`` + base64 of 32 random bytes)."""
        fresh = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        with contextlib.suppress(DuplicateKeyError):  # a concurrent first use made it
            await self.secrets.update_one(
                {"_id": user}, {"$setOnInsert": {"secret": fresh}}, upsert=True
            )
        document = await self.secrets.find_one({"_id": user})
        assert document is not None
        return str(document["secret"])

    async def count_attempt(self, delivery_id: str) -> int:
        """Count one more failed attempt of a delivery; how many there have been."""
        document = await self.attempts.find_one_and_update(
            {"_id": delivery_id},
            {"$inc": {"attempts": 1}, "$set": {"at": dt.datetime.now(dt.UTC)}},
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )
        return int((document or {}).get("attempts", 1))

    async def forget_attempts(self, delivery_id: str) -> None:
        await self.attempts.delete_one({"_id": delivery_id})

    async def record_failure(
        self,
        delivery_id: str,
        *,
        user: str,
        task_id: str,
        url: str,
        event: str,
        attempts: int,
        error: str,
    ) -> None:
        """A delivery given up on (once: a redelivered give-up records nothing new)."""
        await self.failures.update_one(
            {"_id": delivery_id},
            {
                "$setOnInsert": {
                    "user": user,
                    "task_id": task_id,
                    "url": url,
                    "event": event,
                    "attempts": attempts,
                    "error": error,
                    "at": dt.datetime.now(dt.UTC),
                }
            },
            upsert=True,
        )

    async def list_failures(self, user: str, limit: int) -> list[Document]:
        """The user's failed deliveries, newest first."""
        cursor = self.failures.find({"user": user}).sort("at", -1).limit(limit)
        return [document async for document in cursor]
