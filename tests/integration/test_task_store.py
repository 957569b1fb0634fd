"""The event fold against a real MongoDB-wire server: forward-only, fenced, idempotent."""

import secrets
from typing import Any

import msgspec
import pytest

from proto.events import (
    TaskCancelled,
    TaskFailed,
    TaskProgressed,
    TaskStarted,
    TaskSucceeded,
)
from proto.notices import TaskFolded, TaskOutcome
from services.storage.tasks import TaskStore, folded_document, outcome_of
from tests.documents import task_document

pytestmark = pytest.mark.integration


@pytest.fixture
async def store(fresh_db: Any) -> TaskStore:
    store = TaskStore(fresh_db)
    await store.ensure_indexes()
    return store


async def _new_task(store: TaskStore) -> str:
    task_id = secrets.token_hex(6)
    await store.insert(task_document(task_id, user="alice", total_steps=4))
    return task_id


async def test_happy_path_moves_forward(store: TaskStore) -> None:
    task_id = await _new_task(store)
    assert await store.apply(TaskStarted(task_id=task_id, attempt=1, at=1.0))
    assert await store.apply(TaskProgressed(task_id=task_id, step=2, total_steps=4, progress=0.5))
    assert await store.apply(TaskSucceeded(task_id=task_id, images=["k1"], info="{}", at=2.0))
    doc = await store.get(task_id)
    assert doc is not None
    assert ("succeeded", ["k1"], 1.0) == (doc["status"], doc["images"], doc["progress"]["progress"])
    assert doc["started_at"] is not None
    assert doc["finished_at"] is not None


async def test_duplicates_and_late_events_change_nothing(store: TaskStore) -> None:
    task_id = await _new_task(store)
    await store.apply(TaskStarted(task_id=task_id, attempt=1))
    assert await store.apply(TaskProgressed(task_id=task_id, step=3, total_steps=4))
    assert not await store.apply(TaskProgressed(task_id=task_id, step=3, total_steps=4))
    assert not await store.apply(TaskProgressed(task_id=task_id, step=2, total_steps=4))
    await store.apply(TaskSucceeded(task_id=task_id, images=["k"]))
    # Terminal is final: nothing after it lands, not even another terminal event.
    assert not await store.apply(TaskFailed(task_id=task_id, code="x", message="late"))
    assert not await store.apply(TaskStarted(task_id=task_id, attempt=2))
    assert not await store.apply(TaskProgressed(task_id=task_id, attempt=2, step=1, total_steps=4))
    doc = await store.get(task_id)
    assert doc is not None
    assert ("succeeded", 3) == (doc["status"], doc["progress"]["step"])


@pytest.mark.parametrize(
    "end",
    [
        TaskSucceeded(task_id="", images=["k1", "k2"], info="{}", seeds=[1, 2]),
        TaskFailed(task_id="", code="bad_image", message="cannot decode"),
        TaskCancelled(task_id="", reason="by the owner"),
    ],
)
async def test_the_fold_that_ends_a_task_tells_exactly_what_it_holds(
    store: TaskStore, end: TaskSucceeded | TaskFailed | TaskCancelled
) -> None:
    """What a sync answer reads (the notice's outcome) is what the document holds, even
    where the open document held something else in those fields."""
    task_id = await _new_task(store)
    stale = {"images": ["old"], "info": "old", "seeds": [9], "code": "old", "message": "old"}
    await store.collection.update_one({"_id": task_id}, {"$set": stale})
    told: list[TaskFolded] = []

    async def written(notice: TaskFolded) -> None:
        told.append(notice)

    assert await store.finish(msgspec.structs.replace(end, task_id=task_id), written=written)
    doc = await store.get(task_id)
    assert doc is not None
    assert [TaskFolded(task_id=task_id, outcome=outcome_of(end))] == told
    assert {k: doc[k] for k in TaskOutcome.__struct_fields__} == msgspec.structs.asdict(
        outcome_of(end)
    )
    answer = folded_document(told[0], task_id, "alice")
    assert answer is not None
    assert doc == doc | answer, "the answer agrees with the document"


async def test_an_end_folded_with_its_steps_never_moves_the_step_back(store: TaskStore) -> None:
    """The sink folds an end with the steps that came in the same fetch; a later step
    folded from an earlier fetch stays (the CI run of session 8 saw step 2 become 1)."""
    task_id = await _new_task(store)
    await store.apply(TaskStarted(task_id=task_id, attempt=1))
    assert await store.apply(TaskProgressed(task_id=task_id, step=3, total_steps=4))
    late = TaskProgressed(task_id=task_id, step=2, total_steps=4, progress=0.5)
    assert await store.finish(TaskSucceeded(task_id=task_id, images=["k"]), progress=late)
    doc = await store.get(task_id)
    assert doc is not None
    assert ("succeeded", ["k"], 3, 1.0) == (
        doc["status"],
        doc["images"],
        doc["progress"]["step"],
        doc["progress"]["progress"],
    )
    # A step ahead of the document's still rides in with the end, in the same call.
    other = await _new_task(store)
    await store.apply(TaskStarted(task_id=other, attempt=1))
    ahead = TaskProgressed(task_id=other, step=4, total_steps=4, progress=1.0)
    assert await store.finish(TaskFailed(task_id=other, code="x", message="m"), progress=ahead)
    doc = await store.get(other)
    assert doc is not None
    assert ("failed", 4) == (doc["status"], doc["progress"]["step"])
    # Already ended: neither the end nor its steps change anything.
    assert not await store.finish(TaskCancelled(task_id=other), progress=ahead)


def _started(task_id: str) -> TaskStarted:
    return TaskStarted(task_id=task_id, attempt=1, at=1000.0, worker="w-1", stream_seq=7)


def _second_step(task_id: str) -> TaskProgressed:
    return TaskProgressed(task_id=task_id, step=2, total_steps=4, progress=0.5, eta_seconds=1.5)


async def test_a_start_folded_with_a_step_leaves_what_one_by_one_would(store: TaskStore) -> None:
    """The sink holds a start with its task's steps and writes them together."""
    together, apart = await _new_task(store), await _new_task(store)
    assert await store.begin(_started(together), _second_step(together))
    assert await store.apply(_started(apart))
    assert await store.apply(_second_step(apart))
    one, other = await store.get(together), await store.get(apart)
    assert one is not None
    assert other is not None
    for doc in (one, other):
        del doc["_id"], doc["created_at"]
    assert other == one
    assert ("running", 2, "w-1", 7) == (
        one["status"],
        one["progress"]["step"],
        one["worker"],
        one["stream_seq"],
    )
    # Started already (another sink folded it): the step alone still moves forward.
    later = TaskProgressed(task_id=together, step=3, total_steps=4)
    assert await store.begin(_started(together), later)
    moved = await store.get(together)
    assert moved is not None
    assert (3, 1000.0) == (moved["progress"]["step"], moved["started_at"].timestamp())
    # Ended: nothing changes.
    await store.apply(TaskSucceeded(task_id=together, images=["k"]))
    assert not await store.begin(TaskStarted(task_id=together, attempt=2), later)


async def test_a_preview_stays_shown_until_a_newer_one(store: TaskStore) -> None:
    task_id = await _new_task(store)
    await store.apply(TaskStarted(task_id=task_id, attempt=1))
    rendered = TaskProgressed(task_id=task_id, step=1, total_steps=4, preview_key="u/p.png")
    assert await store.apply(rendered)
    assert await store.apply(TaskProgressed(task_id=task_id, step=2, total_steps=4))
    doc = await store.get(task_id)
    assert doc is not None
    assert (2, "u/p.png") == (doc["progress"]["step"], doc["progress"]["preview_key"])


async def test_an_older_attempt_never_overwrites_a_newer_one(store: TaskStore) -> None:
    task_id = await _new_task(store)
    await store.apply(TaskStarted(task_id=task_id, attempt=1))
    await store.apply(TaskStarted(task_id=task_id, attempt=2))
    # The zombie first attempt wakes up and reports.
    assert not await store.apply(TaskProgressed(task_id=task_id, attempt=1, step=4, total_steps=4))
    assert not await store.apply(TaskSucceeded(task_id=task_id, attempt=1, images=["old"]))
    assert await store.apply(TaskProgressed(task_id=task_id, attempt=2, step=1, total_steps=4))
    assert await store.apply(TaskCancelled(task_id=task_id, attempt=2))
    doc = await store.get(task_id)
    assert doc is not None
    assert ("cancelled", 2, []) == (doc["status"], doc["attempt"], doc["images"])


async def test_queries_are_scoped_to_the_owner(store: TaskStore) -> None:
    task_id = await _new_task(store)
    assert await store.get(task_id, "alice") is not None
    assert await store.get(task_id, "mallory") is None


async def _skipped_job_step(store: TaskStore, task_id: str) -> tuple[bool, int, int]:
    doc = await store.get(task_id)
    assert doc is not None
    progress = doc["progress"]
    return progress["skipped"], progress["job_no"], progress["step"]


async def test_a_skip_marks_the_job_until_the_next_one_starts(store: TaskStore) -> None:
    task_id = await _new_task(store)
    assert await store.apply(TaskStarted(task_id=task_id, attempt=1))
    assert await store.apply(TaskProgressed(task_id=task_id, step=2, total_steps=4, job_count=2))
    skip = TaskProgressed(task_id=task_id, step=2, total_steps=4, job_count=2, skipped=True)
    assert await store.apply(skip), "the skip marks the step already reported"
    assert (True, 0, 2) == await _skipped_job_step(store, task_id)
    next_job = TaskProgressed(task_id=task_id, step=1, total_steps=4, job_no=1, job_count=2)
    assert await store.apply(next_job)
    assert not await store.apply(skip), "a late skip of the job before changes nothing"
    assert (False, 1, 1) == await _skipped_job_step(store, task_id)
