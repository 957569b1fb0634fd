"""JetStream streams, consumers and buckets, declared idempotently.

Every service that needs a stream declares it at start: declaring is idempotent, and
no service then depends on another having started first.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    ConsumerInfo,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import (
    BadRequestError,
    BucketNotFoundError,
    KeyNotFoundError,
    NotFoundError,
)
from nats.js.kv import KeyValue

from proto import names
from proto.events import TaskEvent, encode_event, event_kind
from proto.workers import WorkerStatus, decode_worker_status
from services.common.settings import BusSettings


def server_urls(url: str) -> list[str]:
    """``nats_url`` may list a cluster's servers, comma-separated: the client tries each
    one to connect and to reconnect (a cluster node down is then no outage)."""
    return [u.strip() for u in url.split(",") if u.strip()]


async def connect(
    url: str,
    name: str,
    settings: BusSettings | None = None,
    *,
    reconnected: Callable[[], Awaitable[None]] | None = None,
) -> Client:
    """A connection that reconnects forever (a NATS restart must not kill a worker or the
    gateway), with the deployment's credentials and TLS from ``settings``: user and
    password or a token in the URL, a ``.creds`` file (JWT + NKey), and TLS with a CA
    and optionally a client certificate. ``reconnected`` runs after each reconnect
    (core NATS notices sent meanwhile are lost)."""
    options: dict[str, Any] = {}
    if reconnected is not None:
        options["reconnected_cb"] = reconnected
    if settings is not None:
        if settings.nats_creds_file:
            options["user_credentials"] = settings.nats_creds_file
        if settings.nats_tls_ca or settings.nats_tls_cert:
            context = ssl.create_default_context(cafile=settings.nats_tls_ca or None)
            if settings.nats_tls_cert:
                context.load_cert_chain(settings.nats_tls_cert, settings.nats_tls_key or None)
            options["tls"] = context
    return await nats.connect(
        server_urls(url),
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        **options,
    )


def task_stream_config(settings: BusSettings) -> StreamConfig:
    return StreamConfig(
        name=names.TASK_STREAM,
        subjects=[names.TASK_SUBJECTS],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        max_msgs=settings.task_stream_max_msgs,
        discard=DiscardPolicy.NEW,
        duplicate_window=settings.dedupe_window_s,
        num_replicas=settings.stream_replicas,
    )


def event_stream_config(settings: BusSettings) -> StreamConfig:
    return StreamConfig(
        name=names.EVENT_STREAM,
        subjects=[names.EVENT_SUBJECTS],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=settings.event_max_age_s,
        duplicate_window=min(settings.dedupe_window_s, settings.event_max_age_s),
        num_replicas=settings.stream_replicas,
    )


async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    try:
        await js.stream_info(config.name or "")
    except NotFoundError:
        await js.add_stream(config)
        return
    await js.update_stream(config)


async def ensure_streams(js: JetStreamContext, settings: BusSettings) -> None:
    await _ensure_stream(js, task_stream_config(settings))
    await _ensure_stream(js, event_stream_config(settings))
    await _ensure_stream(js, advisory_stream_config(settings.stream_replicas))
    # Created here with the configured replicas, so later lookups find them replicated.
    await worker_bucket(js, settings.stream_replicas)
    await cancel_bucket(js, settings)


PAUSED_FOREVER = "2999-01-01T00:00:00Z"
"""A consumer paused until then gets no deliveries until it is resumed."""
BATCHES_IN_FLIGHT = 2
"""Batches a worker holds at once: the one on the GPU and the one before it, whose images
are still being encoded and stored (its tasks are acked only after that). With one, the
GPU would wait for every batch's uploads before its consumer let out the next."""


def task_consumer_config(
    model_key: str, settings: BusSettings, max_ack_pending: int = 1
) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=names.consumer_name(model_key),
        filter_subject=names.task_subject(model_key),
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=settings.ack_wait_s,
        max_deliver=settings.max_deliver,
        # The checkpoint's share of the GPU budget: the scheduler raises and lowers it.
        max_ack_pending=max_ack_pending,
    )


async def ensure_task_consumer(
    js: JetStreamContext,
    model_key: str,
    settings: BusSettings,
    max_ack_pending: int = 1,
    *,
    paused: bool = False,
) -> ConsumerInfo:
    """The checkpoint's consumer, created if missing (``paused``: until the scheduler
    grants); its info, read once."""
    name = names.consumer_name(model_key)
    info: ConsumerInfo
    try:
        info = await js.consumer_info(names.TASK_STREAM, name)
    except NotFoundError:
        config = task_consumer_config(model_key, settings, max_ack_pending)
        if paused:
            config.pause_until = PAUSED_FOREVER
        try:
            info = await js.add_consumer(names.TASK_STREAM, config)
        except BadRequestError:
            # Created concurrently by another service: fine, it has the same config.
            info = await js.consumer_info(names.TASK_STREAM, name)
    return info


JS_STORE_LIMIT = 10077
"""JetStream's error code for a publish refused by a stream limit (``maximum messages``,
``bytes`` or ``messages per subject exceeded`` with the discard-new policy)."""

WORKER_TTL_S = 20.0
"""A worker record not refreshed for this long disappears: the worker is gone."""


async def worker_bucket(js: JetStreamContext, replicas: int = 1) -> KeyValue:
    try:
        return await js.key_value(names.WORKER_BUCKET)
    except BucketNotFoundError:
        return await js.create_key_value(
            bucket=names.WORKER_BUCKET, ttl=WORKER_TTL_S, history=1, replicas=replicas
        )


def _stored_event(event: TaskEvent, msg_id: str) -> dict[str, Any]:
    """How a task event is stored: its subject, payload, stream and de-duplicating id
    (the arguments of ``js.publish`` and ``js.publish_async``)."""
    return {
        "subject": names.event_subject(event.task_id, event_kind(event)),
        "payload": encode_event(event),
        "stream": names.EVENT_STREAM,
        "headers": {names.MSG_ID_HEADER: msg_id},
    }


async def publish_event(js: JetStreamContext, event: TaskEvent, msg_id: str) -> bool:
    """Store a task event on ``sd.event.<task_id>.<kind>``; ``msg_id`` de-duplicates it:
    False when an event of that id was stored already (within the dedupe window)."""
    ack = await js.publish(**_stored_event(event, msg_id))
    return not ack.duplicate


EVENT_CONFIRM_S = 5.0
"""How long :func:`send_event`'s confirmation waits for JetStream (``js.publish``'s own
default)."""


async def send_event(
    js: JetStreamContext, event: TaskEvent, msg_id: str
) -> Callable[[], Awaitable[bool]]:
    """:func:`publish_event` in two halves, so that work can go on between them: when
    this returns, the event is on its way, ahead of whatever the connection sends after
    it; awaiting the returned confirmation waits for JetStream's answer (False: a
    duplicate; an error or no answer in ``EVENT_CONFIRM_S`` raises)."""
    answer = await js.publish_async(**_stored_event(event, msg_id))

    async def confirmed() -> bool:
        ack = await asyncio.wait_for(answer, EVENT_CONFIRM_S)
        return not ack.duplicate

    return confirmed


async def publish_unconfirmed(nc: Client, event: TaskEvent, msg_id: str) -> None:
    """Send a task event to the event stream without waiting for JetStream's answer: the
    stream stores (and de-duplicates) it all the same, and the connection keeps it in
    order with the events sent after it. For progress, sent at every step of every task
    of a batch: a lost one is covered by the next, and the answer cost the worker ~30×
    the CPU of the send (~200 µs against ~6 µs per event, measured on a CPU machine)."""
    await nc.publish(
        names.event_subject(event.task_id, event_kind(event)),
        encode_event(event),
        headers={names.MSG_ID_HEADER: msg_id},
    )


async def publish_end(js: JetStreamContext, event: TaskEvent) -> bool:
    """Store a worker's terminal event; False when the task had ended already (another
    attempt's end is in the stream, see :func:`proto.names.end_msg_id`)."""
    return await publish_event(js, event, names.end_msg_id(event.task_id))


def registry_notice(nc: Client) -> Callable[[], Awaitable[None]]:
    """What a store calls after writing the registry or a user's options: every gateway
    forgets the reads it remembers (``services/storage/readcache.py``)."""

    async def announce() -> None:
        await nc.publish(names.REGISTRY_CHANGED_SUBJECT)

    return announce


async def has_event(js: JetStreamContext, task_id: str, kinds: tuple[str, ...]) -> bool:
    """Whether the event stream holds an event of one of ``kinds`` for this task."""
    for kind in kinds:
        try:
            await js.get_last_msg(names.EVENT_STREAM, names.event_subject(task_id, kind))
        except NotFoundError:
            continue
        return True
    return False


async def worker_records(js: JetStreamContext) -> list[WorkerStatus]:
    """The live workers' records (expired ones are gone from the bucket).

    The keys come from the bucket stream's subjects, not from ``KeyValue.keys()``: that
    creates a consumer per call, which the server keeps a while after use, and callers
    that poll (the scheduler's tick, ``sdswarm status``) ran into nats-server's limit of
    consumers per stream ("maximum consumers limit reached").
    """
    bucket = await worker_bucket(js)
    prefix = f"$KV.{names.WORKER_BUCKET}."
    info = await js.stream_info(f"KV_{names.WORKER_BUCKET}", subjects_filter=prefix + ">")
    keys = [subject.removeprefix(prefix) for subject in (info.state.subjects or {})]
    records = []
    for key in keys:
        with contextlib.suppress(KeyNotFoundError, msgspec.DecodeError):
            entry = await bucket.get(key)
            if entry.value:
                records.append(decode_worker_status(entry.value))
    return records


async def lease_bucket(
    js: JetStreamContext, bucket: str, ttl_s: float, replicas: int = 1
) -> KeyValue:
    """The bucket of leases: an entry not rewritten within ``ttl_s`` is gone (see
    services/scheduler/lease.py). Created by whichever replica comes first."""
    try:
        return await js.key_value(bucket)
    except BucketNotFoundError:
        return await js.create_key_value(bucket=bucket, ttl=ttl_s, history=1, replicas=replicas)


async def cancel_bucket(js: JetStreamContext, settings: BusSettings) -> KeyValue:
    try:
        return await js.key_value(names.CANCEL_BUCKET)
    except BucketNotFoundError:
        return await js.create_key_value(
            bucket=names.CANCEL_BUCKET,
            ttl=settings.event_max_age_s,
            history=1,
            replicas=settings.stream_replicas,
        )


def advisory_stream_config(replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=names.ADVISORY_STREAM,
        subjects=[
            names.advisory_subject(names.MAX_DELIVERIES_ADVISORY),
            names.advisory_subject(names.TERMINATED_ADVISORY),
        ],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        num_replicas=replicas,
    )
