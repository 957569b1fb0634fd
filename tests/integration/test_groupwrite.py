"""Group commit on a real MongoDB-wire server: writes asked for together go as one
command, and each caller still gets its own write's outcome."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from bson.errors import InvalidDocument
from pymongo.errors import DuplicateKeyError, WriteError

from proto.events import TaskStarted
from services.storage.groupwrite import GroupWriter
from services.storage.quotas import count_below
from services.storage.tasks import TaskStore
from tests.documents import task_document

pytestmark = pytest.mark.integration


async def test_a_lone_write_goes_at_once_alone(fresh_db: Any) -> None:
    writes = GroupWriter(fresh_db["things"])
    await writes.insert_one({"_id": "a"})
    assert 1 == writes.commands
    assert {"_id": "a"} == await fresh_db["things"].find_one({"_id": "a"})


async def test_writes_asked_for_together_share_commands(fresh_db: Any) -> None:
    writes = GroupWriter(fresh_db["things"])
    await asyncio.gather(*(writes.insert_one({"_id": n}) for n in range(40)))
    assert 40 == await fresh_db["things"].count_documents({})
    # The first goes alone; the others wait behind it and go together.
    assert writes.commands <= 3, writes.commands


async def test_each_write_gets_its_own_error(fresh_db: Any) -> None:
    """A duplicate id fails its own insert only, with the error insert_one raises; an
    update the server refuses fails only its caller; the rest of the batch lands."""
    collection = fresh_db["things"]
    await collection.insert_one({"_id": "taken", "n": "text"})
    writes = GroupWriter(collection)
    outcomes = await asyncio.gather(
        *(writes.insert_one({"_id": n}) for n in range(5)),
        writes.insert_one({"_id": "taken"}),
        writes.update_one({"_id": "taken"}, {"$inc": {"n": 1}}),  # $inc of a string
        writes.update_one({"_id": 0}, {"$set": {"seen": True}}, upsert=True),
        return_exceptions=True,
    )
    assert [None] * 5 == outcomes[:5]
    assert isinstance(outcomes[5], DuplicateKeyError), outcomes[5]
    assert isinstance(outcomes[6], WriteError), outcomes[6]
    assert outcomes[7] is None
    assert 6 == await collection.count_documents({})
    assert {"_id": "taken", "n": "text"} == await collection.find_one({"_id": "taken"})


async def test_a_capped_counter_counts_exactly_up_to_its_cap(fresh_db: Any) -> None:
    """Concurrent counts of one counter share commands; the cap still holds exactly,
    whether the counter is new (the first upserts race) or exists."""
    writes = GroupWriter(fresh_db["counters"])
    counted = await asyncio.gather(*(count_below(writes, "ann", 5) for _ in range(12)))
    assert 5 == sum(counted)
    assert {"_id": "ann", "n": 5} == await fresh_db["counters"].find_one({"_id": "ann"})
    assert writes.commands < 12


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        # Over 16 MB: the driver reports it as that write's own error.
        ({"_id": "huge", "blob": b"x" * (17 * 1024 * 1024)}, WriteError),
        # Not encodable at all: the driver refuses the whole batch before sending it.
        ({"_id": "odd", "value": object()}, InvalidDocument),
    ],
)
async def test_a_document_the_driver_refuses_fails_its_own_write_only(
    fresh_db: Any, bad: dict[str, Any], error: type[Exception]
) -> None:
    writes = GroupWriter(fresh_db["things"])
    blocker = asyncio.create_task(writes.insert_one({"_id": "first"}))
    await asyncio.sleep(0)  # in flight: the next three wait and go as one batch
    outcomes = await asyncio.gather(
        writes.insert_one({"_id": "a"}),
        writes.insert_one(bad),
        writes.insert_one({"_id": "b"}),
        return_exceptions=True,
    )
    await blocker
    assert [None, None] == [outcomes[0], outcomes[2]], outcomes
    assert isinstance(outcomes[1], error), outcomes[1]
    assert {"first", "a", "b"} == set(await fresh_db["things"].distinct("_id"))


async def test_noted_stream_sequences_land_together(fresh_db: Any) -> None:
    """What a burst of submissions notes without waiting is written in one command, and
    ``drain`` (a gateway stopping) waits for it."""
    tasks = TaskStore(fresh_db)
    tasks.deferred.linger_s = 1.0  # far longer than the read below, however slow the machine
    ids = [f"t{n}" for n in range(20)]
    await asyncio.gather(*(tasks.collection.insert_one({"_id": i}) for i in ids))
    for seq, task_id in enumerate(ids, start=1):
        tasks.note_stream_seq(task_id, seq)
    assert 0 == await tasks.collection.count_documents({"stream_seq": {"$exists": True}})
    await tasks.drain()
    written = {d["_id"]: d["stream_seq"] async for d in tasks.collection.find()}
    assert {task_id: seq for seq, task_id in enumerate(ids, start=1)} == written
    assert 1 == tasks.deferred.commands


async def test_a_started_task_needs_no_noted_stream_sequence(fresh_db: Any) -> None:
    """A worker's start records its command's sequence; the gateway's noted one, still
    lingering then, writes nothing over it."""
    tasks = TaskStore(fresh_db)
    started, waiting = task_document(), task_document()
    await tasks.insert(started)
    await tasks.insert(waiting)
    tasks.note_stream_seq(started["_id"], 7)
    tasks.note_stream_seq(waiting["_id"], 8)
    event = TaskStarted(task_id=started["_id"], attempt=1, at=1.0, stream_seq=7)
    assert await tasks.apply(event)
    await tasks.drain()  # at once, not after the linger
    found = {d["_id"]: d["stream_seq"] async for d in tasks.collection.find()}
    assert {started["_id"]: 7, waiting["_id"]: 8} == found
