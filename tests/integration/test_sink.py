"""The storage sink folds real JetStream events into real MongoDB documents."""

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from proto import names
from proto.events import (
    TaskEvent,
    TaskFailed,
    TaskProgressed,
    TaskStarted,
    TaskSucceeded,
    encode_event,
    event_kind,
)
from proto.notices import TaskOutcome, decode_folded
from services.common import bus
from services.common.settings import BusSettings
from services.common.supervise import supervised
from services.storage.mongo import Document
from services.storage.sink import run_sink
from services.storage.tasks import TaskStore, folded_document
from tests.documents import task_document
from tests.fakes import ends_stored
from tests.waiting import eventually

pytestmark = pytest.mark.integration


@pytest.fixture
async def sink(nats_server: Any, fresh_db: Any) -> AsyncIterator[tuple[NATS, TaskStore]]:
    nc = await bus.connect(nats_server.url, "test-sink")
    js = nc.jetstream()
    await bus.ensure_streams(js, BusSettings())
    tasks = TaskStore(fresh_db)
    stop = asyncio.Event()
    # Short empty fetches: the test sees several of them without waiting a second each.
    runner = asyncio.create_task(
        supervised("sink", lambda: run_sink(nc, tasks, stop, fetch_timeout_s=0.1), stop)
    )
    yield nc, tasks
    stop.set()
    await runner
    await nc.close()


async def _publish(js: JetStreamContext, event: TaskEvent, msg_id: str | None = None) -> None:
    headers = {names.MSG_ID_HEADER: msg_id} if msg_id else None
    await js.publish(
        names.event_subject(event.task_id, event_kind(event)), encode_event(event), headers=headers
    )


async def _empty_fetches(nc: NATS, fetches: int) -> None:
    """Until ``fetches`` of the sink's fetches have ended empty (nothing is published
    meanwhile): its pull requests, seen on the server. A fetch asks once or twice, so
    ``2 * fetches + 2`` asks hold at least ``fetches`` whole fetches."""
    asked = asyncio.Semaphore(0)

    async def seen(_: Msg) -> None:
        asked.release()

    subject = f"$JS.API.CONSUMER.MSG.NEXT.{names.EVENT_STREAM}.{names.STORAGE_CONSUMER}"
    subscription = await nc.subscribe(subject, cb=seen)
    try:
        for _ in range(2 * fetches + 2):
            await asyncio.wait_for(asked.acquire(), 15)
    finally:
        await subscription.unsubscribe()


async def test_events_are_folded_idempotently_after_idle_periods(
    sink: tuple[NATS, TaskStore], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    nc, tasks = sink
    js = nc.jetstream()
    task_id = secrets.token_hex(6)
    await tasks.insert(task_document(task_id, total_steps=2))
    # The loop must survive empty fetches: several end empty before any event comes.
    await _empty_fetches(nc, 3)
    await js.publish(names.event_subject(task_id, "progress"), b"not json at all")
    await _publish(js, TaskStarted(task_id=task_id, attempt=1))
    await _publish(js, TaskProgressed(task_id=task_id, step=2, total_steps=2, progress=1.0))
    await _publish(js, TaskProgressed(task_id=task_id, step=1, total_steps=2, progress=0.5))
    await _publish(js, TaskSucceeded(task_id=task_id, images=["k"]))
    await _publish(js, TaskStarted(task_id=task_id, attempt=1))

    async def finished() -> Document | None:
        doc = await tasks.get(task_id)
        return doc if doc and doc["status"] == "succeeded" else None

    doc = await eventually(finished, "the task folded to succeeded")
    assert (["k"], 2) == (doc["images"], doc["progress"]["step"])
    info = await js.consumer_info(names.EVENT_STREAM, names.STORAGE_CONSUMER)
    await eventually(lambda: _drained(js), "every event settled (the poison one terminated)")
    assert info.config.durable_name == names.STORAGE_CONSUMER
    # Empty fetches and the poison message were handled, not survived by a restart.
    assert [] == [r.getMessage() for r in caplog.records if "crashed" in r.getMessage()]


async def _drained(js: JetStreamContext) -> bool:
    info = await js.consumer_info(names.EVENT_STREAM, names.STORAGE_CONSUMER)
    return not info.num_pending and not info.num_ack_pending


async def test_a_folded_end_is_announced_once_it_is_in_the_document(
    sink: tuple[NATS, TaskStore],
) -> None:
    nc, tasks = sink
    task_id = secrets.token_hex(6)
    await tasks.insert(task_document(task_id, total_steps=1))
    seen: asyncio.Queue[str] = asyncio.Queue()

    async def announced(message: Msg) -> None:
        document = await tasks.get(task_id)
        seen.put_nowait(document["status"] if document else "missing")
        carried = folded_document(decode_folded(message.data), task_id, "u")
        # The fold ended the task: the notice tells its outcome, all of it as stored.
        told = {"_id", "user", *TaskOutcome.__struct_fields__}
        stored = {k: v for k, v in (document or {}).items() if k in told}
        same = carried == stored and told == set(stored)
        seen.put_nowait("carried the same" if same else f"carried {carried}")

    subscription = await nc.subscribe(names.folded_subject(task_id), cb=announced)
    try:
        await _publish(nc.jetstream(), TaskStarted(task_id=task_id, attempt=1))
        await _publish(nc.jetstream(), TaskSucceeded(task_id=task_id, attempt=1, images=[]))
        # Only the end is announced, and the document already says so when it is.
        assert "succeeded" == await asyncio.wait_for(seen.get(), 15)
        assert "carried the same" == seen.get_nowait()
        await eventually(lambda: _drained(nc.jetstream()), "every event settled")
        assert seen.empty(), "started was not announced"
    finally:
        await subscription.unsubscribe()


async def test_an_end_folded_already_is_announced_with_the_document_read_back(
    sink: tuple[NATS, TaskStore],
) -> None:
    """A duplicate end (or one that lost to another writer) changes nothing: the notice
    carries the document as stored, not the duplicate's outcome."""
    nc, tasks = sink
    task_id = secrets.token_hex(6)
    ended = {"status": "cancelled", "message": "by the owner", "attempt": 1}
    await tasks.insert(task_document(task_id, total_steps=1) | ended)
    notices: asyncio.Queue[bytes] = asyncio.Queue()

    async def heard(message: Msg) -> None:
        notices.put_nowait(message.data)

    subscription = await nc.subscribe(names.folded_subject(task_id), cb=heard)
    try:
        await _publish(nc.jetstream(), TaskSucceeded(task_id=task_id, attempt=1, images=["k"]))
        notice = decode_folded(await asyncio.wait_for(notices.get(), 15))
        assert notice.outcome is None
        assert await tasks.get(task_id) == folded_document(notice, task_id, "u")
    finally:
        await subscription.unsubscribe()


async def test_a_task_whose_events_come_together_is_folded_as_if_one_by_one(
    sink: tuple[NATS, TaskStore],
) -> None:
    """Started, its steps and its end in one fetch (a whole task within the sink's
    linger) fold in one write that leaves what the events one by one would have."""
    nc, tasks = sink
    js = nc.jetstream()
    ids = [secrets.token_hex(6) for _ in range(2)]
    for task_id in ids:
        await tasks.insert(task_document(task_id, total_steps=3))
    for task_id in ids:  # interleaved, as a batch's tasks are
        await _publish(js, TaskStarted(task_id=task_id, attempt=1, at=1000.0, worker="w-1"))
    for step in (1, 2, 3):
        for task_id in ids:
            await _publish(
                js, TaskProgressed(task_id=task_id, step=step, total_steps=3, progress=step / 3)
            )
    for task_id in ids:
        await _publish(js, TaskSucceeded(task_id=task_id, images=[f"{task_id}.png"]))
    await eventually(lambda: _drained(js), "every event settled")
    for task_id in ids:
        doc = await tasks.get(task_id)
        assert doc is not None
        assert ("succeeded", [f"{task_id}.png"], "w-1") == (
            doc["status"],
            doc["images"],
            doc["worker"],
        )
        assert 1000.0 == doc["started_at"].timestamp()
        assert (3, 3, 1.0) == (
            doc["progress"]["step"],
            doc["progress"]["total_steps"],
            doc["progress"]["progress"],
        )


class _Counted(TaskStore):
    """The task store, the starts and progress events it folds alone counted, and the
    starts it folds with a step."""

    progress_folds = start_folds = begins = 0

    async def apply(self, event: TaskEvent) -> bool:
        self.progress_folds += isinstance(event, TaskProgressed)
        self.start_folds += isinstance(event, TaskStarted)
        return await super().apply(event)

    async def begin(self, started: TaskStarted, progress: TaskProgressed) -> bool:
        self.begins += 1
        return await super().begin(started, progress)


@pytest.fixture
async def held(nats_server: Any, fresh_db: Any) -> AsyncIterator[tuple[NATS, _Counted]]:
    """A sink whose starts and progress events wait 5 s for company (far longer than a
    test's publishing, however slow the machine)."""
    nc = await bus.connect(nats_server.url, "test-sink")
    await bus.ensure_streams(nc.jetstream(), BusSettings())
    tasks = _Counted(fresh_db)
    stop = asyncio.Event()
    runner = asyncio.create_task(
        supervised(
            "sink", lambda: run_sink(nc, tasks, stop, fetch_timeout_s=0.1, linger_s=5.0), stop
        )
    )
    yield nc, tasks
    stop.set()
    await runner
    await nc.close()


async def test_steps_wait_for_their_end_across_other_tasks_events(
    held: tuple[NATS, _Counted],
) -> None:
    """Other tasks' ends (folded at once) do not cut a running task's wait short: its
    start and steps ride on its end's write (a batch's tasks start and end while others
    run), one write for the whole task."""
    nc, tasks = held
    js = nc.jetstream()
    running, short = (secrets.token_hex(6) for _ in range(2))
    for task_id in (running, short):
        await tasks.insert(task_document(task_id, total_steps=2))
    await _publish(js, TaskStarted(task_id=running, attempt=1, at=1000.0))
    await _publish(js, TaskProgressed(task_id=running, step=1, total_steps=2, progress=0.5))
    await _publish(js, TaskStarted(task_id=short, attempt=1, at=1001.0))
    await _publish(js, TaskSucceeded(task_id=short, images=[]))
    await eventually(lambda: _status(tasks, short, "succeeded"), "an end folded at once")
    doc = await tasks.get(short)
    assert doc is not None
    assert 1001.0 == doc["started_at"].timestamp()
    assert await _status(tasks, running, "waiting"), "its start waits with its steps"
    await _publish(js, TaskProgressed(task_id=running, step=2, total_steps=2, progress=1.0))
    await _publish(js, TaskSucceeded(task_id=running, images=["r.png"]))
    await eventually(lambda: _drained(js), "every event settled")
    doc = await tasks.get(running)
    assert doc is not None
    assert ("succeeded", 2, 1000.0) == (
        doc["status"],
        doc["progress"]["step"],
        doc["started_at"].timestamp(),
    )
    assert (0, 0, 0) == (tasks.progress_folds, tasks.start_folds, tasks.begins)


async def test_a_start_and_its_step_wait_no_longer_than_the_linger(
    nats_server: Any, fresh_db: Any
) -> None:
    """Once the wait is over, the start rides on the step's write: one write."""
    nc = await bus.connect(nats_server.url, "test-sink")
    await bus.ensure_streams(nc.jetstream(), BusSettings())
    tasks = _Counted(fresh_db)
    stop = asyncio.Event()
    # A fetch timeout longer than the wait for the step: the linger's end wakes the sink.
    runner = asyncio.create_task(
        supervised("sink", lambda: run_sink(nc, tasks, stop, fetch_timeout_s=8, linger_s=1), stop)
    )
    try:
        task_id = secrets.token_hex(6)
        await tasks.insert(task_document(task_id, total_steps=4))
        await _publish(nc.jetstream(), TaskStarted(task_id=task_id, attempt=1, at=1000.0))
        await _publish(nc.jetstream(), TaskProgressed(task_id=task_id, step=1, total_steps=4))
        doc = await eventually(lambda: _at_step(tasks, task_id, 1), "the step folded", timeout_s=6)
        assert ("running", 1000.0) == (doc["status"], doc["started_at"].timestamp())
        assert (0, 0, 1) == (tasks.progress_folds, tasks.start_folds, tasks.begins)
    finally:
        stop.set()
        await runner
        await nc.close()


async def _status(tasks: TaskStore, task_id: str, status: str) -> bool:
    doc = await tasks.get(task_id)
    return doc is not None and doc["status"] == status


async def _at_step(tasks: TaskStore, task_id: str, step: int) -> Document | None:
    doc = await tasks.get(task_id)
    return doc if doc is not None and doc["progress"]["step"] == step else None


async def test_a_task_ends_once_whichever_attempts_end_it(
    sink: tuple[NATS, TaskStore],
) -> None:
    """Two attempts can run one task at once when nats-server, killed with kill -9, hands
    its message out again. The stream keeps the first worker end only, and the task ends
    with it although a later attempt had started meanwhile (the sync waiter and SSE read
    the stream: they must see one end, and the task must not stay running)."""
    nc, tasks = sink
    js = nc.jetstream()
    task_id = secrets.token_hex(6)
    await tasks.insert(task_document(task_id, total_steps=2))
    await _publish(js, TaskStarted(task_id=task_id, attempt=1))
    await _publish(js, TaskStarted(task_id=task_id, attempt=2))
    await eventually(lambda: _drained(js), "both starts folded")
    assert await bus.publish_end(js, TaskSucceeded(task_id=task_id, attempt=1, images=["k"]))
    assert not await bus.publish_end(js, TaskSucceeded(task_id=task_id, attempt=2, images=["k"]))
    assert not await bus.publish_end(
        js, TaskFailed(task_id=task_id, attempt=3, code="x", message="y")
    )
    await eventually(lambda: _drained(js), "every event settled")
    assert 1 == await ends_stored(js, task_id)
    doc = await tasks.get(task_id)
    assert doc is not None
    assert ("succeeded", 1, ["k"]) == (doc["status"], doc["attempt"], doc["images"])
