"""The reconciler: no task stays ``waiting`` or ``running`` because a message went missing.

The gateway inserts a task document (with the encoded command) and then publishes the
command; once JetStream has it, the gateway records its stream sequence on the
document. A crash, a NATS outage or a timeout between the two leaves a document with
no sequence. Every ``interval_s`` the reconciler looks at open tasks older than
``grace_s``:

- no stream sequence: the publish was never confirmed. If a worker has reported on the
  task, it did land; otherwise the command is published again with the same
  ``Nats-Msg-Id``, so a publish that landed but is still queued is not duplicated;
- a stream sequence whose message is gone (acked, purged, lost with a server's disk)
  while the task is still open after ``lost_after_s``: no worker can ever finish it, so
  it ends ``failed`` with the reason (a worker acks only after its terminal event is
  stored, so a live task's message is never gone for long).

Both outcomes go through the bus like every other change, so the sink, SSE clients and
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

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from proto import names
from proto.codec import decode_generate
from proto.events import TaskFailed
from services.common import bus
from services.storage.tasks import OPEN_STATUSES, TaskStore

log = logging.getLogger(__name__)
EVIDENCE = ("started", "succeeded", "failed", "cancelled")
"""Events only a worker (or a terminal decision) publishes: the task was delivered."""
LANDED = -1
"""``stream_seq`` of a task whose publish landed (a worker reported on it) at an
unknown sequence."""


@dataclass
class Reconciled:
    republished: int = 0
    failed: int = 0


async def reconcile_once(
    js: JetStreamContext, tasks: TaskStore, *, grace_s: float, lost_after_s: float
) -> Reconciled:
    now = dt.datetime.now(dt.UTC)
    outcome = Reconciled()
    query = {
        "status": {"$in": OPEN_STATUSES},
        "created_at": {"$lt": now - dt.timedelta(seconds=grace_s)},
    }
    projection = {"command": 1, "stream_seq": 1, "created_at": 1, "attempt": 1}
    async for task in tasks.collection.find(query, projection):
        task_id = task["_id"]
        seq = task.get("stream_seq")
        if seq is None:
            command = task.get("command")
            if command is None:
                continue  # written by a version that kept no command: nothing to resend
            if task.get("attempt") or await bus.has_event(js, task_id, EVIDENCE):
                # A worker has taken it: the publish landed though nobody recorded it.
                # (Resending now could run it twice: JetStream forgets the message id of
                # an acked work-queue message when the server restarts.)
                await tasks.set_stream_seq(task_id, LANDED)
                continue
            ack = await js.publish(
                names.task_subject(decode_generate(command).model_key),
                bytes(command),
                stream=names.TASK_STREAM,
                headers={names.MSG_ID_HEADER: task_id},
            )
            await tasks.set_stream_seq(task_id, ack.seq)
            log.warning(
                "task %s: publish was never confirmed, %s (seq %d)",
                task_id,
                "it had landed" if ack.duplicate else "published again",
                ack.seq,
            )
            outcome.republished += 0 if ack.duplicate else 1
            continue
        age = (now - _aware(task["created_at"])).total_seconds()
        if age < lost_after_s or seq == LANDED:
            continue
        try:
            await js.get_msg(names.TASK_STREAM, seq)
        except NotFoundError:
            await _fail_lost(js, task_id, int(task.get("attempt") or 0))
            outcome.failed += 1
    return outcome


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


async def _fail_lost(js: JetStreamContext, task_id: str, attempt: int) -> None:
    event = TaskFailed(
        task_id=task_id,
        attempt=attempt,
        at=time.time(),
        worker="reconciler",
        code="task_lost",
        message="the task's queued message was lost (a NATS server lost its data?) and no"
        " worker holds it; submit it again",
    )
    await bus.publish_event(js, event, f"{task_id}.failed.lost")
    log.error("task %s: its message is gone and it never finished; failed", task_id)


async def run_reconciler(
    js: JetStreamContext,
    tasks: TaskStore,
    stop: asyncio.Event,
    *,
    interval_s: float,
    grace_s: float,
    lost_after_s: float,
) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
        if stop.is_set():
            return
        try:
            done = await reconcile_once(js, tasks, grace_s=grace_s, lost_after_s=lost_after_s)
        except NatsError as exc:  # NATS down: the next round tries again
            log.warning("reconciler: %s", exc)
            continue
        if done.republished or done.failed:
            log.warning(
                "reconciler: %d republished, %d failed as lost", done.republished, done.failed
            )
