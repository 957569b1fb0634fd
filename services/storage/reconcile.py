"""The reconciler: no task stays ``waiting`` or ``running`` because a message went missing.

The gateway inserts a task document (with the encoded command) and then publishes the
command; once JetStream has it, its stream sequence is recorded on the document: by the
worker's start (``TaskStarted.stream_seq``), else by the gateway within
``STREAM_SEQ_LINGER_S`` (grouped, with no request waiting). A crash, a NATS
outage or a timeout between the two leaves a document with no sequence. Every
``interval_s`` the reconciler looks at open tasks older than ``grace_s``:

- no stream sequence: the publish was never confirmed. If a worker has reported on the
  task, it did land; otherwise the command is published again with the same
  ``Nats-Msg-Id``, so a publish that landed but is still queued is not duplicated;
- a command that can never be published (larger than the server's max payload, not
  decodable) ends the task ``failed`` (``unpublishable``) with the reason;
- a stream sequence whose message is gone (acked, purged, lost with a server's disk)
  while the task is still open after ``lost_after_s``: no worker can ever finish it, so
  it ends ``failed`` with the reason (a worker acks only after its terminal event is
  stored, so a live task's message is never gone for long).

Each task is handled on its own: one task's error never stops the pass for the others.
Every outcome goes through the bus like every other change, so the sink, SSE clients and
sync waiters all see them; the fold's attempt fence keeps a late worker's result if one
does arrive first.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from dataclasses import dataclass

import msgspec
from nats.errors import Error as NatsError
from nats.errors import MaxPayloadError
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import APIError, NotFoundError

from proto import names
from proto.codec import decode_generate
from proto.events import TERMINAL_KINDS, TaskFailed
from services.common import bus
from services.storage.mongo import Document
from services.storage.tasks import TaskStore

log = logging.getLogger(__name__)
EVIDENCE = ("started", *TERMINAL_KINDS)
"""Events only a worker (or a terminal decision) publishes: the task was delivered."""
LANDED = -1
"""``stream_seq`` of a task whose publish landed (a worker reported on it) at an
unknown sequence."""


@dataclass
class Reconciled:
    republished: int = 0
    failed: int = 0
    """Failed as lost, or as unpublishable."""
    skipped: int = 0
    """Left for the next pass after a passing error (a timeout, a full stream)."""


UNPUBLISHABLE_ERR_CODES = frozenset({10054})
"""JetStream error codes that no retry can cure: 10054 = the message is larger than the
stream's ``max_msg_size``. Anything else (a full stream, a timeout) may pass."""


class _Unpublishable(Exception):
    """This task's command can never be queued; the message says why."""


async def reconcile_once(
    js: JetStreamContext,
    tasks: TaskStore,
    *,
    grace_s: float,
    lost_after_s: float,
    max_errors: int = 3,
) -> Reconciled:
    """One pass over the open tasks. Each task is handled on its own: one whose command
    can never be published ends ``failed`` with the reason, one that meets a passing
    error is skipped until the next pass, and neither stops the pass for the others.
    Only ``max_errors`` passing errors in a row (NATS itself is away) end it early."""
    now = dt.datetime.now(dt.UTC)
    outcome = Reconciled()
    before = now - dt.timedelta(seconds=grace_s)
    errors_in_a_row = 0
    async for task in tasks.open_before(before, "command", "stream_seq", "created_at", "attempt"):
        task_id = task["_id"]
        try:
            try:
                await _reconcile_task(js, tasks, task, now, lost_after_s, outcome)
            except _Unpublishable as exc:
                attempt = int(task.get("attempt") or 0)
                await _fail(js, task_id, attempt, "unpublishable", str(exc))
                outcome.failed += 1
        except (NatsError, TimeoutError) as exc:
            outcome.skipped += 1
            errors_in_a_row += 1
            log.warning("reconciler: task %s left for the next pass: %r", task_id, exc)
            if errors_in_a_row >= max_errors:
                raise
            continue
        errors_in_a_row = 0
    return outcome


async def _reconcile_task(
    js: JetStreamContext,
    tasks: TaskStore,
    task: Document,
    now: dt.datetime,
    lost_after_s: float,
    outcome: Reconciled,
) -> None:
    task_id = task["_id"]
    seq = task.get("stream_seq")
    if seq is None:
        command = task.get("command")
        if command is None:
            return  # written by a version that kept no command: nothing to resend
        if task.get("attempt") or await bus.has_event(js, task_id, EVIDENCE):
            # A worker has taken it: the publish landed though nobody recorded it.
            # (Resending now could run it twice: JetStream forgets the message id of
            # an acked work-queue message when the server restarts.)
            await tasks.set_stream_seq(task_id, LANDED)
            return
        ack = await _publish(js, task_id, bytes(command))
        await tasks.set_stream_seq(task_id, ack.seq)
        log.warning(
            "task %s: publish was never confirmed, %s (seq %d)",
            task_id,
            "it had landed" if ack.duplicate else "published again",
            ack.seq,
            extra={"task_id": task_id},
        )
        outcome.republished += 0 if ack.duplicate else 1
        return
    age = (now - _aware(task["created_at"])).total_seconds()
    if age < lost_after_s or seq == LANDED:
        return
    try:
        await js.get_msg(names.TASK_STREAM, seq)
    except NotFoundError:
        await _fail(js, task_id, int(task.get("attempt") or 0), "task_lost", LOST)
        log.error("task %s: its message is gone and it never finished; failed", task_id)
        outcome.failed += 1


async def _publish(js: JetStreamContext, task_id: str, command: bytes) -> PubAck:
    """Publish a stored command again; :class:`_Unpublishable` when it never can be."""
    try:
        model_key = decode_generate(command).model_key
    except msgspec.MsgspecError as exc:
        raise _Unpublishable(f"the stored command cannot be decoded: {exc}") from exc
    try:
        return await js.publish(
            names.task_subject(model_key),
            command,
            stream=names.TASK_STREAM,
            headers={names.MSG_ID_HEADER: task_id},
        )
    except MaxPayloadError as exc:
        raise _Unpublishable(
            f"the task's command ({len(command)} bytes) is larger than the NATS server"
            " accepts in one message; submit it again with less text"
        ) from exc
    except APIError as exc:
        if exc.err_code not in UNPUBLISHABLE_ERR_CODES:
            raise
        raise _Unpublishable(
            f"JetStream refuses the task's command ({len(command)} bytes): {exc.description}"
        ) from exc


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


LOST = (
    "the task's queued message was lost (a NATS server lost its data?) and no worker"
    " holds it; submit it again"
)


async def _fail(js: JetStreamContext, task_id: str, attempt: int, code: str, why: str) -> None:
    event = TaskFailed(
        task_id=task_id,
        attempt=attempt,
        at=time.time(),
        worker="reconciler",
        code=code,
        message=why,
    )
    await bus.publish_event(js, event, f"{task_id}.failed.{code}")
    if code != "task_lost":
        log.error("task %s: failed, %s", task_id, why, extra={"task_id": task_id})


async def run_reconciler(
    js: JetStreamContext,
    tasks: TaskStore,
    stop: asyncio.Event,
    *,
    interval_s: float,
    grace_s: float,
    lost_after_s: float,
    max_errors: int = 3,
) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
        if stop.is_set():
            return
        try:
            done = await reconcile_once(
                js, tasks, grace_s=grace_s, lost_after_s=lost_after_s, max_errors=max_errors
            )
        except (NatsError, TimeoutError) as exc:  # NATS down: the next round tries again
            log.warning("reconciler: pass ended early: %r", exc)
            continue
        if done.republished or done.failed or done.skipped:
            log.warning(
                "reconciler: %d republished, %d failed, %d left for the next pass",
                done.republished,
                done.failed,
                done.skipped,
            )
