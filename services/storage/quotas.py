"""Per-user limits on task submissions, read from the task store every replica shares,
and the login throttle (:class:`LoginThrottle`).

Two limits, each off at 0: how many of a user's tasks may be open (waiting or running)
at once, and how many tasks a user may submit in any 60 seconds (a sliding window over
the tasks' creation times). Both are counted on the indexed task documents, so every
gateway replica sees the same numbers; two submissions racing on two replicas may both
pass the last free place (a soft limit, exact within one replica's request). A refusal
says how long to wait.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

from pymongo import ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from services.storage.mongo import Document
from services.storage.tasks import TaskStore

WINDOW = dt.timedelta(seconds=60)


@dataclass(frozen=True)
class Refusal:
    reason: str
    retry_after_s: int


class QuotaStore:
    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self.store = TaskStore(db)
        self.tasks: AsyncCollection[Document] = self.store.collection

    async def ensure_indexes(self) -> None:
        await self.tasks.create_index([("user", 1), ("status", 1)])

    async def admit(self, user: str, *, max_open: int, per_minute: int) -> Refusal | None:
        """A :class:`Refusal` when ``user`` may not submit another task now."""
        if max_open > 0:
            open_tasks = await self.store.count_open({"user": user}, limit=max_open)
            if open_tasks >= max_open:
                return Refusal(
                    f"you have {open_tasks} unfinished tasks, the limit is {max_open}:"
                    " wait for some to finish",
                    retry_after_s=5,
                )
        if per_minute > 0:
            now = dt.datetime.now(dt.UTC)
            recent = {"user": user, "created_at": {"$gt": now - WINDOW}}
            if await self.tasks.count_documents(recent, limit=per_minute) >= per_minute:
                oldest = await self.tasks.find_one(recent, sort=[("created_at", 1)])
                created = oldest["created_at"] if oldest else now
                if created.tzinfo is None:
                    created = created.replace(tzinfo=dt.UTC)
                wait = math.ceil((created + WINDOW - now).total_seconds())
                return Refusal(
                    f"at most {per_minute} tasks per minute; retry in {max(wait, 1)} s",
                    retry_after_s=max(wait, 1),
                )
        return None


class LoginThrottle:
    """Login attempts per key (``user:<name>``, ``addr:<address>``), in fixed windows.

    An attempt is counted before the password is checked, so a burst of concurrent guesses
    is cut at the limit too; a successful login clears its user's count (and gives its
    address back the attempt). Counters live in MongoDB, so every gateway replica sees
    them; a counter whose window has passed starts again at zero.
    """

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self.collection: AsyncCollection[Document] = db["login_attempts"]

    async def ensure_indexes(self) -> None:
        await self.collection.create_index("until", expireAfterSeconds=0)

    async def attempt(self, limits: dict[str, int], window_s: float) -> Refusal | None:
        """Count one attempt under every key with a limit (0: none); a :class:`Refusal`
        when a key is over its limit in its current window."""
        now = dt.datetime.now(dt.UTC)
        until = now + dt.timedelta(seconds=window_s)
        refusal: Refusal | None = None
        for key, limit in limits.items():
            if limit <= 0:
                continue
            await self.collection.update_one(
                {"_id": key, "until": {"$lte": now}}, {"$set": {"count": 0, "until": until}}
            )
            counter = await self.collection.find_one_and_update(
                {"_id": key},
                {"$inc": {"count": 1}, "$setOnInsert": {"until": until}},
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
            assert counter is not None  # upserted
            if counter["count"] > limit and refusal is None:
                ends = counter["until"]
                if ends.tzinfo is None:
                    ends = ends.replace(tzinfo=dt.UTC)
                wait = max(math.ceil((ends - now).total_seconds()), 1)
                refusal = Refusal(
                    f"too many login attempts ({key.partition(':')[0]}); retry in {wait} s",
                    retry_after_s=wait,
                )
        return refusal

    async def succeeded(self, user_key: str, address_key: str) -> None:
        await self.collection.delete_one({"_id": user_key})
        await self.collection.update_one(
            {"_id": address_key, "count": {"$gt": 0}}, {"$inc": {"count": -1}}
        )
