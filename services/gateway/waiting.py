"""Waiting for a task to end (sync requests) and following it live (SSE).

Sync requests subscribe (core NATS, before publishing) to ``sd.folded.<task_id>``,
which the sink publishes once the task's end is in its document, carrying the outcome
its write set (or, when the task had ended already, the document read back), and answer
from that, so ``GET /tasks/{id}/result`` agrees with every sync answer: no read, no
polling (one read when the notice carries neither). They also hear the task's terminal
event (its terminal subjects only: not a message per step) and then poll the document
with backoff, in case the notice is lost (or the storage service predates it); MongoDB
is re-read periodically too, so a message missed during a reconnect only delays the
answer.
SSE uses a JetStream ordered consumer over ``SD_EVENTS``: it replays the task's
history first, and ``Last-Event-ID`` (the stream sequence) resumes after a reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import msgspec
from aiohttp import web
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig, DeliverPolicy

from proto import TaskStatus, names
from proto.events import (
    TERMINAL_KINDS,
    TaskCancelled,
    TaskEvent,
    TaskFailed,
    TaskSucceeded,
    decode_event,
    event_kind,
    event_to_builtins,
)
from proto.notices import decode_folded
from services.gateway.auth import caller
from services.gateway.errors import ApiError, too_many
from services.gateway.resources import Resources, resources
from services.gateway.validation import bounded_int
from services.storage.mongo import Document
from services.storage.tasks import TaskStore, folded_document, shown_task_id

MAX_EVENT_ID = 2**53 - 1
"""Event ids are JetStream sequences (uint64); a client's ``Last-Event-ID`` is at most
this (exact in every JSON client), so ``+ 1`` stays a valid start sequence."""

RECHECK_S = 5.0
"""How often a waiter re-reads MongoDB in case an event was missed."""


FOLD_POLL_S = (0.25, 1.0)
"""After the terminal event, without the sink's notice: first and longest pause between
reads of the task document (the pause doubles). The notice comes as soon as the fold is
written, so these reads only cover a lost notice; under load the fold trails the event
by more than a short pause, and reads sooner than this were mostly wasted (0.26 extra
reads per task at depth 32 with a first pause of 0.05 s)."""


class TerminalWaiter:
    """Waits until a task's document is terminal: what ``GET /tasks/{id}/result`` reads.

    The terminal event (core NATS, subscribed before publishing) only says the wait is
    nearly over; the answer is the document once the sink has folded the event, so a
    sync answer never runs ahead of the result route.
    """

    def __init__(self, task_id: str, user: str) -> None:
        self.task_id = task_id
        # Every read is scoped to the caller: a task id alone never reveals a task.
        self.user = user
        self._wake = asyncio.Event()
        self._heard = False
        """The terminal event went by."""
        self._folded = False
        """The sink said the document holds the end (since the last read)."""
        self._document: Document | None = None
        """The terminal document the sink's notice carried (then no read is needed)."""
        self._subscriptions: list[Subscription] = []

    @classmethod
    async def start(cls, nc: Client, task_id: str, user: str) -> TerminalWaiter:
        """Subscribed: start it before the task can end (before publishing), or pass
        ``read_first`` to :meth:`wait`."""
        waiter = cls(task_id, user)
        waiter._subscriptions = [
            await nc.subscribe(names.folded_subject(task_id), cb=waiter._on_folded),
            *[
                await nc.subscribe(names.event_subject(task_id, kind), cb=waiter._on_event)
                for kind in TERMINAL_KINDS
            ],
        ]
        return waiter

    async def _on_folded(self, message: Msg) -> None:
        with contextlib.suppress(msgspec.DecodeError):  # an empty notice: read it
            self._document = folded_document(decode_folded(message.data), self.task_id, self.user)
        self._folded = True
        self._wake.set()

    async def _on_event(self, message: Msg) -> None:
        try:
            event = decode_event(message.data)
        except msgspec.DecodeError:
            return
        if isinstance(event, TaskSucceeded | TaskFailed | TaskCancelled):
            self._heard = True
            self._wake.set()

    async def wait(
        self, tasks: TaskStore, timeout_s: float, *, read_first: bool = False
    ) -> Document | None:
        """The terminal task document, or None when ``timeout_s`` passes first.
        ``read_first``: the task may have ended before :meth:`start`."""
        deadline = time.monotonic() + timeout_s
        pause = FOLD_POLL_S[0]
        read = read_first
        while True:
            if read:
                self._folded = False
                document = self._document or await tasks.get(self.task_id, self.user)
                if document is not None and TaskStatus(document["status"]).terminal:
                    return document
            if (left := deadline - time.monotonic()) <= 0:
                return None
            # Wait for the sink's notice; once the terminal event is heard, only for
            # `pause` (growing) before reading anyway; otherwise RECHECK_S at most.
            self._wake.clear()
            woke = False
            if not self._folded:
                with contextlib.suppress(TimeoutError):
                    timeout = min(left, pause if self._heard else RECHECK_S)
                    woke = await asyncio.wait_for(self._wake.wait(), timeout)
            if self._folded or not woke:
                read = True
                if self._heard and not self._folded:
                    pause = min(pause * 2, FOLD_POLL_S[1])
            else:  # the terminal event, just now: the notice follows in a moment
                read = False

    async def close(self) -> None:
        for subscription in self._subscriptions:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()


def _sse_frame(event_name: str, data: dict[str, Any], event_id: int | None = None) -> bytes:
    lines = [f"event: {event_name}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append("data: " + msgspec.json.encode(data).decode())
    return ("\n".join(lines) + "\n\n").encode()


def _terminal_from_document(document: Document) -> dict[str, Any]:
    return {
        "kind": document["status"],
        "task_id": shown_task_id(document),
        "images": document["images"],
        "message": document["message"],
    }


async def task_events(request: web.Request) -> web.StreamResponse:
    """``GET /tasks/{task_id}/events``: progress then the terminal event, as SSE."""
    res = resources(request)
    user = await caller(request, res)
    asked = request.match_info["task_id"]
    document = await res.tasks.get(asked, user)
    if document is None:
        raise ApiError(404, "task_not_found", f"task {asked!r} not found")
    task_id, shown = document["_id"], shown_task_id(document)
    if (refused := res.streams.take(user)) is not None:
        raise too_many("too_many_streams", refused, 5)
    try:
        return await _stream_events(request, res, user, task_id, shown)
    finally:
        res.streams.give_back(user)


async def _stream_events(
    request: web.Request, res: Resources, user: str, task_id: str, shown: str
) -> web.StreamResponse:
    last_id = request.headers.get("Last-Event-ID", "")
    config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    if last_id:
        # Event ids are stream sequences: resume right after the last one received.
        after = bounded_int(last_id, "Last-Event-ID", 0, MAX_EVENT_ID)
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after + 1
        )
    subscription = await res.js.subscribe(
        names.task_events_filter(task_id),
        stream=names.EVENT_STREAM,
        ordered_consumer=True,
        config=config,
    )
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    try:
        while True:
            try:
                message = await subscription.next_msg(timeout=RECHECK_S)
            except TimeoutError:  # nats raises its own subclass or the builtin, by code path
                # Quiet: keep the connection alive, and finish from MongoDB if the task
                # ended while its events were already gone from the stream.
                latest = await res.tasks.get(task_id, user)
                if latest is not None and TaskStatus(latest["status"]).terminal:
                    frame = _terminal_from_document(latest)
                    await response.write(_sse_frame(latest["status"], frame))
                    break
                await response.write(b": keep-alive\n\n")
                continue
            try:
                event: TaskEvent = decode_event(message.data)
            except msgspec.DecodeError:
                continue
            sequence = message.metadata.sequence.stream
            data = event_to_builtins(event) | {"task_id": shown}  # as the client knows it
            await response.write(_sse_frame(event_kind(event), data, sequence))
            if isinstance(event, TaskSucceeded | TaskFailed | TaskCancelled):
                break
    except ConnectionResetError:
        pass  # the client went away
    finally:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()
    return response
