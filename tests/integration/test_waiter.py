"""A sync request's wait: answered on the sink's notice with one read of the document,
and still answered by polling when no notice comes (a storage service from before it)."""

from __future__ import annotations

from typing import Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from proto import names
from proto.events import TaskSucceeded, encode_event
from services.common import bus
from services.gateway.waiting import TerminalWaiter
from services.storage.mongo import Document
from services.storage.tasks import TaskStore
from tests.documents import task_document

pytestmark = pytest.mark.integration


class Tasks(TaskStore):
    """The task store, its reads counted."""

    reads = 0

    async def get(self, task_id: str, user: str | None = None) -> Document | None:
        self.reads += 1
        return await super().get(task_id, user)

    async def new(self, task_id: str) -> None:
        await self.insert(task_document(task_id, user="alice"))

    async def end(self, task_id: str, status: str) -> None:
        await self.collection.update_one({"_id": task_id}, {"$set": {"status": status}})


async def test_the_notice_answers_with_one_read(
    nats_server: Any, fresh_db: AsyncDatabase[Document]
) -> None:
    nc = await bus.connect(nats_server.url, "test-waiter")
    tasks = Tasks(fresh_db)
    await tasks.new("t1")
    waiter = await TerminalWaiter.start(nc, "t1", "alice")
    try:
        await tasks.end("t1", "succeeded")  # folded, then announced
        await nc.publish(names.folded_subject("t1"))
        document = await waiter.wait(tasks, 10)
        assert document is not None
        assert "succeeded" == document["status"]
        assert 1 == tasks.reads, "no read before the notice, one after"
    finally:
        await waiter.close()
        await nc.close()


async def test_without_a_notice_the_terminal_event_starts_polling(
    nats_server: Any, fresh_db: AsyncDatabase[Document]
) -> None:
    nc = await bus.connect(nats_server.url, "test-waiter")
    tasks = Tasks(fresh_db)
    await tasks.new("t2")
    waiter = await TerminalWaiter.start(nc, "t2", "alice")
    try:
        await tasks.end("t2", "succeeded")
        event = TaskSucceeded(task_id="t2", images=[])
        await nc.publish(names.event_subject("t2", "succeeded"), encode_event(event))
        document = await waiter.wait(tasks, 10)
        assert document is not None
        assert "succeeded" == document["status"]
        assert tasks.reads >= 1
    finally:
        await waiter.close()
        await nc.close()


async def test_a_task_that_may_have_ended_before_the_wait_is_read_first(
    nats_server: Any, fresh_db: AsyncDatabase[Document]
) -> None:
    nc = await bus.connect(nats_server.url, "test-waiter")
    tasks = Tasks(fresh_db)
    await tasks.new("t3")
    await tasks.end("t3", "failed")
    waiter = await TerminalWaiter.start(nc, "t3", "alice")
    try:
        document = await waiter.wait(tasks, 10, read_first=True)
        assert document is not None
        assert "failed" == document["status"]
        assert 1 == tasks.reads
    finally:
        await waiter.close()
        await nc.close()
