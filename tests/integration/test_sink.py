"""The storage sink folds real JetStream events into real MongoDB documents."""

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats.js import JetStreamContext

from proto import names
from proto.events import (
    TaskEvent,
    TaskProgressed,
    TaskStarted,
    TaskSucceeded,
    encode_event,
    event_kind,
)
from services.common import bus
from services.common.settings import BusSettings
from services.common.supervise import supervised
from services.storage.mongo import database, open_client
from services.storage.sink import run_sink
from services.storage.tasks import TaskStore, new_task_document

pytestmark = pytest.mark.integration


@pytest.fixture
async def sink(
    nats_server: Any, mongo_server: Any
) -> AsyncIterator[tuple[JetStreamContext, TaskStore]]:
    nc = await bus.connect(nats_server.url, "test-sink")
    js = nc.jetstream()
    await bus.ensure_streams(js, BusSettings())
    client = open_client(mongo_server.url)
    db_name = f"sink_{secrets.token_hex(4)}"
    tasks = TaskStore(database(client, db_name))
    stop = asyncio.Event()
    runner = asyncio.create_task(supervised("sink", lambda: run_sink(js, tasks, stop), stop))
    yield js, tasks
    stop.set()
    await runner
    await client.drop_database(db_name)
    await client.close()
    await nc.close()


async def _publish(js: JetStreamContext, event: TaskEvent, msg_id: str | None = None) -> None:
    headers = {names.MSG_ID_HEADER: msg_id} if msg_id else None
    await js.publish(
        names.event_subject(event.task_id, event_kind(event)), encode_event(event), headers=headers
    )


async def _eventually(check: Any, timeout_s: float = 15) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := await check():
            return result
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def test_events_are_folded_idempotently_after_idle_periods(
    sink: tuple[JetStreamContext, TaskStore], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    js, tasks = sink
    task_id = secrets.token_hex(6)
    await tasks.insert(
        new_task_document(
            task_id=task_id,
            user="u",
            kind="txt2img",
            model_name="m",
            model_key="m-000000",
            parameters={},
            total_steps=2,
            job_count=1,
        )
    )
    # Longer than the sink's fetch timeout: the loop must survive empty fetches.
    await asyncio.sleep(2.5)
    await js.publish(names.event_subject(task_id, "progress"), b"not json at all")
    await _publish(js, TaskStarted(task_id=task_id, attempt=1))
    await _publish(js, TaskProgressed(task_id=task_id, step=2, total_steps=2, progress=1.0))
    await _publish(js, TaskProgressed(task_id=task_id, step=1, total_steps=2, progress=0.5))
    await _publish(js, TaskSucceeded(task_id=task_id, images=["k"]))
    await _publish(js, TaskStarted(task_id=task_id, attempt=1))

    async def finished() -> Any:
        doc = await tasks.get(task_id)
        return doc if doc and doc["status"] == "succeeded" else None

    doc = await _eventually(finished)
    assert (["k"], 2) == (doc["images"], doc["progress"]["step"])
    info = await js.consumer_info(names.EVENT_STREAM, names.STORAGE_CONSUMER)
    await _eventually(lambda: _drained(js))
    assert info.config.durable_name == names.STORAGE_CONSUMER
    # Empty fetches and the poison message were handled, not survived by a restart.
    assert [] == [r.getMessage() for r in caplog.records if "crashed" in r.getMessage()]


async def _drained(js: JetStreamContext) -> bool:
    info = await js.consumer_info(names.EVENT_STREAM, names.STORAGE_CONSUMER)
    return not info.num_pending and not info.num_ack_pending
