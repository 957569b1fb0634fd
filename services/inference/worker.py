"""The worker: pulls its checkpoint's consumer and runs one task at a time.

This loop alone owns ack semantics; the pipeline raises typed errors:

- undecodable command → ``term`` (poison: no retry can help);
- cancelled before start or between steps → ``TaskCancelled``, ack;
- :class:`GenerationError` (bad request for this model) → ``TaskFailed``, ack;
- any other error → ``nak`` with a delay while deliveries remain, else ``TaskFailed``;
- success → upload images, ``TaskSucceeded``, then ack — ack is last, so a crash
  before it means redelivery, never loss.

Every progress step publishes ``TaskProgressed`` and sends an in-progress ack, so a
hung kernel stops the in-progress acks and the task is redelivered after ``ack_wait``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from proto import GenerateImage, names
from proto.codec import SchemaTooNewError, command_task_id, decode_generate, encode
from proto.commands import ExtrasTask
from proto.events import (
    TERMINAL_KINDS,
    TaskCancelled,
    TaskEvent,
    TaskFailed,
    TaskProgressed,
    TaskStarted,
    TaskSucceeded,
    event_kind,
)
from proto.workers import CompileStatus, WorkerState, WorkerStatus
from services.common import bus, consumer, logs, metrics
from services.inference import batching
from services.inference.coldstart import Phases
from services.inference.identity import FileIdentity, file_identity
from services.inference.pipeline import (
    Generation,
    GenerationError,
    Pipeline,
    TaskCancelledError,
)
from services.inference.presentation import info_json
from services.inference.settings import WorkerSettings
from services.storage.objects import ObjectNotFoundError, ObjectStore

log = logging.getLogger(__name__)
NAK_DELAY_S = 2.0
TOP_UP_S = 0.005
"""How long a batch fetched ahead waits for more when it is about to run: only what is
queued already comes (``Worker._top_up``)."""
IN_PROGRESS_EVERY_S = 1.0
"""In-progress acks of a running task at most this often (a tenth of ``ack_wait`` if that
is less): one per step cost the pipeline thread time on fast steps."""
REPORT_EVERY_S = 0.05
"""How often the event loop collects a running task's steps from the pipeline thread
(:class:`_Reporter`). A hand-over per step woke the loop while the pipeline thread ran
Python, and each wake cost that thread about 0.3 ms of the interpreter (tiny model,
CPU, 30 steps: 222 → 231 ms a call, ``bench/system_overhead.py`` 1.07× → 1.16× with the
events published); collected on a timer, 1 ms in all. Each step is still published,
stamped with its own time, at most this much later."""
HEARTBEAT_S = 5.0
"""Liveness record refresh (well inside the bucket's TTL). Never used to ack tasks."""


CHECKPOINT_WATCH_S = 2.0
STICKY_CUDA_ERRORS = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "CUBLAS_STATUS_EXECUTION_FAILED",
    "uncorrectable ECC error",
)
"""CUDA errors after which the context is unusable (unlike out-of-memory)."""


class _Memory(TypedDict, total=False):
    rss_bytes: int
    cuda_free_bytes: int
    cuda_total_bytes: int
    cuda_allocated_bytes: int


def _memory() -> _Memory:
    """This process's resident memory and, when torch runs on CUDA, its device's."""
    out: _Memory = {}
    with contextlib.suppress(OSError, ValueError, IndexError):
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        out["rss_bytes"] = pages * os.sysconf("SC_PAGE_SIZE")
    torch = sys.modules.get("torch")  # never imported just for this
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        with contextlib.suppress(RuntimeError):
            free, total = torch.cuda.mem_get_info()
            out["cuda_free_bytes"] = int(free)
            out["cuda_total_bytes"] = int(total)
            out["cuda_allocated_bytes"] = int(torch.cuda.memory_allocated())
    return out


def _take(flag: threading.Event) -> bool:
    """True once per set(): each skip ends one job."""
    if flag.is_set():
        flag.clear()
        return True
    return False


def sticky_cuda_error(exc: BaseException) -> bool:
    text = str(exc)
    return ("CUDA" in text or "CUBLAS" in text) and any(m in text for m in STICKY_CUDA_ERRORS)


class _Origin(TypedDict):
    """Fields every event of one delivery attempt shares."""

    task_id: str
    attempt: int
    worker: str


class Progress(msgspec.Struct, frozen=True):
    job_no: int
    step: int
    total_steps: int
    preview: bytes | None = None
    skipped: bool = False
    """A1111's skip ended this job after ``step``."""
    at: float = 0.0
    """When the pipeline thread reported it (seconds since the epoch)."""


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        nc: Client,
        objects: ObjectStore,
        pipeline_factory: Callable[[], Pipeline],
        phases: Phases | None = None,
        *,
        checkpoint: FileIdentity | None = None,
    ) -> None:
        self.settings = settings
        self._checkpoint = checkpoint
        """The checkpoint file's identity when its hash was checked (identity.py), from
        before loading; None: read when the watch starts."""
        self.phases = phases
        """The cold start's phases, filled by ``pipeline_factory`` (coldstart.py)."""
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.objects = objects
        self._factory = pipeline_factory
        self._pipeline: Pipeline | None = None
        self._load_error: GenerationError | None = None
        self._cancels: KeyValue | None = None
        self._workers: KeyValue | None = None
        self._state = WorkerState.LOADING
        self._task_ids: list[str] = []
        self._outputs: set[asyncio.Task[None]] = set()
        """Finished tasks whose images are being encoded and stored (beside the GPU)."""
        self._finishing: dict[str, asyncio.Task[None]] = {}
        """Outputs in flight by task id: a redelivery of one of them waits for it."""
        self._upcoming: asyncio.Task[tuple[int, list[_Held]] | None] | None = None
        """The next batch, fetched and admitted while this one runs."""
        self._returning: asyncio.Task[None] | None = None
        """Handing back the next batch (the worker stops); tasks interrupted by the stop
        go back after it, see :meth:`_hand_back_on_stop`."""
        self._beating: asyncio.Task[None] | None = None
        self._beat_stale = False
        """The state changed while a liveness write was under way: write it again."""
        self._last_step_at: float | None = None
        self._load_seconds: float | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.completed = 0
        self.fatal = False
        """Set after a sticky CUDA error: the process must exit non-zero and be replaced."""

    async def _beat(self) -> None:
        """Write this worker's liveness record (state, current task, last step)."""
        if self._workers is None:
            return
        status = WorkerStatus(
            worker=self.settings.worker_id,
            model_key=self.settings.model_key,
            model_name=self.settings.model_name,
            state=self._state,
            device=self.settings.device,
            pid=os.getpid(),
            task_id=self._task_ids[0] if self._task_ids else None,
            task_ids=self._task_ids,
            error=self._load_error.message if self._load_error else None,
            last_step_at=self._last_step_at,
            updated_at=time.time(),
            load_seconds=self._load_seconds,
            load_phases=self.phases.seconds() if self.phases else {},
            weights_cached=self.phases.weights_cached if self.phases else None,
            metrics_address=metrics.listening_at(),
            compile=self._compile_status(),
            **_memory(),
        )
        try:
            await self._workers.put(names.worker_kv_key(self.settings.worker_id), encode(status))
        except Exception as exc:  # liveness must never take a task down with it
            log.warning("cannot write the liveness record: %s", exc)

    def _compile_status(self) -> CompileStatus | None:
        """The compiled UNet's progress, from pipelines that compile one (DiffusersPipeline);
        not part of the Pipeline protocol."""
        read = getattr(self._pipeline, "compile_status", None)
        status: CompileStatus | None = read() if callable(read) else None
        if status is not None:
            metrics.worker_compile(self.settings.model_key, status)
        return status

    def _phases(self) -> dict[str, float] | None:
        return self.phases.seconds() if self.phases else None

    async def _set_state(self, state: WorkerState, task_ids: list[str] | None = None) -> None:
        self._note_state(state, task_ids)
        await self._beat()

    def _note_state(self, state: WorkerState, task_ids: list[str] | None = None) -> None:
        """The state between batches (busy, ready): its liveness write runs beside the
        work, never before it; writes that pile up collapse into one of the latest."""
        self._state, self._task_ids = state, task_ids or []
        metrics.worker_state(self.settings.model_key, state, len(self._task_ids), self._phases())
        if self._beating is not None and not self._beating.done():
            self._beat_stale = True
        else:
            self._beating = asyncio.create_task(self._beat_latest())

    async def _beat_latest(self) -> None:
        self._beat_stale = True
        while self._beat_stale:
            self._beat_stale = False
            await self._beat()

    async def _hand_back_on_stop(
        self, stop: asyncio.Event | None, stop_flags: list[threading.Event]
    ) -> bool:
        """When the worker is asked to stop mid-task, let the tasks finish within the grace
        period; past it, interrupt them (True) so they can be handed back. The batch
        fetched beside them goes back at once, and the interrupted tasks only after its
        fetch (this worker's last pull request) ended: they are then redelivered to
        another worker, not to this one (each delivery counts toward max_deliver)."""
        if stop is None:
            await asyncio.Event().wait()
            return False
        await stop.wait()
        if self._upcoming is not None and self._returning is None:
            self._returning = asyncio.create_task(self._hand_back(self._upcoming))
        await asyncio.sleep(self.settings.stop_grace_s)
        for flag in stop_flags:
            flag.set()
        return True

    async def _watch_parent(self, stop: asyncio.Event) -> None:
        """Stop (after the current task) once the process that started us is gone."""
        while not stop.is_set():
            if os.getppid() != self.settings.parent_pid:
                log.warning("the process that started this worker is gone; exiting")
                stop.set()
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    async def _watch_checkpoint(self, stop: asyncio.Event) -> None:
        """Stop (after the current task) once the checkpoint file is replaced or removed.

        A new upload of the same model is renamed over the old file: this worker still
        holds the old weights, so it steps down and the scheduler starts a fresh one.
        Queued tasks stay in the stream; a task in hand finishes or is handed back.
        """
        if not self.settings.checkpoint_path:
            return  # an extras worker has no checkpoint (Path("") would watch the cwd)
        path = Path(self.settings.checkpoint_path)
        loaded = self._checkpoint or await asyncio.to_thread(file_identity, path)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), CHECKPOINT_WATCH_S)
            if stop.is_set():
                return
            now = await asyncio.to_thread(file_identity, path)
            if now != loaded:
                log.warning("checkpoint %s was %s; exiting", path, "replaced" if now else "removed")
                stop.set()
                return

    async def _step_down_in_turn(self, stop: asyncio.Event) -> None:
        """A rolling restart: wait for this worker's turn in its pool, then stop after the
        current task (the scheduler starts a fresh worker; queued tasks wait in the stream)."""
        pool = sorted(
            record.worker
            for record in await bus.worker_records(self.js)
            if record.model_key == self.settings.model_key
        )
        turn = pool.index(self.settings.worker_id) if self.settings.worker_id in pool else 0
        log.info(
            "restart requested: stepping down in %.0f s", turn * self.settings.restart_stagger_s
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), turn * self.settings.restart_stagger_s)
        stop.set()

    async def _heartbeat(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), HEARTBEAT_S)
            await self._beat()

    async def run(self, stop: asyncio.Event) -> None:
        await bus.ensure_streams(self.js, self.settings)
        await bus.ensure_task_consumer(self.js, self.settings.model_key, self.settings)
        self._cancels = await bus.cancel_bucket(self.js, self.settings)
        self._workers = await bus.worker_bucket(self.js)
        heartbeat = asyncio.create_task(self._heartbeat(stop))
        if self.settings.parent_pid:
            self._watcher = asyncio.create_task(self._watch_parent(stop))
        checkpoint_watch = asyncio.create_task(self._watch_checkpoint(stop))
        stepping_down: list[asyncio.Task[None]] = []

        async def on_restart(_: Msg) -> None:
            if not stepping_down:
                stepping_down.append(asyncio.create_task(self._step_down_in_turn(stop)))

        restart_sub = await self.nc.subscribe(names.RESTART_SUBJECT, cb=on_restart)
        # Load before fetching: a warm worker is ready when its first task arrives, and
        # the registry can show the checkpoint as loading, loaded or failed.
        await self._set_state(WorkerState.LOADING)
        started = time.monotonic()
        with contextlib.suppress(GenerationError):
            await self._pipeline_or_error()
        self._load_seconds = round(time.monotonic() - started, 3)
        await self._set_state(WorkerState.FAILED if self._load_error else WorkerState.READY)
        subscription = consumer.Puller(
            self.nc, names.TASK_STREAM, names.consumer_name(self.settings.model_key)
        )
        log.info(
            "worker %s serving %s (loaded in %.2f s; from process start: %s)",
            self.settings.worker_id,
            self.settings.model_name,
            self._load_seconds,
            self.phases.seconds() if self.phases else "-",
        )
        idle_since = time.monotonic()

        async def room() -> int:
            await self._output_room()
            return max(self.settings.max_batch, 1)

        # Up to max_batch tasks: what is queued now, plus what arrives within the linger
        # (batch_wait_ms; 0 takes only what is queued): a lone task waits no longer.
        fetched = consumer.batches(
            subscription,
            stop,
            room,
            timeout_s=self.settings.fetch_timeout_s,
            linger_s=self.settings.batch_wait_ms / 1000,
            idle=True,
        )
        upcoming: asyncio.Task[tuple[int, list[_Held]] | None] | None = None
        ahead = False  # the next batch was in hand before the last one ended
        try:
            while True:
                if upcoming is None:
                    upcoming = asyncio.create_task(self._next_admitted(fetched))
                self._upcoming = upcoming
                got = await upcoming
                upcoming = self._upcoming = None
                if got is None:
                    break
                count, held = got
                if count:
                    if ahead:  # fetched before the last batch ended: what came since
                        held += await self._top_up(subscription, count)
                    # The next batch is fetched and admitted while this one runs: the
                    # GPU never waits for a fetch (the consumer lets it out once the
                    # batch before this one is stored and acked, see BATCHES_IN_FLIGHT).
                    upcoming = self._upcoming = asyncio.create_task(self._next_admitted(fetched))
                    await self._run_held(held, stop)
                    ahead = upcoming.done()
                    idle_since = time.monotonic()
                    if stop.is_set():
                        break  # what was fetched meanwhile goes back (finally)
                    continue
                idle = time.monotonic() - idle_since
                if self.settings.idle_exit_s and idle > self.settings.idle_exit_s:
                    log.info("idle for %.0f s, exiting", idle)
                    break
        finally:
            if upcoming is not None:
                await self._hand_back(upcoming)
            await fetched.aclose()
            await self.drain_outputs()
            log.info("worker stopping after %d tasks", self.completed)
            heartbeat.cancel()
            checkpoint_watch.cancel()
            for task in stepping_down:
                task.cancel()
            with contextlib.suppress(Exception):
                await restart_sub.unsubscribe()
            if self._beating is not None:  # a late liveness write must not outlive the delete
                self._beating.cancel()
                with contextlib.suppress(BaseException):
                    await self._beating
            with contextlib.suppress(Exception):
                await self._workers.delete(names.worker_kv_key(self.settings.worker_id))

    async def _pipeline_or_error(self) -> Pipeline:
        if self._load_error is not None:
            raise self._load_error
        if self._pipeline is None:
            try:
                self._pipeline = await asyncio.to_thread(self._factory)
            except GenerationError as exc:
                self._load_error = exc
                raise
        return self._pipeline

    async def _publish(self, event: TaskEvent, dedupe_suffix: str = "") -> None:
        kind = event_kind(event)
        if kind in TERMINAL_KINDS:  # one id per task (names.end_msg_id), not per attempt
            if not await bus.publish_end(self.js, event):
                # Another attempt ran it too (the bus handed the message out twice): its
                # end stands, and this attempt's message is acked all the same.
                log.warning("task %s attempt %d: ended already", event.task_id, event.attempt)
            return
        msg_id = _msg_id(event, dedupe_suffix)
        if isinstance(event, TaskProgressed):
            await bus.publish_unconfirmed(self.nc, event, msg_id)
        else:
            await bus.publish_event(self.js, event, msg_id)

    async def _refuse_newer(self, message: Msg, exc: SchemaTooNewError) -> None:
        """A command from a newer gateway than this worker knows: the task ends ``failed``
        saying so (code ``schema_unsupported``), rather than running half-understood."""
        try:
            task_id = command_task_id(message.data)
        except msgspec.DecodeError as error:
            await consumer.settle(message, _poison(f"undecodable command: {error}"))
            return
        log.error("task %s: %s", task_id, exc)
        attempt = message.metadata.num_delivered
        failed = TaskFailed(
            task_id=task_id,
            attempt=attempt,
            at=time.time(),
            worker=self.settings.worker_id,
            code="schema_unsupported",
            message=str(exc),
        )
        await self._publish(failed)
        await message.ack()

    async def _is_cancelled(self, task_id: str) -> bool:
        assert self._cancels is not None
        try:
            await self._cancels.get(task_id)
        except KeyNotFoundError:
            return False
        return True

    async def handle(self, message: Msg, stop: asyncio.Event | None = None) -> None:
        """One message: a batch of one."""
        await self.handle_batch([message], stop)

    async def handle_batch(self, messages: list[Msg], stop: asyncio.Event | None = None) -> None:
        """Messages fetched together: admitted, then run as groups of compatible tasks
        (one diffusers call per job each), in arrival order."""
        await self._run_held(await self._admit_all(messages), stop)

    async def _admit_all(self, messages: list[Msg]) -> list[_Held]:
        """The tasks of ``messages`` that need a run. Each admission waits on NATS (the
        cancel flag, a redelivery's history): all at once, so a batch pays one round
        trip, not one per task."""
        admitted = await asyncio.gather(
            *(self._admit(message) for message in messages), return_exceptions=True
        )
        held = [task for task in admitted if isinstance(task, _Held)]
        for error in admitted:
            if isinstance(error, BaseException):
                await self._release(held)
                raise error
        return held

    async def _run_held(self, held: list[_Held], stop: asyncio.Event | None) -> None:
        try:
            # Looked at now, not when fetched: the earlier attempt of a redelivered task
            # may have been running here meanwhile (a batch is fetched beside the last).
            finished = await asyncio.gather(*(self._finished_before(t) for t in held))
            runnable = [task for task, done in zip(held, finished, strict=True) if not done]
            for group in batching.group(runnable, lambda t: batching.batch_key(t.command)):
                ids = ",".join(t.command.task_id for t in group)
                await logs.with_fields(self._run_group(group, stop), task_id=ids)
        finally:
            await self._release(held)

    async def _release(self, held: list[_Held]) -> None:
        """Admitted tasks this worker no longer looks after (their outputs do, if any)."""
        for task in held:
            if task.command.task_id not in self._finishing:  # else its output stops it
                task.stop_keeping()
            with contextlib.suppress(Exception):
                await task.cancel_sub.unsubscribe()

    async def _next_admitted(
        self, fetched: AsyncIterator[list[Msg]]
    ) -> tuple[int, list[_Held]] | None:
        """The next fetch (how many messages, the tasks among them that need a run); an
        empty one after each fetch timeout; None once the fetching stopped."""
        messages = await anext(fetched, None)
        if messages is None:
            return None
        return len(messages), await self._admit_all(messages)

    async def _top_up(self, subscription: consumer.Puller, count: int) -> list[_Held]:
        """More tasks for a batch fetched while the last one ran, from what is queued
        now: fetched early, a batch holds only what was queued then (often a task or
        two at moderate load), and small batches waste the GPU."""
        room = max(self.settings.max_batch, 1) - count
        if room <= 0:
            return []
        try:
            messages = await subscription.fetch(room, timeout=TOP_UP_S)
        except TimeoutError:
            return []
        return await self._admit_all(messages)

    async def _hand_back(self, upcoming: asyncio.Task[tuple[int, list[_Held]] | None]) -> None:
        """A fetch that will not run (the worker stops): its tasks go back at once, so
        another worker takes them now, not after the ack deadline. It is waited for, not
        cancelled: a message that reached this worker in the middle of a cancelled fetch
        or admission would be in nobody's hands until its ack deadline (the task handed
        back mid-run is redelivered at once, maybe to this very fetch)."""
        with contextlib.suppress(Exception):  # a timeout, or the fetch's own error
            await asyncio.wait_for(asyncio.shield(upcoming), self.settings.fetch_timeout_s + 5)
        if not upcoming.done():
            upcoming.cancel()  # a fetch that outlived its own timeout: give up on it
        await asyncio.wait({upcoming})
        if upcoming.cancelled() or upcoming.exception() is not None:
            return
        got = upcoming.result()
        held = [task for task in (got[1] if got else []) if not task.done]
        for task in held:
            task.done = True  # handed back once, whoever asks again
            with contextlib.suppress(Exception):
                await task.message.nak()
        await self._release(held)

    async def _admit(self, message: Msg) -> _Held | None:
        """Decode and look at one message; None when it needs no run (answered here)."""
        try:
            command = decode_generate(message.data)
        except msgspec.DecodeError as exc:
            await consumer.settle(message, _poison(f"undecodable command: {exc}"))
            return None
        except SchemaTooNewError as exc:
            await self._refuse_newer(message, exc)
            return None
        attempt = message.metadata.num_delivered
        origin = _Origin(task_id=command.task_id, attempt=attempt, worker=self.settings.worker_id)
        stop_flag, skip_flag = threading.Event(), threading.Event()

        async def on_cancel(msg: Msg) -> None:
            # The gateway's cancel, or A1111's skip (end the current job of the batch).
            (skip_flag if msg.data == names.SKIP_PAYLOAD else stop_flag).set()

        # Listen before looking at the flag: a cancel sent in between is not lost.
        cancel_sub = await self.nc.subscribe(names.cancel_subject(command.task_id), cb=on_cancel)
        task = _Held(message, command, origin, stop_flag, skip_flag, cancel_sub)
        if await self._is_cancelled(command.task_id):
            await self._finish(task, TaskCancelled(**origin, at=time.time()))
            return None
        task.keeper = asyncio.create_task(self._keep_alive(task))
        return task

    async def _finished_before(self, task: _Held) -> bool:
        """Whether an earlier attempt of this redelivered task ended it (then its message
        is acked here): never run a task twice."""
        finishing = self._finishing.get(task.command.task_id)
        if finishing is not None:
            # Redelivered while this worker still stores the earlier attempt's output
            # (its ack deadline passed meanwhile): that attempt ends it.
            await asyncio.wait({finishing})
        attempt = task.origin["attempt"]
        if attempt > 1 and await bus.has_event(self.js, task.command.task_id, TERMINAL_KINDS):
            # An earlier attempt stored its outcome but died before its ack: done already.
            log.info("task %s attempt %d: already finished, acking", task.command.task_id, attempt)
            task.done = True
            with contextlib.suppress(Exception):
                await task.message.ack()
            return True
        return False

    async def _keep_alive(self, task: _Held) -> None:
        """One per held message, until it is settled: its ack deadline is kept away while
        it waits behind another group and while its output is stored. While the pipeline
        runs it, its steps send the in-progress acks instead, so a hung kernel stops them
        and the task is redelivered after ``ack_wait``."""
        period = max(self.settings.ack_wait_s / 3, 0.2)
        while True:
            await asyncio.sleep(period)
            if not task.running:
                with contextlib.suppress(Exception):
                    await task.message.in_progress()

    async def _run_group(self, group: list[_Held], stop: asyncio.Event | None) -> None:
        ids = [t.command.task_id for t in group]
        log.info(
            "running %s",
            ", ".join(f"{t.command.task_id} (attempt {t.origin['attempt']})" for t in group),
        )

        async def start(task: _Held) -> Callable[[], Awaitable[bool]]:
            # The ack deadline starts over now; from here on every step renews it.
            await task.message.in_progress()
            task.running = True
            started = TaskStarted(
                **task.origin,
                at=time.time(),
                model_key=self.settings.model_key,
                stream_seq=task.message.metadata.sequence.stream,
            )
            return await bus.send_event(self.js, started, _msg_id(started))

        # The starts are sent (ahead of the steps' events, on the same connection) and
        # JetStream's answers are awaited after the run: the run does not wait for them.
        confirmations = await asyncio.gather(*(start(task) for task in group))
        # The liveness record is written beside the run, not before it: the task does not
        # wait for a KV round trip (nor after it, see the end).
        if self._load_error is None:
            self._note_state(WorkerState.BUSY, ids)
        handing_back = asyncio.create_task(
            self._hand_back_on_stop(stop, [t.stop_flag for t in group])
        )
        try:
            results = await self._execute(group)
        except Exception as exc:
            handing_back.cancel()
            await self._crashed(group, exc, stop)
            results = None
        finally:
            handing_back.cancel()
        for task, confirmed in zip(group, confirmations, strict=True):
            try:
                await confirmed()
            except Exception as exc:  # the end, stored before the ack, says it all the same
                log.warning("task %s: its start was not confirmed: %r", task.command.task_id, exc)
        if results is not None:
            await self._answer(group, results, handing_back)
        if self._load_error is None:
            self._note_state(WorkerState.READY)  # once the outputs are on their way

    async def _answer(
        self,
        group: list[_Held],
        results: list[TaskEvent | Generation],
        handing_back: asyncio.Task[bool],
    ) -> None:
        """Each task's outcome: its output stored (beside the next batch), its terminal
        event, or its message handed back when the worker stops mid-task."""
        stopping = handing_back.done() and not handing_back.cancelled() and handing_back.result()
        for task, result in zip(group, results, strict=True):
            if task.done:
                continue  # cancelled mid-batch: already answered
            if isinstance(result, TaskCancelled) and stopping:
                # Stopped mid-task and out of grace: give the task back at once so
                # another worker takes it now, not after the ack deadline.
                log.info("handing task %s back (worker stopping)", task.command.task_id)
                if self._returning is not None:
                    await self._returning
                task.done = True
                await task.message.nak()
            elif isinstance(result, Generation):
                self._start_output(task, result)
            else:
                await self._finish(task, result)

    async def _crashed(
        self, group: list[_Held], exc: Exception, stop: asyncio.Event | None
    ) -> None:
        """An error the pipeline did not attribute to one task: every task of the call."""
        log.exception("tasks %s crashed", [t.command.task_id for t in group], exc_info=exc)
        fatal = sticky_cuda_error(exc)
        if fatal:
            # The CUDA context is broken for good: no later task can run here. Give the
            # tasks back at once and exit, so a fresh process (and context) takes over.
            log.critical("sticky CUDA error: handing tasks back and exiting")
            self.fatal = True
            if stop is not None:
                stop.set()
        for task in group:
            if task.done:
                continue
            attempt = task.origin["attempt"]
            if fatal or attempt < self.settings.max_deliver:
                task.done = True
                await task.message.nak(delay=None if fatal else NAK_DELAY_S)
                continue
            failed = TaskFailed(
                **task.origin,
                at=time.time(),
                # torch.OutOfMemoryError, named without importing torch here.
                code="out_of_memory"
                if type(exc).__name__ == "OutOfMemoryError"
                else "worker_error",
                message=f"failed after {attempt} attempts: {type(exc).__name__}: {exc}",
            )
            await self._finish(task, failed)

    async def _finish(self, task: _Held, event: TaskEvent) -> None:
        """The terminal event, then the ack: ack is last."""
        task.done = True
        self.completed += await consumer.settle(task.message, self._publish(event))

    def _start_output(self, task: _Held, generation: Generation) -> None:
        """PNG encoding, uploads, the terminal event and the ack run beside the next
        batch's denoising (bounded: see :meth:`_output_room`)."""
        task.done, task.running = True, False  # the keeper renews the deadline while storing
        task_id = task.command.task_id
        output = asyncio.create_task(self._output(task, generation))
        self._outputs.add(output)
        self._finishing[task_id] = output

        def done(finished: asyncio.Task[None]) -> None:
            self._outputs.discard(finished)
            if self._finishing.get(task_id) is finished:
                del self._finishing[task_id]

        output.add_done_callback(done)

    async def _output_room(self) -> None:
        """Room for the next batch: the last batch's outputs are stored while it runs
        (``bus.BATCHES_IN_FLIGHT``), so it never waits for an upload; more than that
        and the worker waits: memory stays bounded and a slow store slows the worker
        down instead of piling up images."""
        while len(self._outputs) > (bus.BATCHES_IN_FLIGHT - 1) * max(self.settings.max_batch, 1):
            await asyncio.wait(set(self._outputs), return_when=asyncio.FIRST_COMPLETED)

    async def drain_outputs(self) -> None:
        while self._outputs:
            await asyncio.wait(set(self._outputs))

    async def _output(self, task: _Held, generation: Generation) -> None:
        # Storing is part of the task: its keeper moves the ack deadline until the ack.
        try:
            with contextlib.suppress(Exception):  # logged; an unsettled message comes back
                stored = self._store(task, generation)
                self.completed += await consumer.settle(task.message, stored)
        finally:
            task.stop_keeping()

    async def _store(self, task: _Held, generation: Generation) -> None:
        """Encode and upload the images, then the terminal event (the ack follows)."""
        command, started = task.command, time.monotonic()
        try:
            pngs = await asyncio.to_thread(lambda: generation.images)
            keys = [
                names.image_key(command.user, command.task_id, n) for n in range(1, len(pngs) + 1)
            ]
            await self.objects.put_all(list(zip(keys, pngs, strict=True)))
            await self._publish(
                TaskSucceeded(
                    **task.origin,
                    at=time.time(),
                    images=keys,
                    info=info_json(generation.info),
                    seeds=generation.seeds,
                )
            )
        except Exception as exc:
            # Redelivered soon; the next attempt stores it again under the same keys.
            log.exception("task %s: storing its output failed", command.task_id)
            raise consumer.Retry(NAK_DELAY_S) from exc
        log.info(
            "task %s: %d images stored in %.2f s",
            command.task_id,
            len(keys),
            time.monotonic() - started,
        )

    async def _execute(self, group: list[_Held]) -> list[TaskEvent | Generation]:
        """Run the group: one outcome per task (an event, or a generation to store)."""
        loop = asyncio.get_running_loop()
        results: list[TaskEvent | Generation | None] = [None] * len(group)
        runs: list[_Run] = []
        inputs: dict[str, bytes] = {}
        for index, task in enumerate(group):
            try:
                inputs |= {key: await self.objects.get(key) for key in task.command.input_keys}
            except ObjectNotFoundError as exc:
                results[index] = self._failed(task, "input_missing", f"input image {exc} is gone")
                continue
            runs.append(_Run(index, task, self._reporter(task, loop)))
        try:
            pipeline = await self._pipeline_or_error()
        except GenerationError as exc:
            for run in runs:
                results[run.index] = self._failed(run.task, exc.code, exc.message)
                await run.reporter.close()
            return [
                r or self._failed(g, "worker_error", "unreachable")
                for r, g in zip(results, group, strict=True)
            ]
        try:
            if len(runs) > 1 and hasattr(pipeline, "generate_batch"):
                await self._run_batch(pipeline, runs, inputs, results, loop)
            for run in runs:
                if results[run.index] is None and not run.task.done:
                    results[run.index] = await self._run_one(pipeline, run, inputs)
        finally:
            for run in runs:
                await run.reporter.close()
        return [
            r if r is not None else TaskCancelled(**g.origin, at=time.time())
            for r, g in zip(results, group, strict=True)
        ]

    async def _run_one(
        self, pipeline: Pipeline, run: _Run, inputs: dict[str, bytes]
    ) -> TaskEvent | Generation:
        task = run.task
        try:
            return await asyncio.to_thread(
                pipeline.generate,
                task.command,
                inputs,
                run.reporter.on_step,
                task.stop_flag.is_set,
                run.reporter.should_skip,
            )
        except TaskCancelledError:
            return TaskCancelled(**task.origin, at=time.time())
        except GenerationError as exc:
            return self._failed(task, exc.code, exc.message)

    async def _run_batch(
        self,
        pipeline: Pipeline,
        runs: list[_Run],
        inputs: dict[str, bytes],
        results: list[TaskEvent | Generation | None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        from services.inference.batched import Member

        def cancelled_now(run: _Run) -> Callable[[], None]:
            def answer() -> None:  # pipeline thread → loop: the task ends now
                loop.call_soon_threadsafe(lambda: self._spawn(self._cancel_in_batch(run)))

            return answer

        members = [
            Member(
                command=run.task.command,
                on_step=run.reporter.on_step,
                should_stop=run.task.stop_flag.is_set,
                should_skip=run.reporter.should_skip,
                on_cancelled=cancelled_now(run),
            )
            for run in runs
        ]
        log.info("batch of %d tasks: %s", len(runs), [r.task.command.task_id for r in runs])
        await asyncio.to_thread(pipeline.generate_batch, members)  # type: ignore[attr-defined]
        for run, member in zip(runs, members, strict=True):
            if member.cancelled:
                results[run.index] = TaskCancelled(**run.task.origin, at=time.time())
            elif isinstance(member.outcome, GenerationError):
                results[run.index] = self._failed(
                    run.task, member.outcome.code, member.outcome.message
                )
            else:
                results[run.index] = member.outcome

    async def _cancel_in_batch(self, run: _Run) -> None:
        """A task cancelled inside a running batch: its progress so far, then its own
        terminal event and ack; the rest of the batch goes on."""
        if run.task.done:
            return
        run.task.done = True
        await run.reporter.close()
        await self._finish(run.task, TaskCancelled(**run.task.origin, at=time.time()))

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._outputs.add(task)
        task.add_done_callback(self._outputs.discard)

    def _failed(self, task: _Held, code: str, message: str) -> TaskFailed:
        return TaskFailed(**task.origin, at=time.time(), code=code, message=message)

    def _reporter(self, task: _Held, loop: asyncio.AbstractEventLoop) -> _Reporter:
        return _Reporter(self, task, loop)


@dataclass
class _Held:
    """A fetched task, from admission until its message is acked or handed back."""

    message: Msg
    command: GenerateImage
    origin: _Origin
    stop_flag: threading.Event
    skip_flag: threading.Event
    cancel_sub: Subscription
    keeper: asyncio.Task[None] | None = None
    """Renews the ack deadline while the task is not running (:meth:`Worker._keep_alive`)."""
    running: bool = False
    """In the pipeline: its steps renew the ack deadline."""
    done: bool = False
    """Its terminal event is out and its message acked (or handed back)."""

    def stop_keeping(self) -> None:
        if self.keeper is not None:
            self.keeper.cancel()


@dataclass
class _Run:
    index: int
    task: _Held
    reporter: _Reporter


class _Reporter:
    """One task's progress: steps from the pipeline thread, collected by the loop every
    ``REPORT_EVERY_S`` and each published in order, with in-progress acks at most every
    ``IN_PROGRESS_EVERY_S`` (a hung kernel stops them, and the task is redelivered after
    ``ack_wait``)."""

    def __init__(self, worker: Worker, task: _Held, loop: asyncio.AbstractEventLoop) -> None:
        self.worker, self.task, self.loop = worker, task, loop
        command = task.command
        request = None if isinstance(command, ExtrasTask) else command.request
        self.steps: asyncio.Queue[Progress | None] = asyncio.Queue()
        # The last step reported (written and read on the pipeline thread only).
        self.last = Progress(0, 0, request.steps if request else 1)
        # Extras: one job per input image.
        self.job_count = request.n_iter if request else max(len(command.input_keys), 1)
        self._reports: collections.deque[tuple[Progress, bool]] = collections.deque()
        """Steps the pipeline thread reported and the loop has not collected yet (a
        deque's appends and pops are atomic: no lock)."""
        self._publisher = loop.create_task(self._publish_all())
        self._collector = loop.create_task(self._collect_every())
        self._acking: asyncio.Task[None] | None = None
        self._acked_at = -math.inf
        """When the last in-progress ack was sent (the pipeline thread's clock reading)."""
        self._ack_every_s = min(IN_PROGRESS_EVERY_S, worker.settings.ack_wait_s / 10)
        self._closed = False

    def on_step(self, job_no: int, step: int, total: int, preview: bytes | None) -> None:
        # Called from the pipeline thread, which goes on at once: the loop collects the
        # step within REPORT_EVERY_S (a wake-up of the loop per step cost this thread
        # more than the step's publishing, see there).
        self.last = Progress(job_no, step, total)
        now = time.monotonic()
        ack = now - self._acked_at >= self._ack_every_s
        if ack:
            self._acked_at = now
        self._reports.append((Progress(job_no, step, total, preview, at=time.time()), ack))

    async def _collect_every(self) -> None:
        while True:
            await asyncio.sleep(REPORT_EVERY_S)
            self._collect()

    def _collect(self) -> None:
        while self._reports:
            self._stepped(*self._reports.popleft())

    def _stepped(self, progress: Progress, ack: bool) -> None:
        if ack:
            self._keep_alive()
        self.steps.put_nowait(progress)

    def _keep_alive(self) -> None:
        """An in-progress ack, sent at once: it must not queue behind the
        progress events (each waits for JetStream to store it, which may be slow), or a
        busy server would let the ack deadline pass while the task is making progress."""
        if self._acking is None or self._acking.done():
            self._acking = self.loop.create_task(self._ack_in_progress())

    async def _ack_in_progress(self) -> None:
        with contextlib.suppress(Exception):
            await self.task.message.in_progress()

    def should_skip(self) -> bool:
        """A1111's skip, asked between steps: the job ends, and progress says so."""
        if not _take(self.task.skip_flag):
            return False
        seen = self.last
        # The job running is the last one reported, or the next once that one was done.
        done = seen.step >= seen.total_steps
        job_no, step = (seen.job_no + 1, 0) if done else (seen.job_no, seen.step)
        marker = Progress(job_no, step, seen.total_steps, skipped=True, at=time.time())
        self._reports.append((marker, False))
        self.loop.call_soon_threadsafe(self._collect)  # shown at once, after its steps
        return True

    async def close(self) -> None:
        """Every step reported so far is published."""
        if not self._closed:
            self._closed = True
            self._collector.cancel()
            self._collect()
            self.steps.put_nowait(None)
        await asyncio.shield(self._publisher)

    async def _publish_all(self) -> None:
        worker, task = self.worker, self.task
        command = task.command
        started = time.time()
        while (item := await self.steps.get()) is not None:
            done = (item.job_no * item.total_steps + item.step) / (
                item.total_steps * self.job_count
            )
            elapsed = item.at - started
            eta = elapsed * (1 - done) / done if done > 0 else None
            worker._last_step_at = item.at
            preview_key = None
            if item.preview is not None:
                preview_key = names.preview_key(command.user, command.task_id)
                try:
                    await worker.objects.put(preview_key, item.preview)
                except Exception as exc:  # a preview is a nicety: never fail a task on it
                    log.warning("preview upload failed: %s", exc)
                    preview_key = None
            await worker._publish(
                TaskProgressed(
                    **task.origin,
                    at=item.at,
                    step=item.step,
                    total_steps=item.total_steps,
                    job_no=item.job_no,
                    job_count=self.job_count,
                    progress=round(done, 4),
                    eta_seconds=round(eta, 2) if eta is not None else None,
                    preview_key=preview_key,
                    skipped=item.skipped,
                ),
                dedupe_suffix=f".{item.job_no}.{item.step}" + (".skipped" if item.skipped else ""),
            )


def _msg_id(event: TaskEvent, suffix: str = "") -> str:
    """The ``Nats-Msg-Id`` of a worker's non-terminal event: per task, kind and attempt."""
    return f"{event.task_id}.{event_kind(event)}.{event.attempt}{suffix}"


async def _poison(reason: str) -> None:
    raise consumer.Poison(reason)
