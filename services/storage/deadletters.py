"""Dead letters: tasks JetStream gave up on end ``failed`` with a reason, never stuck.

A command whose worker crashed or hung ``max_deliver`` times, or that a worker
terminated as undecodable, raises a JetStream advisory. The advisories are kept in
``SD_ADVISORIES``; this handler reads each one, fetches the command by its stream
sequence, stores a dead-letter record (the payload, the reason), publishes
``TaskFailed`` so the task document, SSE clients and sync waiters all learn why, and
removes the command from ``SD_TASKS`` (a work queue keeps such messages otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import NotFoundError
from pymongo.asynchronous.database import AsyncDatabase

from proto import names
from proto.advisories import MAX_DELIVER_TYPE, ConsumerAdvisory, decode_advisory
from proto.codec import decode_generate
from proto.events import TaskFailed
from services.common import bus, consumer
from services.storage.mongo import Document

log = logging.getLogger(__name__)


def failure_for(advisory: ConsumerAdvisory, task_id: str) -> TaskFailed:
    if advisory.type == MAX_DELIVER_TYPE:
        code = "max_deliveries"
        message = (
            f"gave up after {advisory.deliveries} deliveries: the worker crashed, hung or"
            " was stopped every time before finishing"
        )
    else:
        code = "terminated"
        message = "the task was terminated by its worker (undecodable or invalid command)"
    return TaskFailed(
        task_id=task_id,
        attempt=max(advisory.deliveries, 1),
        at=time.time(),
        worker="dead-letters",
        code=code,
        message=message,
    )


async def handle_advisory(
    js: JetStreamContext, db: AsyncDatabase[Document], advisory: ConsumerAdvisory
) -> None:
    try:
        raw = await js.get_msg(advisory.stream, advisory.stream_seq)
    except NotFoundError:
        return  # already handled (the advisory was redelivered) or purged
    payload = raw.data or b""
    task_id: str | None = None
    with contextlib.suppress(msgspec.DecodeError):
        task_id = decode_generate(payload).task_id
    await db["dead_letters"].update_one(
        {"_id": f"{advisory.stream}.{advisory.stream_seq}"},
        {
            "$setOnInsert": {
                "task_id": task_id,
                "subject": raw.subject,
                "payload": payload,
                "advisory": advisory.type,
                "consumer": advisory.consumer,
                "deliveries": advisory.deliveries,
                "at": dt.datetime.now(dt.UTC),
            }
        },
        upsert=True,
    )
    if task_id is not None:
        event = failure_for(advisory, task_id)
        await bus.publish_event(js, event, f"{task_id}.failed.deadletter")
    log.warning(
        "dead letter %s seq %d (task %s)",
        advisory.type,
        advisory.stream_seq,
        task_id,
        extra={"task_id": task_id},
    )
    with contextlib.suppress(NotFoundError):
        await js.delete_msg(advisory.stream, advisory.stream_seq)


class DeadLetterStore:
    """What the operations page reads of the dead letters the service records."""

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self.collection = db["dead_letters"]

    async def recent(self, limit: int) -> list[Document]:
        """The newest first, without their payloads (commands may be large)."""
        cursor = self.collection.find({}, {"payload": 0}).sort("at", -1).limit(limit)
        return [doc async for doc in cursor]


async def run_dead_letters(nc: Client, db: AsyncDatabase[Document], stop: asyncio.Event) -> None:
    js = nc.jetstream()
    subscription = await consumer.Puller.durable(
        nc,
        ">",
        durable=names.DEAD_LETTER_CONSUMER,
        stream=names.ADVISORY_STREAM,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=30),
    )

    async def handle(message: Msg) -> None:
        try:
            advisory = decode_advisory(message.data)
        except msgspec.DecodeError as exc:
            raise consumer.Poison(f"undecodable advisory: {exc}") from exc
        await handle_advisory(js, db, advisory)

    async for messages in consumer.batches(subscription, stop, consumer.fixed(16)):
        for message in messages:
            await consumer.settle(message, handle(message))
