"""The event sink: folds ``sd.event.>`` into task documents.

A durable pull consumer (``storage``) on ``SD_EVENTS``; the fold is idempotent
(:meth:`TaskStore.apply`), so redelivery after a crash, several sink replicas and
duplicate events are all harmless. Ack comes after the MongoDB write. Once a terminal
event is in, a core-NATS notice on ``sd.folded.<task_id>`` tells a sync request waiting
for the task that its document is final.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TypeGuard

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from pymongo.errors import PyMongoError

from proto import names
from proto.events import (
    TaskCancelled,
    TaskEvent,
    TaskFailed,
    TaskProgressed,
    TaskStarted,
    TaskSucceeded,
    decode_event,
)
from proto.notices import TaskFolded, encode_folded
from services.common import consumer
from services.storage.tasks import Ended, Ends, TaskStore, keep_books, progress_order

log = logging.getLogger(__name__)
BATCH = 64
FETCH_TIMEOUT_S = 1.0
"""How long one fetch waits for events before the loop looks at ``stop`` again."""
RETRY_S = 1.0
"""How soon an event that could not be folded (MongoDB down or failing over) comes back."""
LINGER_S = 0.2
"""How long a task's start and progress events wait for more before they are folded: a
task's steps then cost one write, not one each (a batch of tasks sends one event per task
per step), its start rides on the write of its latest step (``_starts_riding``), and
what its end catches up with rides on the end's write (``_riders``): a short task costs
one write of its document. They wait across fetches (:class:`_Waiting`): other tasks'
ends, which are folded at once, do not cut the wait short. A skip marker is folded at
once."""
MIN_WAIT_S = 0.005
"""A fetch waits at least this long (a shorter one is all overhead)."""
BOOKS_AFTER_S = 0.005
"""How long after its notices the bookkeeping of ended tasks (a read for the metrics,
the owners' open-task counts one down) is done (:class:`_LaterBooks`): the answers to
sync requests go out first (measured with ``bench/system_overhead.py``: the notice
reached the waiter 0.35 ms after it was sent, not 1.3 ms, when the count write did not
follow it at once; 0.4 ms, not 1.5, when the read did not), and several fetches' ends
share one read and one write."""


class _LaterBooks:
    """The bookkeeping of tasks that ended (``keep_books``), done together ``after_s``
    after the first of them is handed over, off the path of the notices. A sink that
    dies first leaves the counts too high, as a sink dying between a fold and its count
    always could: the quota recounts a count that reaches its limit."""

    def __init__(self, tasks: TaskStore, after_s: float) -> None:
        self.tasks, self.after_s = tasks, after_s
        self._pending: list[Ended] = []
        self._writer: asyncio.Task[None] | None = None

    def add(self, ended: list[Ended]) -> None:
        self._pending += ended
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())

    async def _write(self) -> None:
        await asyncio.sleep(self.after_s)
        while self._pending:
            ended, self._pending = self._pending, []
            try:
                await keep_books(self.tasks, ended)
            except PyMongoError as exc:
                log.warning("ended tasks' bookkeeping failed (owners' counts recount): %s", exc)

    async def close(self) -> None:
        """What is handed over is done (or failed) before this returns."""
        if self._writer is not None:
            await self._writer


def sink_consumer_config() -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=names.STORAGE_CONSUMER,
        filter_subject=names.EVENT_SUBJECTS,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=30,
        max_ack_pending=10_000,
    )


def _rank(event: TaskProgressed) -> tuple[int, bool]:
    """Which of a task's progress events the fold keeps: the highest order, a skip marker
    winning a tie."""
    return progress_order(event.attempt, event.job_no, event.step), event.skipped


def _superseded(events: list[tuple[Msg, TaskEvent]]) -> set[int]:
    """Progress events of one fetch that the fold would overwrite anyway: per task, only
    the one it keeps (highest order, a skip marker winning a tie) needs a write; a batch
    of tasks sends one progress event per task per step. A skip marker is written even
    when the next job's steps came with it: progress says ``skipped`` until those are
    shown, and they wait for company (:class:`_Waiting`)."""
    kept: dict[str, tuple[tuple[int, bool], int, TaskProgressed]] = {}
    for index, (_, event) in enumerate(events):
        if isinstance(event, TaskProgressed):
            rank = _rank(event)
            if event.task_id not in kept or rank >= kept[event.task_id][0]:
                kept[event.task_id] = (rank, index, event)
    return {
        id(message)
        for index, (message, event) in enumerate(events)
        if isinstance(event, TaskProgressed)
        and kept[event.task_id][1] != index
        and not (event.skipped and event.job_no < kept[event.task_id][2].job_no)
    }


def _with_previews(
    events: list[tuple[Msg, TaskEvent | None]],
) -> list[tuple[Msg, TaskEvent | None]]:
    """A step that rendered a preview may be superseded in its fetch by a later one that
    did not: the one folded says the preview exists (its object key is the task's own)."""
    previews = {
        (e.task_id, e.attempt): e.preview_key
        for _, e in events
        if isinstance(e, TaskProgressed) and e.preview_key is not None
    }
    if not previews:
        return events
    return [
        (m, msgspec.structs.replace(e, preview_key=previews[e.task_id, e.attempt]))
        if isinstance(e, TaskProgressed)
        and e.preview_key is None
        and (e.task_id, e.attempt) in previews
        else (m, e)
        for m, e in events
    ]


def _riders(events: list[tuple[Msg, TaskEvent]]) -> dict[int, list[tuple[Msg, TaskEvent]]]:
    """Per terminal event of this fetch, the same attempt's ``started`` and progress
    events that came before it: they are folded with it in one write (``TaskStore.finish``)
    instead of one each, and are settled as it is."""
    riding: dict[int, list[tuple[Msg, TaskEvent]]] = {}
    for index, (message, event) in enumerate(events):
        if not isinstance(event, TaskSucceeded | TaskFailed | TaskCancelled):
            continue
        riding[id(message)] = [
            (m, e)
            for m, e in events[:index]
            if isinstance(e, TaskStarted | TaskProgressed)
            and (e.task_id, e.attempt) == (event.task_id, event.attempt)
        ]
    return riding


def _waits(event: TaskEvent | None) -> TypeGuard[TaskStarted | TaskProgressed]:
    """Whether ``event`` waits for company (:class:`_Waiting`): a start or a step does,
    an end and A1111's skip marker are folded at once."""
    return isinstance(event, TaskStarted) or (
        isinstance(event, TaskProgressed) and not event.skipped
    )


def _starts_riding(
    events: list[tuple[Msg, TaskEvent]], superseded: set[int], carried: set[int], over: set[str]
) -> dict[int, list[tuple[Msg, TaskEvent]]]:
    """Per progress event written now (a skip marker, or the step kept of a task whose
    wait is over), the same attempt's start that waited with it: folded with it in one
    write (``TaskStore.begin``). A start never waits behind a step of its attempt that is
    written without it: one-by-one, the start would have come first."""
    starts = {
        (e.task_id, e.attempt): (m, e)
        for m, e in events
        if isinstance(e, TaskStarted) and id(m) not in carried
    }
    riding: dict[int, list[tuple[Msg, TaskEvent]]] = {}
    for message, event in events:
        if (
            isinstance(event, TaskProgressed)
            and id(message) not in carried | superseded
            and (not _waits(event) or event.task_id in over)
            and (start := starts.pop((event.task_id, event.attempt), None)) is not None
        ):
            riding[id(message)] = [start]
    return riding


class _Waiting:
    """Starts and progress events held back (unacked) for company, at most ``linger_s``
    per task: each fetch looks at them again beside what it brought (a newer step
    supersedes them, the task's end carries them), and the latest step is folded, with
    the start, once its task's wait is over."""

    def __init__(self, linger_s: float) -> None:
        self.linger_s = linger_s
        self.events: list[tuple[Msg, TaskEvent | None]] = []
        self._since: dict[str, float] = {}
        """Per task, when its first progress event still waiting was held."""

    def take(self) -> list[tuple[Msg, TaskEvent | None]]:
        events, self.events = self.events, []
        return events

    def hold(self, message: Msg, event: TaskStarted | TaskProgressed, now: float) -> bool:
        """Hold ``event`` back, unless its task's wait is over (then fold it now)."""
        since = self._since.setdefault(event.task_id, now)
        if now - since < self.linger_s:
            self.events.append((message, event))
            return True
        return False

    def over(self, now: float) -> set[str]:
        """The tasks whose wait is over: what they hold is folded now."""
        return {t for t, since in self._since.items() if now - since >= self.linger_s}

    def settled(self) -> None:
        """After a fetch: a task with nothing held waits afresh next time."""
        waiting = {e.task_id for _, e in self.events if e is not None}
        self._since = {t: since for t, since in self._since.items() if t in waiting}

    def timeout(self, longest: float) -> float:
        """How long the next fetch may wait: until the first wait is over."""
        if not self._since:
            return longest
        left = min(self._since.values()) + self.linger_s - time.monotonic()
        return max(min(longest, left), MIN_WAIT_S)


async def run_sink(
    nc: Client,
    tasks: TaskStore,
    stop: asyncio.Event,
    *,
    fetch_timeout_s: float = FETCH_TIMEOUT_S,
    retry_s: float = RETRY_S,
    linger_s: float = LINGER_S,
) -> None:
    subscription = await consumer.Puller.durable(
        nc,
        names.EVENT_SUBJECTS,
        durable=names.STORAGE_CONSUMER,
        stream=names.EVENT_STREAM,
        config=sink_consumer_config(),
    )

    async def fold(
        message: Msg,
        event: TaskEvent | None,
        superseded: set[int],
        riders: list[TaskEvent],
        ends: Ends,
    ) -> None:
        if event is None:
            raise consumer.Poison("undecodable event")  # no retry can ever decode it
        if id(message) in superseded:
            return  # a later progress event of the same fetch covers it
        started = next((e for e in riders if isinstance(e, TaskStarted)), None)
        try:
            if isinstance(event, TaskProgressed) and started is not None:
                await tasks.begin(started, event)
            elif isinstance(event, TaskSucceeded | TaskFailed | TaskCancelled):
                steps = [e for e in riders if isinstance(e, TaskProgressed)]
                last = max(steps, key=_rank, default=None)

                async def announce(notice: TaskFolded) -> None:
                    await nc.publish(names.folded_subject(notice.task_id), encode_folded(notice))

                msg_id = (message.headers or {}).get(names.MSG_ID_HEADER)
                await tasks.finish(
                    event,
                    started,
                    last,
                    written=announce,
                    worker_end=msg_id == names.end_msg_id(event.task_id),
                    ends=ends,
                )
            else:
                await tasks.apply(event)
        except PyMongoError as exc:
            # MongoDB is down or failing over: keep the event, retry it shortly.
            raise consumer.Retry(retry_s, f"cannot fold yet: {exc}") from exc

    folded = 0
    waiting = _Waiting(linger_s)
    books = _LaterBooks(tasks, BOOKS_AFTER_S)
    try:
        batches = consumer.batches(
            subscription,
            stop,
            consumer.fixed(BATCH),
            timeout_s=lambda: waiting.timeout(fetch_timeout_s),
            idle=True,  # an empty fetch ends the waits that are over
        )
        async for messages in batches:
            now = time.monotonic()
            fetched = [(message, _decoded(message)) for message in messages]
            events = _with_previews(waiting.take() + fetched)
            decoded = [(m, e) for m, e in events if e is not None]
            superseded = _superseded(decoded)
            riding = _riders(decoded)
            carried = {id(m) for ms in riding.values() for m, _ in ms}
            riding |= _starts_riding(decoded, superseded, carried, waiting.over(now))
            carried = {id(m) for ms in riding.values() for m, _ in ms}
            ends = Ends(tasks, books.add)
            for message, event in events:
                if id(message) in carried:
                    continue  # folded with its task's end or step, settled beside it
                if (
                    _waits(event)
                    and id(message) not in superseded
                    and waiting.hold(message, event, now)
                ):
                    continue
                riders = riding.get(id(message), [])
                acked = await consumer.settle(
                    message, fold(message, event, superseded, [e for _, e in riders], ends)
                )
                folded += acked
                for rider, _ in riders:  # as the event they rode on went
                    with contextlib.suppress(Exception):
                        await (rider.ack() if acked else rider.nak(delay=retry_s))
                    folded += acked
            waiting.settled()
            try:
                await ends.settle()
            except PyMongoError as exc:  # the waiters were told all the same, unread
                log.warning("ended tasks' documents not read back: %s", exc)
    finally:
        for message, _ in waiting.take():  # another sink (or the next start) folds them
            with contextlib.suppress(Exception):
                await message.nak()
        await books.close()
        log.info("event sink stopped after folding %d events", folded)


def _decoded(message: Msg) -> TaskEvent | None:
    try:
        return decode_event(message.data)
    except msgspec.DecodeError:
        return None
