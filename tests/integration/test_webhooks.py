"""Webhook deliveries do not wait on each other (issue 15, item 5).

A receiver answering in ~10 s used to hold up every delivery fetched after it (another
user's completed hook waited 162 s). Here one user's receiver takes 10 s per answer and
has a backlog of progress events; another user's completed hook must still arrive at
once. Real nats-server and MongoDB; the receivers are aiohttp servers on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiohttp import web
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from proto import names
from proto.events import TaskEvent, TaskProgressed, TaskSucceeded, encode_event
from services.common import bus
from services.common.servers import free_port
from services.common.settings import StoreSettings, from_environ
from services.storage.mongo import Document, database, open_client
from services.storage.tasks import TaskStore
from services.storage.webhooks import Dispatcher
from tests.documents import task_document
from tests.waiting import eventually, until

pytestmark = pytest.mark.integration
SLOW_S = 10.0


@dataclass
class Receiver:
    url: str
    delay_s: float
    arrivals: list[tuple[float, str]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    concurrent: int = 0
    most_concurrent: int = 0


@pytest.fixture
async def receivers() -> AsyncIterator[tuple[Receiver, Receiver]]:
    slow = Receiver(url="", delay_s=SLOW_S)
    fast = Receiver(url="", delay_s=0.0)
    runners = []
    for receiver in (slow, fast):
        port = free_port()
        receiver.url = f"http://127.0.0.1:{port}/hook"

        async def hook(request: web.Request, receiver: Receiver = receiver) -> web.Response:
            receiver.concurrent += 1
            receiver.most_concurrent = max(receiver.most_concurrent, receiver.concurrent)
            try:
                body = await request.json()
                await asyncio.sleep(receiver.delay_s)
                receiver.arrivals.append((time.monotonic(), body["data"]["taskId"]))
                receiver.arrived.set()
                return web.Response(status=204)
            finally:
                receiver.concurrent -= 1

        app = web.Application()
        app.router.add_post("/hook", hook)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
    yield slow, fast
    for runner in runners:
        await runner.cleanup()


@dataclass
class Dispatching:
    """A dispatcher running on real servers, and a way to publish events to it."""

    js: Any
    db: Any

    async def publish(self, event: TaskEvent, kind: str) -> None:
        subject = names.event_subject(event.task_id, kind)
        await self.js.publish(subject, encode_event(event), stream=names.EVENT_STREAM)

    async def hooks(self, *tasks: tuple[str, str, Receiver, str]) -> None:
        """Tasks ``(task id, user, receiver, event kind)`` with their webhook."""
        await self.db["tasks"].insert_many(
            [
                {"_id": task, "user": user, "webhook": {"url": receiver.url, "events": [kind]}}
                for task, user, receiver, kind in tasks
            ]
        )


@contextlib.asynccontextmanager
async def dispatching(
    nats_url: str, mongo_url: str, **overrides: Any
) -> AsyncIterator[Dispatching]:
    settings = from_environ(
        StoreSettings,
        {},
        webhook_allow_hosts=["127.0.0.1:*"],
        webhook_allow_http=True,
        webhook_allow_private=True,
        **overrides,
    )
    nc = await bus.connect(nats_url, "webhooks-test")
    js = nc.jetstream()
    await bus.ensure_streams(js, settings)
    client = open_client(mongo_url)
    db = database(client, f"hooks_{secrets.token_hex(4)}")
    stop = asyncio.Event()
    dispatcher = asyncio.create_task(Dispatcher(nc, db, settings).run(stop))
    try:

        async def subscribed() -> bool:
            try:
                await js.consumer_info(names.EVENT_STREAM, names.WEBHOOK_CONSUMER)
            except NotFoundError:
                return False
            return True

        # It delivers only events published after its consumer exists.
        await eventually(subscribed, "the dispatcher's consumer")
        yield Dispatching(js, db)
    finally:
        stop.set()
        dispatcher.cancel()
        await asyncio.gather(dispatcher, return_exceptions=True)
        await client.drop_database(db.name)
        await client.close()
        await nc.close()


async def test_a_slow_receiver_does_not_delay_another_users_delivery(
    private_nats_url: str, mongo_server: Any, receivers: tuple[Receiver, Receiver]
) -> None:
    slow, fast = receivers
    slow_task, fast_task = "slow" + secrets.token_hex(4), "fast" + secrets.token_hex(4)
    async with dispatching(
        private_nats_url,
        mongo_server.url,
        webhook_timeout_s=SLOW_S + 5,
        webhook_max_per_receiver=2,
    ) as hooks:
        await hooks.hooks((slow_task, "a", slow, "progress"), (fast_task, "b", fast, "completed"))
        for step in range(1, 9):  # a backlog for the slow receiver: 8 × 10 s
            progressed = TaskProgressed(task_id=slow_task, step=step, total_steps=8)
            await hooks.publish(progressed, "progress")
        await until(lambda: slow.concurrent == 2, "the slow deliveries under way")
        sent = time.monotonic()
        await hooks.publish(TaskSucceeded(task_id=fast_task, images=[]), "succeeded")
        await asyncio.wait_for(fast.arrived.wait(), 3 * SLOW_S)
        delay = fast.arrivals[0][0] - sent
        print(
            f"\nwebhook delivery delay with a slow ({SLOW_S:g} s) receiver pending: {delay:.3f} s"
        )
        assert delay < 2.0, f"delayed {delay:.1f} s behind another user's slow receiver"
        assert not slow.arrivals, "the slow receiver had not answered yet"
        assert 2 == slow.most_concurrent, "at most webhook_max_per_receiver at once per receiver"


async def test_a_full_receiver_backlog_is_deferred_not_failed(
    private_nats_url: str, mongo_server: Any, receivers: tuple[Receiver, Receiver]
) -> None:
    """Beyond ``webhook_max_queued_per_receiver`` events wait on the stream, and coming
    back later is no failed attempt: with one attempt allowed, all still arrive."""
    _, receiver = receivers
    receiver.delay_s = 0.5
    task = "busy" + secrets.token_hex(4)
    async with dispatching(
        private_nats_url,
        mongo_server.url,
        webhook_max_per_receiver=1,
        webhook_max_queued_per_receiver=1,
        webhook_max_attempts=1,
    ) as hooks:
        await hooks.hooks((task, "a", receiver, "progress"))
        for step in range(1, 7):
            await hooks.publish(TaskProgressed(task_id=task, step=step, total_steps=6), "progress")
        await until(lambda: len(receiver.arrivals) >= 6, "six deliveries", timeout_s=30)
        assert 6 == len(receiver.arrivals)
        assert 1 == receiver.most_concurrent
        assert 0 == await hooks.db["webhook_failures"].count_documents({})
        assert 0 == await hooks.db["webhook_attempts"].count_documents({})


async def test_a_tasks_document_is_read_once_for_all_its_events(fresh_db: Any) -> None:
    """A task's webhook never changes: its events after the first are not a read each."""
    reads: list[str] = []

    class Counted(TaskStore):
        async def fields(self, task_id: str, *names: str) -> Document | None:
            reads.append(task_id)
            return await super().fields(task_id, *names)

    dispatcher = Dispatcher(cast(Client, None), fresh_db, StoreSettings())
    dispatcher.tasks = Counted(fresh_db)
    task_id = secrets.token_hex(6)
    await dispatcher.tasks.insert(task_document(task_id))  # no webhook
    for step in (1, 2, 3):
        event = TaskProgressed(task_id=task_id, step=step, total_steps=3)
        await dispatcher.handle(cast(Msg, SimpleNamespace(data=encode_event(event))))
    assert [task_id] == reads
