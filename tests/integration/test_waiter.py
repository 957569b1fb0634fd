"""A sync request's wait: answered from the document the sink's notice carries (one read
when it carries none), and still answered by polling when no notice comes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from pymongo.asynchronous.database import AsyncDatabase

from proto import names
from proto.events import TERMINAL_KINDS, TaskCancelled, encode_event
from proto.notices import TaskFolded, TaskOutcome, encode_folded
from services.common import bus
from services.gateway.waiting import TerminalWaiter
from services.storage.mongo import Document
from services.storage.tasks import TaskStore, folded_notice
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


@pytest.fixture
async def waiter(
    nats_server: Any, fresh_db: AsyncDatabase[Document]
) -> AsyncIterator[tuple[NATS, Tasks, TerminalWaiter]]:
    """A waiter for task ``t`` of alice (stored, running), subscribed."""
    nc = await bus.connect(nats_server.url, "test-waiter")
    tasks = Tasks(fresh_db)
    await tasks.new("t")
    waiter = await TerminalWaiter.start(nc, "t", "alice")
    yield nc, tasks, waiter
    await waiter.close()
    await nc.close()


async def test_the_notice_carries_the_document_to_answer_with(
    waiter: tuple[NATS, Tasks, TerminalWaiter],
) -> None:
    nc, tasks, wait = waiter
    await tasks.end("t", "succeeded")
    document = await tasks.collection.find_one({"_id": "t"})
    await nc.publish(names.folded_subject("t"), encode_folded(folded_notice("t", document)))
    answer = await wait.wait(tasks, 10)
    assert document == answer  # dates and bytes as the store's client reads them
    assert 0 == tasks.reads


async def test_the_notice_of_the_fold_that_ended_the_task_is_the_answer(
    waiter: tuple[NATS, Tasks, TerminalWaiter],
) -> None:
    """The sink tells the outcome it wrote, without reading the document back."""
    nc, tasks, wait = waiter
    outcome = TaskOutcome(status="succeeded", images=["images/alice/t_1.png"], seeds=[7])
    await nc.publish(
        names.folded_subject("t"), encode_folded(TaskFolded(task_id="t", outcome=outcome))
    )
    answer = await wait.wait(tasks, 10)
    assert answer is not None
    assert ("t", "alice", "succeeded", ["images/alice/t_1.png"], [7], "", None) == (
        answer["_id"],
        answer["user"],
        answer["status"],
        answer["images"],
        answer["seeds"],
        answer["message"],
        answer["code"],
    )
    assert 0 == tasks.reads


async def test_an_outcome_that_is_no_end_is_not_the_answer(
    waiter: tuple[NATS, Tasks, TerminalWaiter],
) -> None:
    nc, tasks, wait = waiter
    await tasks.end("t", "cancelled")
    running = TaskFolded(task_id="t", outcome=TaskOutcome(status="running"))
    await nc.publish(names.folded_subject("t"), encode_folded(running))
    answer = await wait.wait(tasks, 10)
    assert answer is not None
    assert "cancelled" == answer["status"]
    assert 1 == tasks.reads, "read instead"


async def test_a_notice_carrying_another_users_document_is_not_the_answer(
    waiter: tuple[NATS, Tasks, TerminalWaiter],
) -> None:
    nc, tasks, wait = waiter
    await tasks.end("t", "succeeded")
    forged = task_document("t", user="mallory") | {"status": "succeeded", "images": ["x"]}
    await nc.publish(names.folded_subject("t"), encode_folded(folded_notice("t", forged)))
    answer = await wait.wait(tasks, 10)
    assert answer is not None
    assert ("alice", []) == (answer["user"], answer["images"])
    assert 1 == tasks.reads


async def test_the_waiter_hears_its_tasks_end_not_every_step(
    waiter: tuple[NATS, Tasks, TerminalWaiter],
) -> None:
    _, _, wait = waiter
    ends = [names.event_subject("t", kind) for kind in TERMINAL_KINDS]
    subjects = [subscription.subject for subscription in wait._subscriptions]
    assert sorted([names.folded_subject("t"), *ends]) == sorted(subjects)


async def test_a_notice_without_the_document_answers_with_one_read(
    waiter: tuple[NATS, Tasks, TerminalWaiter],
) -> None:
    """A notice of a sink from before it carried the document, or of a document too
    large to carry."""
    nc, tasks, wait = waiter
    await tasks.end("t", "succeeded")  # folded, then announced
    await nc.publish(names.folded_subject("t"))
    document = await wait.wait(tasks, 10)
    assert document is not None
    assert "succeeded" == document["status"]
    assert 1 == tasks.reads, "no read before the notice, one after"


async def test_without_a_notice_the_terminal_event_starts_polling(
    waiter: tuple[NATS, Tasks, TerminalWaiter],
) -> None:
    nc, tasks, wait = waiter
    await tasks.end("t", "cancelled")
    event = TaskCancelled(task_id="t")
    await nc.publish(names.event_subject("t", "cancelled"), encode_event(event))
    document = await wait.wait(tasks, 10)
    assert document is not None
    assert "cancelled" == document["status"]
    assert tasks.reads >= 1


async def test_a_task_that_may_have_ended_before_the_wait_is_read_first(
    waiter: tuple[NATS, Tasks, TerminalWaiter],
) -> None:
    _, tasks, wait = waiter
    await tasks.end("t", "failed")
    document = await wait.wait(tasks, 10, read_first=True)
    assert document is not None
    assert "failed" == document["status"]
    assert 1 == tasks.reads
