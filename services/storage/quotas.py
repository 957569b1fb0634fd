"""Per-user limits on task submissions, from counters every gateway replica shares, and
the login throttle (:class:`LoginThrottle`).

Two limits: how many of a user's tasks may be open (waiting or running) at once, and how
many tasks a user may submit per minute. Each costs O(1) per submission, however long
the queue (counting documents slowed submissions down as the queue grew):

- open tasks: a counter per user, counted up at admission, down by the event fold when a
  task ends (``TaskStore.apply``) or by :meth:`QuotaStore.release` when a submission is
  refused after admission. Should it run ahead of the truth (a gateway died between
  admission and insert), reaching the limit recounts the user's open tasks (an indexed
  count of at most ``limit`` documents) and corrects it;
- per minute: a counter per user and clock minute (expired by a TTL index); the last 60 s
  are estimated as this minute's count plus the previous minute's, weighted by how much
  of it is still inside the window (the sliding-window counter of rate limiters).

Both are soft limits: two submissions racing on two replicas may both pass the last free
place. A refusal says how long to wait, and counts nothing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import time
from dataclasses import dataclass

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from services.storage.groupwrite import GroupWriter
from services.storage.mongo import Document
from services.storage.tasks import TaskStore

MINUTE_S = 60


async def count_up(
    writes: GroupWriter, key: str, field: str, on_insert: Document | None = None
) -> Document:
    """Add one to a counter document (created with ``on_insert`` if new); the document
    after, read back, so it may include concurrent counts too, which errs on the side of
    the limit. An upsert then a read, not ``find_one_and_update``: on SecantusDB that one
    command costs the server ~5× the CPU of both together."""
    for _ in range(3):
        await count_below(writes, key, None, on_insert, field=field)
        counter = await writes.collection.find_one({"_id": key})
        if counter is not None:  # else deleted meanwhile (a login cleared it): again
            return counter
    raise RuntimeError(f"counter {key!r} in {writes.collection.name} could not be updated")


async def count_below(
    writes: GroupWriter,
    key: str,
    cap: int | None,
    on_insert: Document | None = None,
    *,
    field: str = "n",
) -> bool:
    """Add one to a counter ``field`` (created with ``on_insert`` if new) unless it has
    reached ``cap`` (None: no cap); whether it counted. One conditional upsert and no
    read back: a counter at its cap does not match, and the upsert's insert then fails
    on the existing ``_id``; only that case reads it. Concurrent counts (of one counter
    or several) go to the server together (:class:`GroupWriter`)."""
    query: Document = {"_id": key} if cap is None else {"_id": key, field: {"$lt": cap}}
    update: Document = {"$inc": {field: 1}}
    if on_insert:
        update["$setOnInsert"] = on_insert
    for _ in range(3):
        try:
            await writes.update_one(query, update, upsert=True)
            return True
        except DuplicateKeyError:
            if cap is not None:
                counter = await writes.collection.find_one({"_id": key})
                if counter is not None and counter[field] >= cap:
                    return False
            # A concurrent upsert created it first (MongoDB applies neither): again.
    raise RuntimeError(f"counter {key!r} in {writes.collection.name} could not be updated")


@dataclass(frozen=True)
class Refusal:
    reason: str
    retry_after_s: int


class QuotaStore:
    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self.store = TaskStore(db)
        self.tasks: AsyncCollection[Document] = self.store.collection
        self.open_counts = self.store.open_counts
        self.minutes: AsyncCollection[Document] = db["task_minutes"]
        self.open_count_writes = GroupWriter(self.open_counts)
        self.minute_writes = GroupWriter(self.minutes)
        self._minute = -1
        self._previous: dict[str, int] = {}
        """Per user, their count in the minute ``_minute`` (the one before this one)."""

    async def ensure_indexes(self) -> None:
        await self.tasks.create_index([("user", 1), ("status", 1)])
        await self.minutes.create_index("expires", expireAfterSeconds=0)

    async def admit(self, user: str, *, max_open: int, per_minute: int) -> Refusal | None:
        """Count a submission of ``user`` in; a :class:`Refusal` (nothing counted) when it
        would break a limit (0: none). A submission refused later must be released."""
        # Both counters at once (one round trip's wait, not two); the open-task counter
        # counts even with no limit, so that it is right when a limit is set.
        counting = count_below(self.open_count_writes, user, max_open if max_open > 0 else None)
        if per_minute > 0:
            refusal, counted = await asyncio.gather(self._count_minute(user, per_minute), counting)
            if refusal is not None:
                if counted:
                    await self._uncount(user, minute=False)  # the minute refused it
                return refusal
        else:
            counted = await counting
        if counted:
            return None
        actual = await self.store.count_open({"user": user}, limit=max_open)
        if actual < max_open:  # the counter ran ahead: correct it, this one is admitted
            await self.open_counts.update_one({"_id": user}, {"$set": {"n": actual + 1}})
            return None
        if per_minute > 0:
            await self._uncount_minute(user)
        return Refusal(
            f"you have {actual} unfinished tasks, the limit is {max_open}: wait for some to finish",
            retry_after_s=5,
        )

    async def release(self, user: str, *, per_minute: int) -> None:
        """Give back an admission whose submission was refused after all."""
        await self._uncount(user, per_minute > 0)

    async def _uncount(self, user: str, minute: bool) -> None:
        await self.open_counts.update_one({"_id": user, "n": {"$gt": 0}}, {"$inc": {"n": -1}})
        if minute:
            await self._uncount_minute(user)

    async def _uncount_minute(self, user: str) -> None:
        key = f"{user}\n{int(time.time() // MINUTE_S)}"
        await self.minutes.update_one({"_id": key, "n": {"$gt": 0}}, {"$inc": {"n": -1}})

    async def _previous_minute(self, user: str, minute: int) -> int:
        """The user's count in a minute that has passed, read once per minute: a count
        that can no longer grow (but for submissions racing the minute's end)."""
        if self._minute != minute:
            self._minute, self._previous = minute, {}
        if user not in self._previous:
            counter = await self.minutes.find_one({"_id": f"{user}\n{minute}"})
            self._previous[user] = int(counter["n"]) if counter else 0
        return self._previous[user]

    async def _count_minute(self, user: str, per_minute: int) -> Refusal | None:
        now = time.time()
        minute = int(now // MINUTE_S)
        inside = 1 - (now / MINUTE_S - minute)  # share of the previous minute still counted
        key = f"{user}\n{minute}"
        expires = dt.datetime.fromtimestamp((minute + 2) * MINUTE_S, dt.UTC)
        # Admitted while this minute's count after it plus the previous minute's weighted
        # count stays within the limit: while this minute's count is below ``cap``.
        cap = math.floor(per_minute - (await self._previous_minute(user, minute - 1)) * inside)
        if cap > 0 and await count_below(self.minute_writes, key, cap, {"expires": expires}):
            return None
        # The estimate falls as this minute ends (then the previous one's weight fades).
        wait = max(math.ceil(inside * MINUTE_S), 1)
        return Refusal(
            f"at most {per_minute} tasks per minute; retry in {wait} s", retry_after_s=wait
        )


class LoginThrottle:
    """Login attempts per key (``user:<name>``, ``addr:<address>``), in fixed windows.

    An attempt is counted before the password is checked, so a burst of concurrent guesses
    is cut at the limit too; a successful login clears its user's count (and gives its
    address back the attempt). Counters live in MongoDB, so every gateway replica sees
    them; a counter whose window has passed starts again at zero.
    """

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self.collection: AsyncCollection[Document] = db["login_attempts"]
        self.writes = GroupWriter(self.collection)

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
            counter = await count_up(self.writes, key, "count", {"until": until})
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
