"""Webhook deliveries do not wait on each other (issue 15, item 5).

A receiver answering in ~10 s used to hold up every delivery fetched after it (another
user's completed hook waited 162 s). Here one user's receiver takes 10 s per answer and
has a backlog of progress events; another user's completed hook must still arrive at
once. Real nats-server and MongoDB; the receivers are aiohttp servers on loopback.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from proto import names
from proto.events import TaskEvent, TaskProgressed, TaskSucceeded, encode_event
from services.common import bus
from services.common.servers import free_port
from services.common.settings import StoreSettings, from_environ
from services.storage.mongo import database, open_client
from services.storage.webhooks import Dispatcher

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


async def test_a_slow_receiver_does_not_delay_another_users_delivery(
    private_nats_url: str, mongo_server: Any, receivers: tuple[Receiver, Receiver]
) -> None:
    slow, fast = receivers
    settings = from_environ(
        StoreSettings,
        {},
        webhook_allow_hosts=["127.0.0.1"],
        webhook_allow_http=True,
        webhook_allow_private=True,
        webhook_timeout_s=SLOW_S + 5,
        webhook_max_per_receiver=2,
    )
    nc = await bus.connect(private_nats_url, "webhooks-test")
    js = nc.jetstream()
    await bus.ensure_streams(js, settings)
    client = open_client(mongo_server.url)
    db = database(client, f"hooks_{secrets.token_hex(4)}")
    slow_task, fast_task = "slow" + secrets.token_hex(4), "fast" + secrets.token_hex(4)
    await db["tasks"].insert_many(
        [
            {"_id": slow_task, "user": "a", "webhook": {"url": slow.url, "events": ["progress"]}},
            {"_id": fast_task, "user": "b", "webhook": {"url": fast.url, "events": ["completed"]}},
        ]
    )
    stop = asyncio.Event()
    dispatcher = asyncio.create_task(Dispatcher(js, db, settings).run(stop))

    async def publish(event: TaskEvent, kind: str) -> None:
        subject = names.event_subject(event.task_id, kind)
        await js.publish(subject, encode_event(event), stream=names.EVENT_STREAM)

    try:
        await asyncio.sleep(1.0)  # the consumer exists (it delivers only new events)
        for step in range(1, 9):  # a backlog for the slow receiver: 8 × 10 s
            await publish(TaskProgressed(task_id=slow_task, step=step, total_steps=8), "progress")
        await asyncio.sleep(1.0)  # the slow deliveries are under way
        sent = time.monotonic()
        await publish(TaskSucceeded(task_id=fast_task, images=[]), "succeeded")
        await asyncio.wait_for(fast.arrived.wait(), 3 * SLOW_S)
        delay = fast.arrivals[0][0] - sent
        print(
            f"\nwebhook delivery delay with a slow ({SLOW_S:g} s) receiver pending: {delay:.3f} s"
        )
        assert delay < 2.0, f"delayed {delay:.1f} s behind another user's slow receiver"
        assert not slow.arrivals, "the slow receiver had not answered yet"
        assert 2 == slow.most_concurrent, "at most webhook_max_per_receiver at once per receiver"
    finally:
        stop.set()
        dispatcher.cancel()
        await asyncio.gather(dispatcher, return_exceptions=True)
        await client.drop_database(db.name)
        await client.close()
        await nc.close()
