"""The event sink: folds ``sd.event.>`` into task documents.

A durable pull consumer (``storage``) on ``SD_EVENTS``; the fold is idempotent
(:meth:`TaskStore.apply`), so redelivery after a crash, several sink replicas and
duplicate events are all harmless. Ack comes after the MongoDB write.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from pymongo.errors import PyMongoError

from proto import names
from proto.events import TaskEvent, TaskProgressed, decode_event
from services.storage.tasks import TaskStore

log = logging.getLogger(__name__)
BATCH = 64


def sink_consumer_config() -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=names.STORAGE_CONSUMER,
        filter_subject=names.EVENT_SUBJECTS,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=30,
        max_ack_pending=10_000,
    )


def _superseded(events: list[tuple[Msg, TaskEvent]]) -> set[int]:
    """Progress events that a later progress event of the same task and attempt in the
    same fetch replaces: the fold keeps only the newest progress, so one write does (a
    batch of tasks sends one progress event per task per step)."""
    latest: dict[tuple[str, int], int] = {}
    for index, (_, event) in enumerate(events):
        if isinstance(event, TaskProgressed):
            latest[(event.task_id, event.attempt)] = index
    return {
        id(message)
        for index, (message, event) in enumerate(events)
        if isinstance(event, TaskProgressed) and latest[(event.task_id, event.attempt)] != index
    }


async def run_sink(js: JetStreamContext, tasks: TaskStore, stop: asyncio.Event) -> None:
    subscription = await js.pull_subscribe(
        names.EVENT_SUBJECTS,
        durable=names.STORAGE_CONSUMER,
        stream=names.EVENT_STREAM,
        config=sink_consumer_config(),
    )
    folded = 0
    try:
        while not stop.is_set():
            try:
                messages = await subscription.fetch(BATCH, timeout=1)
            except TimeoutError:  # nats raises its own subclass or the builtin, by code path
                continue
            events = []
            for message in messages:
                try:
                    events.append((message, decode_event(message.data)))
                except msgspec.DecodeError:
                    # Poison message: no retry can ever decode it.
                    log.error("undecodable event on %s, terminating it", message.subject)
                    await message.term()
            superseded = _superseded(events)
            for message, event in events:
                if id(message) in superseded:
                    await message.ack()  # a later progress event of the batch covers it
                    continue
                try:
                    await tasks.apply(event)
                except PyMongoError as exc:
                    # MongoDB is down or failing over: keep the event, retry it shortly.
                    log.warning("cannot fold %s yet: %s", message.subject, exc)
                    await message.nak(delay=1)
                    continue
                await message.ack()
                folded += 1
    finally:
        log.info("event sink stopped after folding %d events", folded)
        await subscription.unsubscribe()
