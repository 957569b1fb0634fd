"""Waiting for a task to end (sync requests) and following it live (SSE).

Both read ``sd.event.<task_id>.>``. Sync requests use a core-NATS subscription made
before publishing (events reach core subscribers as they are stored) to learn that the
task ended, fold that terminal event into the task document themselves (the fold is
idempotent: the sink's fold of the same event then changes nothing) and answer from the
document, so ``GET /tasks/{id}/result`` agrees with every sync answer and the answer does
not wait for the sink to reach the event. MongoDB is also re-read periodically, so an
event missed during a reconnect only delays the answer.
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
from pymongo.errors import PyMongoError

from proto import TaskStatus, names
from proto.events import (
    TaskCancelled,
    TaskEvent,
    TaskFailed,
    TaskSucceeded,
    decode_event,
    event_kind,
    event_to_builtins,
)
from services.gateway.auth import caller
from services.gateway.errors import ApiError, too_many
from services.gateway.resources import Resources, resources
from services.gateway.validation import bounded_int
from services.storage.mongo import Document
from services.storage.tasks import TaskStore, shown_task_id

MAX_EVENT_ID = 2**53 - 1
"""Event ids are JetStream sequences (uint64); a client's ``Last-Event-ID`` is at most
this (exact in every JSON client), so ``+ 1`` stays a valid start sequence."""

RECHECK_S = 5.0
"""How often a waiter re-reads MongoDB in case an event was missed."""


FOLD_POLL_S = (0.005, 0.1)
"""When folding the terminal event here failed (MongoDB busy): first and longest pause
between reads of the task document while the sink folds it in (the pause doubles)."""


class TerminalWaiter:
    """Waits until a task's document is terminal: what ``GET /tasks/{id}/result`` reads.

    The terminal event (core NATS, subscribed before publishing) is folded in here, as
    the sink would; the answer is the document, so a sync answer never runs ahead of the
    result route.
    """

    def __init__(self, task_id: str, user: str) -> None:
        self.task_id = task_id
        # Every read is scoped to the caller: a task id alone never reveals a task.
        self.user = user
        self._heard = asyncio.Event()
        self._terminal: TaskSucceeded | TaskFailed | TaskCancelled | None = None
        self._subscription: Subscription | None = None

    @classmethod
    async def start(cls, nc: Client, task_id: str, user: str) -> TerminalWaiter:
        waiter = cls(task_id, user)
        waiter._subscription = await nc.subscribe(
            names.task_events_filter(task_id), cb=waiter._on_message
        )
        return waiter

    async def _on_message(self, message: Msg) -> None:
        try:
            event = decode_event(message.data)
        except msgspec.DecodeError:
            return
        if isinstance(event, TaskSucceeded | TaskFailed | TaskCancelled):
            if event.task_id == self.task_id:
                self._terminal = event
            self._heard.set()

    async def wait(self, tasks: TaskStore, timeout_s: float) -> Document | None:
        """The terminal task document, or None when ``timeout_s`` passes first."""
        deadline = time.monotonic() + timeout_s
        pause = FOLD_POLL_S[0]
        folded = False
        while True:
            if self._terminal is not None and not folded:
                folded = True
                with contextlib.suppress(PyMongoError):  # then the sink's fold is awaited
                    await tasks.apply(self._terminal)
            document = await tasks.get(self.task_id, self.user)
            if document is not None and TaskStatus(document["status"]).terminal:
                return document
            if (left := deadline - time.monotonic()) <= 0:
                return None
            if not self._heard.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._heard.wait(), min(left, RECHECK_S))
            else:  # the event is out: the sink folds it in a moment
                await asyncio.sleep(min(pause, left))
                pause = min(pause * 2, FOLD_POLL_S[1])

    async def close(self) -> None:
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()


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
