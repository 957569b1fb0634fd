"""Quotas from counters (issue 15, "bursts are accepted fast"): an admission costs the
same whether the user has no open task or thousands, and the counters follow the fold."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pymongo import AsyncMongoClient, monitoring

from proto.events import TaskSucceeded
from services.storage.mongo import Document, database
from services.storage.quotas import QuotaStore
from services.storage.sink import _LaterBooks
from services.storage.tasks import Ends
from tests.documents import task_document

pytestmark = pytest.mark.integration


@pytest.fixture
async def quotas(fresh_db: Any) -> QuotaStore:
    quotas = QuotaStore(fresh_db)
    await quotas.store.ensure_indexes()
    await quotas.ensure_indexes()
    return quotas


def _task(user: str, task_id: str | None = None) -> dict[str, Any]:
    return task_document(task_id, user=user)


class _Commands(monitoring.CommandListener):
    """The collections each command names (PyMongo's command monitoring)."""

    def __init__(self) -> None:
        self.collections: list[str] = []
        self.commands: list[tuple[str, str]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        target = event.command.get(event.command_name)
        if isinstance(target, str):
            self.collections.append(target)
            self.commands.append((event.command_name, target))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@pytest.fixture
async def watched(mongo_server: Any) -> AsyncIterator[tuple[QuotaStore, _Commands]]:
    """A quota store whose client records every command it sends."""
    commands = _Commands()
    client: AsyncMongoClient[Document] = AsyncMongoClient(
        mongo_server.url, tz_aware=True, event_listeners=[commands]
    )
    name = f"test_{secrets.token_hex(4)}"
    try:
        quotas = QuotaStore(database(client, name))
        await quotas.store.ensure_indexes()
        await quotas.ensure_indexes()
        yield quotas, commands
    finally:
        await client.drop_database(name)
        await client.close()


async def test_admission_never_reads_the_tasks(watched: tuple[QuotaStore, _Commands]) -> None:
    """Counting a user's open tasks and last minute's submissions on every request made
    admission slower with every queued task (21-34/s with a deep queue). Admission now
    touches only its counters, whatever the queue: checked by the commands it sends, not
    by timing it (``bench/submit_rate.py`` measures the rate)."""
    quotas, commands = watched
    await quotas.tasks.insert_many([_task("busy") for _ in range(500)])
    await quotas.counts.update_one({"_id": "busy"}, {"$set": {"n": 500}}, upsert=True)
    commands.collections.clear()
    for _ in range(20):
        assert await quotas.admit("busy", max_open=100_000, per_minute=100_000) is None
    touched = set(commands.collections)
    assert "tasks" not in touched, touched
    assert touched == {quotas.counts.name}, touched
    assert 500 + 20 == (await quotas.counts.find_one({"_id": "busy"}) or {})["n"]


async def test_admission_below_the_limits_is_one_write(
    watched: tuple[QuotaStore, _Commands],
) -> None:
    """Each admission is a command of the task store (SecantusDB spends ~1 ms of CPU per
    command): below its limits it writes the user's one counts document once (both
    counters) and reads nothing back; the previous minute's count is read once per
    minute."""
    quotas, commands = watched
    assert await quotas.admit("eve", max_open=100, per_minute=100) is None
    commands.commands.clear()
    for _ in range(5):
        assert await quotas.admit("eve", max_open=100, per_minute=100) is None
    assert [("update", quotas.counts.name)] * 5 == commands.commands
    counts = await quotas.counts.find_one({"_id": "eve"}) or {}
    assert (6, 6) == (counts["n"], counts["m"])


async def test_counters_follow_admissions_the_fold_and_releases(quotas: QuotaStore) -> None:
    limits = {"max_open": 2, "per_minute": 100}
    ids = [secrets.token_hex(12) for _ in range(2)]
    for task_id in ids:
        assert await quotas.admit("ann", **limits) is None
        await quotas.store.insert(_task("ann", task_id))
    refusal = await quotas.admit("ann", **limits)
    assert refusal is not None
    assert "unfinished tasks" in refusal.reason
    # A task ending (the event fold) frees its place; folding it twice frees one only.
    for _ in range(2):
        await quotas.store.apply(TaskSucceeded(task_id=ids[0], attempt=1, images=[]))
    assert await quotas.admit("ann", **limits) is None
    await quotas.store.insert(_task("ann"))
    assert await quotas.admit("ann", **limits) is not None
    # A submission refused after admission gives its place back.
    await quotas.store.apply(TaskSucceeded(task_id=ids[1], attempt=1, images=[]))
    assert await quotas.admit("ann", **limits) is None
    assert 2 == await _open(quotas, "ann")
    await quotas.release("ann", per_minute=100)
    assert 1 == await _open(quotas, "ann")


async def _open(quotas: QuotaStore, user: str) -> int:
    counts = await quotas.counts.find_one({"_id": user})
    assert counts is not None
    return int(counts["n"])


MINUTE_600 = 600 * 60.0


async def test_a_new_minute_keeps_the_last_ones_count(fresh_db: Any) -> None:
    """The first admission of a minute rolls the user's document over: the minute that
    ended weighs in by the share of it still inside the last 60 s."""
    quotas = QuotaStore(fresh_db, clock=lambda: MINUTE_600 + 30)  # half of 599 counts
    await quotas.counts.insert_one({"_id": "fay", "n": 4, "minute": 599, "m": 10, "prev": 3})
    # 12 per minute, 10 in the minute before weighing 0.5: 7 more now.
    for _ in range(7):
        assert await quotas.admit("fay", max_open=0, per_minute=12) is None
    refusal = await quotas.admit("fay", max_open=0, per_minute=12)
    assert refusal is not None
    assert "per minute" in refusal.reason
    assert 30 == refusal.retry_after_s
    expected = {"_id": "fay", "n": 11, "minute": 600, "m": 7, "prev": 10}
    assert expected == await quotas.counts.find_one({"_id": "fay"})
    # A second gateway (nothing cached) reads the same weight from the document.
    other = QuotaStore(fresh_db, clock=lambda: MINUTE_600 + 30)
    assert await other.admit("fay", max_open=0, per_minute=12) is not None
    await quotas.release("fay", per_minute=12)
    assert await other.admit("fay", max_open=0, per_minute=12) is None


async def test_counts_from_before_the_minute_fields_go_on(fresh_db: Any) -> None:
    """A counts document written before it held the minute's count (``{_id, n}``)."""
    quotas = QuotaStore(fresh_db, clock=lambda: MINUTE_600 + 1)
    await quotas.counts.insert_one({"_id": "gus", "n": 3})
    assert await quotas.admit("gus", max_open=10, per_minute=5) is None
    expected = {"_id": "gus", "n": 4, "minute": 600, "m": 1, "prev": 0}
    assert expected == await quotas.counts.find_one({"_id": "gus"})


async def test_a_gateway_whose_clock_is_behind_counts_in_the_later_minute(
    fresh_db: Any,
) -> None:
    """Two replicas' clocks a little apart must not reset each other's minute."""
    quotas = QuotaStore(fresh_db, clock=lambda: MINUTE_600 + 59)
    await quotas.counts.insert_one({"_id": "hal", "n": 0, "minute": 601, "m": 2, "prev": 0})
    assert await quotas.admit("hal", max_open=0, per_minute=3) is None
    assert await quotas.admit("hal", max_open=0, per_minute=3) is not None
    expected = {"_id": "hal", "n": 1, "minute": 601, "m": 3, "prev": 0}
    assert expected == await quotas.counts.find_one({"_id": "hal"})


async def test_a_counter_ahead_of_the_truth_is_corrected(quotas: QuotaStore) -> None:
    """A gateway that died between admission and insert left the counter too high."""
    await quotas.counts.update_one({"_id": "cid"}, {"$set": {"n": 50}}, upsert=True)
    assert await quotas.admit("cid", max_open=2, per_minute=0) is None
    assert {"_id": "cid", "n": 1} == await quotas.counts.find_one({"_id": "cid"})
    # With a per-minute limit too, the correction counts the minute as well.
    await quotas.counts.update_one({"_id": "cid"}, {"$set": {"n": 50}})
    assert await quotas.admit("cid", max_open=2, per_minute=10) is None
    counts = await quotas.counts.find_one({"_id": "cid"}) or {}
    assert (1, 1) == (counts["n"], counts["m"])


async def test_submissions_per_minute(quotas: QuotaStore) -> None:
    for _ in range(3):
        assert await quotas.admit("dee", max_open=0, per_minute=3) is None
    refusal = await quotas.admit("dee", max_open=0, per_minute=3)
    assert refusal is not None
    assert "per minute" in refusal.reason
    assert 1 <= refusal.retry_after_s <= 60


async def test_a_users_first_submissions_at_once_are_all_counted(quotas: QuotaStore) -> None:
    """Concurrent first admissions race to create the user's counters: each is counted
    once, none fails (a lost upsert race is retried as an update)."""
    import asyncio

    refusals = await asyncio.gather(
        *(quotas.admit("racer", max_open=100, per_minute=100) for _ in range(8))
    )
    assert [None] * 8 == refusals
    counts = await quotas.counts.find_one({"_id": "racer"})
    assert counts is not None
    assert 8 == counts["n"]


async def test_the_ends_of_a_fetch_cost_one_read_and_one_write(
    watched: tuple[QuotaStore, _Commands],
) -> None:
    """The sink settles the tasks that one fetch ended together (``Ends``): each owner's
    count goes down once per task that ended, with one read and one write in all; an
    end that changes nothing (a duplicate delivery) counts nothing."""
    quotas, commands = watched
    owners = {"ann": [secrets.token_hex(6) for _ in range(4)], "bob": [secrets.token_hex(6)]}
    for user, ids in owners.items():
        for task_id in ids:
            assert await quotas.admit(user, max_open=10, per_minute=0) is None
            await quotas.store.insert(_task(user, task_id))
    ending = [*owners["ann"][:3], *owners["bob"]]  # one of ann's stays open
    ends = Ends(quotas.store)
    for task_id in [*ending, ending[0]]:  # the first one's end delivered twice
        await quotas.store.finish(TaskSucceeded(task_id=task_id, attempt=1, images=[]), ends=ends)
    commands.commands.clear()
    await ends.settle()
    assert [("find", "tasks"), ("update", "task_open_counts")] == commands.commands
    assert {"_id": "ann", "n": 1} == await quotas.counts.find_one({"_id": "ann"})
    assert {"_id": "bob", "n": 0} == await quotas.counts.find_one({"_id": "bob"})


async def test_the_sinks_bookkeeping_follows_its_notices_in_one_read_and_write(
    watched: tuple[QuotaStore, _Commands],
) -> None:
    """The sink hands the bookkeeping over (``Ends(books=...)``): settling a fetch's ends
    costs nothing, and several fetches' ends are read and counted together a moment
    later, off the path of the notices to sync requests."""
    quotas, commands = watched
    ids = [secrets.token_hex(6) for _ in range(3)]
    for task_id in ids:
        assert await quotas.admit("cy", max_open=10, per_minute=0) is None
        await quotas.store.insert(_task("cy", task_id))
    later = _LaterBooks(quotas.store, after_s=1.0)
    for task_id in ids:  # three fetches, an end each
        ends = Ends(quotas.store, later.add)
        await quotas.store.finish(TaskSucceeded(task_id=task_id, attempt=1, images=[]), ends=ends)
        commands.commands.clear()
        await ends.settle()
        assert [] == commands.commands
    commands.commands.clear()
    await later.close()
    assert [("find", "tasks"), ("update", "task_open_counts")] == commands.commands
    assert {"_id": "cy", "n": 0} == await quotas.counts.find_one({"_id": "cy"})
