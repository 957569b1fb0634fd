"""Per-user limits on task submissions, from counters every gateway replica shares, and
the login throttle (:class:`LoginThrottle`).

Two limits: how many of a user's tasks may be open (waiting or running) at once, and how
many tasks a user may submit per minute. Both are counted in one document per user in
``task_open_counts``, so an admission below the limits is one conditional write, however
long the queue (counting documents slowed submissions down as the queue grew):

- ``n``, open tasks: counted up at admission, down by the event fold when a task ends
  (``TaskStore.finish``) or by :meth:`QuotaStore.release` when a submission is refused
  after admission. Should it run ahead of the truth (a gateway died between admission and
  insert), reaching the limit recounts the user's open tasks (an indexed count of at most
  ``limit`` documents) and corrects it;
- ``m``, submissions in the clock minute ``minute``, and ``prev``, those of the minute
  before it: the last 60 s are estimated as this minute's count plus the previous
  minute's, weighted by how much of it is still inside the window (the sliding-window
  counter of rate limiters). The first admission of a new minute rolls the document over.

Both are soft limits: two submissions racing on two replicas may both pass the last free
place. A refusal says how long to wait, and counts nothing.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from services.storage.groupwrite import GroupWriter
from services.storage.mongo import Document
from services.storage.tasks import TaskStore, one_open_task_less

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
    def __init__(self, db: AsyncDatabase[Document], clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        """Seconds since the epoch: clock minutes are counted in it."""
        self.store = TaskStore(db)
        self.tasks: AsyncCollection[Document] = self.store.collection
        self.counts = self.store.open_counts
        """Per user ``{_id: user, n, minute, m, prev}`` (see the module)."""
        self.count_writes = GroupWriter(self.counts)
        self._minute = -1
        self._previous: dict[str, int] = {}
        """Per user, their count in the minute before ``_minute`` (read once a minute)."""

    async def ensure_indexes(self) -> None:
        await self.tasks.create_index([("user", 1), ("status", 1)])

    async def admit(self, user: str, *, max_open: int, per_minute: int) -> Refusal | None:
        """Count a submission of ``user`` in; a :class:`Refusal` (nothing counted) when it
        would break a limit (0: none). A submission refused later must be released.
        The open-task count counts even with no limit, so that it is right when a limit
        is set."""
        if per_minute <= 0:
            if await count_below(self.count_writes, user, max_open if max_open > 0 else None):
                return None
            return await self._recounted(user, max_open, {"_id": user}, {})
        ahead = -1  # the minute of a gateway whose clock is ahead of this one's
        for _ in range(3):
            now = self.clock()
            minute = max(int(now // MINUTE_S), ahead)
            inside = min(1 - (now / MINUTE_S - minute), 1.0)  # the previous minute's share
            # Admitted while this minute's count after it plus the previous minute's
            # weighted count stays within the limit: while ``m`` is below ``cap``.
            previous = await self._previous_count(user, minute)
            cap = math.floor(per_minute - previous * inside)
            if cap <= 0:
                return _per_minute_refusal(per_minute, inside)
            this_minute = {"_id": user, "minute": minute, "m": {"$lt": cap}}
            query = this_minute | ({"n": {"$lt": max_open}} if max_open > 0 else {})
            update = {"$inc": {"n": 1, "m": 1}, "$setOnInsert": {"prev": previous}}
            try:
                # One conditional upsert: a document that does not match (a limit
                # reached, another minute) fails the upsert's insert on its ``_id``.
                await self.count_writes.update_one(query, update, upsert=True)
                return None
            except DuplicateKeyError:
                pass
            counts = await self.counts.find_one({"_id": user})
            if counts is None:
                continue  # deleted meanwhile: again
            if (was := counts.get("minute")) is not None and was > minute:
                ahead = was  # another gateway's clock is ahead: count in its minute
                continue
            if was != minute:
                await self._roll_over(user, counts, minute)
                continue
            if counts.get("m", 0) >= cap:
                return _per_minute_refusal(per_minute, inside)
            if max_open > 0 and counts.get("n", 0) >= max_open:
                return await self._recounted(user, max_open, this_minute, {"$inc": {"m": 1}})
            # Neither limit: a concurrent upsert created the document first (MongoDB
            # applies neither write): again.
        raise RuntimeError(f"the counts of {user!r} could not be updated")

    async def _recounted(
        self, user: str, max_open: int, query: Document, update: Document
    ) -> Refusal | None:
        """The open-task limit is reached by the counter: recount the user's open
        tasks; if the counter ran ahead, correct it and admit (with ``update`` too, on
        the document matching ``query``)."""
        actual = await self.store.count_open({"user": user}, limit=max_open)
        if actual < max_open:
            corrected = {"$set": {"n": actual + 1}} | update
            if (await self.counts.update_one(query, corrected)).matched_count:
                return None
            # The minute filled up or rolled over meanwhile: soft limits, let it pass.
            await self.counts.update_one({"_id": user}, {"$set": {"n": actual + 1}})
            return None
        return Refusal(
            f"you have {actual} unfinished tasks, the limit is {max_open}: wait for some to finish",
            retry_after_s=5,
        )

    async def release(self, user: str, *, per_minute: int) -> None:
        """Give back an admission whose submission was refused after all."""
        await self.counts.bulk_write([one_open_task_less(user)])
        if per_minute > 0:
            minute = int(self.clock() // MINUTE_S)
            await self.counts.update_one(
                {"_id": user, "minute": minute, "m": {"$gt": 0}}, {"$inc": {"m": -1}}
            )

    async def _previous_count(self, user: str, minute: int) -> int:
        """The user's count in the minute before ``minute``, read once per minute: a
        count that can no longer grow (but for submissions racing the minute's end)."""
        if self._minute != minute:
            self._minute, self._previous = minute, {}
        if user not in self._previous:
            counts = await self.counts.find_one({"_id": user}) or {}
            if counts.get("minute") == minute:
                self._previous[user] = int(counts.get("prev", 0))
            elif counts.get("minute") == minute - 1:
                self._previous[user] = int(counts.get("m", 0))
            else:
                self._previous[user] = 0
        return self._previous[user]

    async def _roll_over(self, user: str, counts: Document, minute: int) -> None:
        """Start ``minute`` in the user's document (one from before it), keeping the
        count of the minute before it. Only the first of racing gateways does (the old
        minute is in the query)."""
        was = counts.get("minute")
        previous = int(counts.get("m", 0)) if was == minute - 1 else 0
        await self.counts.update_one(
            {"_id": user, "minute": was}, {"$set": {"minute": minute, "m": 0, "prev": previous}}
        )


def _per_minute_refusal(per_minute: int, inside: float) -> Refusal:
    # The estimate falls as this minute ends (then the previous one's weight fades).
    wait = max(math.ceil(inside * MINUTE_S), 1)
    return Refusal(f"at most {per_minute} tasks per minute; retry in {wait} s", retry_after_s=wait)


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
