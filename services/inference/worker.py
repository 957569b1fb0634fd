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
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from proto import GenerateImage, names
from proto.codec import decode_generate, encode
from proto.events import (
    TaskCancelled,
    TaskEvent,
    TaskFailed,
    TaskProgressed,
    TaskStarted,
    TaskSucceeded,
    event_kind,
)
from proto.workers import WorkerState, WorkerStatus
from services.common import bus
from services.inference.pipeline import (
    GenerationError,
    Pipeline,
    TaskCancelledError,
    info_json,
)
from services.inference.settings import WorkerSettings
from services.storage.objects import ObjectNotFoundError, ObjectStore

log = logging.getLogger(__name__)
NAK_DELAY_S = 2.0
HEARTBEAT_S = 5.0
"""Liveness record refresh (well inside the bucket's TTL). Never used to ack tasks."""


CHECKPOINT_WATCH_S = 2.0
TERMINAL_KINDS = ("succeeded", "failed", "cancelled")
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


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    """Inode, size and mtime: a rename over the file (an upload) changes them."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


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


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        nc: Client,
        objects: ObjectStore,
        pipeline_factory: Callable[[], Pipeline],
    ) -> None:
        self.settings = settings
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.objects = objects
        self._factory = pipeline_factory
        self._pipeline: Pipeline | None = None
        self._load_error: GenerationError | None = None
        self._cancels: KeyValue | None = None
        self._workers: KeyValue | None = None
        self._state = WorkerState.LOADING
        self._task_id: str | None = None
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
            task_id=self._task_id,
            error=self._load_error.message if self._load_error else None,
            last_step_at=self._last_step_at,
            updated_at=time.time(),
            load_seconds=self._load_seconds,
            **_memory(),
        )
        try:
            await self._workers.put(names.worker_kv_key(self.settings.worker_id), encode(status))
        except Exception as exc:  # liveness must never take a task down with it
            log.warning("cannot write the liveness record: %s", exc)

    async def _set_state(self, state: WorkerState, task_id: str | None = None) -> None:
        self._state, self._task_id = state, task_id
        await self._beat()

    async def _hand_back_on_stop(
        self, stop: asyncio.Event | None, stop_flag: threading.Event
    ) -> bool:
        """When the worker is asked to stop mid-task, let the task finish within the grace
        period; past it, interrupt the task (True) so it can be handed back."""
        if stop is None:
            await asyncio.Event().wait()
            return False
        await stop.wait()
        await asyncio.sleep(self.settings.stop_grace_s)
        stop_flag.set()
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
        loaded = await asyncio.to_thread(_file_identity, path)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), CHECKPOINT_WATCH_S)
            if stop.is_set():
                return
            now = await asyncio.to_thread(_file_identity, path)
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
        subscription = await self.js.pull_subscribe_bind(
            durable=names.consumer_name(self.settings.model_key), stream=names.TASK_STREAM
        )
        log.info(
            "worker %s serving %s (loaded in %.2f s)",
            self.settings.worker_id,
            self.settings.model_name,
            self._load_seconds,
        )
        idle_since = time.monotonic()
        try:
            while not stop.is_set():
                try:
                    messages = await subscription.fetch(1, timeout=self.settings.fetch_timeout_s)
                except TimeoutError:  # nats raises its own subclass or the builtin, by code path
                    idle = time.monotonic() - idle_since
                    if self.settings.idle_exit_s and idle > self.settings.idle_exit_s:
                        log.info("idle for %.0f s, exiting", idle)
                        break
                    continue
                for message in messages:
                    await self.handle(message, stop)
                idle_since = time.monotonic()
        finally:
            log.info("worker stopping after %d tasks", self.completed)
            heartbeat.cancel()
            checkpoint_watch.cancel()
            for task in stepping_down:
                task.cancel()
            with contextlib.suppress(Exception):
                await restart_sub.unsubscribe()
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
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
        msg_id = f"{event.task_id}.{event_kind(event)}.{event.attempt}{dedupe_suffix}"
        await bus.publish_event(self.js, event, msg_id)

    async def _is_cancelled(self, task_id: str) -> bool:
        assert self._cancels is not None
        try:
            await self._cancels.get(task_id)
        except KeyNotFoundError:
            return False
        return True

    async def handle(self, message: Msg, stop: asyncio.Event | None = None) -> None:
        try:
            command = decode_generate(message.data)
        except msgspec.DecodeError:
            log.error("undecodable command on %s, terminating it", message.subject)
            await message.term()
            return
        attempt = message.metadata.num_delivered
        if attempt > 1 and await bus.has_event(self.js, command.task_id, TERMINAL_KINDS):
            # An earlier attempt stored its outcome but died before its ack: done already.
            log.info("task %s attempt %d: already finished, acking", command.task_id, attempt)
            await message.ack()
            return
        common = _Origin(task_id=command.task_id, attempt=attempt, worker=self.settings.worker_id)
        stop_flag = threading.Event()

        skip_flag = threading.Event()

        async def on_cancel(message: Msg) -> None:
            # The gateway's cancel, or A1111's skip (end the current job of the batch).
            (skip_flag if message.data == names.SKIP_PAYLOAD else stop_flag).set()

        # Listen before looking at the flag: a cancel sent in between is not lost.
        cancel_sub = await self.nc.subscribe(names.cancel_subject(command.task_id), cb=on_cancel)
        try:
            if await self._is_cancelled(command.task_id):
                event: TaskEvent = TaskCancelled(**common, at=time.time())
            else:
                await self._publish(
                    TaskStarted(**common, at=time.time(), model_key=self.settings.model_key)
                )
                if self._load_error is None:
                    await self._set_state(WorkerState.BUSY, command.task_id)
                handing_back = asyncio.create_task(self._hand_back_on_stop(stop, stop_flag))
                try:
                    event = await self._run(command, message, attempt, stop_flag, skip_flag)
                finally:
                    handing_back.cancel()
                interrupted = isinstance(event, TaskCancelled)
                stopping = handing_back.done() and not handing_back.cancelled()
                if interrupted and stopping and handing_back.result():
                    # Stopped mid-task and out of grace: give the task back at once so
                    # another worker takes it now, not after the ack deadline.
                    log.info("handing task %s back (worker stopping)", command.task_id)
                    await message.nak()
                    return
        except Exception as exc:
            log.exception("task %s attempt %d crashed", command.task_id, attempt)
            if sticky_cuda_error(exc):
                # The CUDA context is broken for good: no later task can run here. Give the
                # task back at once and exit, so a fresh process (and context) takes over.
                log.critical("sticky CUDA error: handing task %s back and exiting", command.task_id)
                self.fatal = True
                await message.nak()
                if stop is not None:
                    stop.set()
                return
            if attempt < self.settings.max_deliver:
                await message.nak(delay=NAK_DELAY_S)
                return
            event = TaskFailed(
                **common,
                at=time.time(),
                code="worker_error",
                message=f"failed after {attempt} attempts: {type(exc).__name__}: {exc}",
            )
        finally:
            await cancel_sub.unsubscribe()
            if self._load_error is None:
                await self._set_state(WorkerState.READY)
        await self._publish(event)
        await message.ack()
        self.completed += 1

    async def _run(
        self,
        command: GenerateImage,
        message: Msg,
        attempt: int,
        stop_flag: threading.Event,
        skip_flag: threading.Event | None = None,
    ) -> TaskEvent:
        common = _Origin(task_id=command.task_id, attempt=attempt, worker=self.settings.worker_id)
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue[Progress | None] = asyncio.Queue()
        reporter = asyncio.create_task(self._report(command, message, attempt, steps))
        started = time.monotonic()

        request = command.txt2img or command.img2img
        # The last step reported (written and read on the pipeline thread only).
        last = [Progress(0, 0, request.steps if request else 1)]
        skip = skip_flag or threading.Event()

        def on_step(job_no: int, step: int, total: int, preview: bytes | None) -> None:
            # Called from the pipeline thread: hand over to the event loop.
            last[0] = Progress(job_no, step, total)
            loop.call_soon_threadsafe(steps.put_nowait, Progress(job_no, step, total, preview))

        def should_skip() -> bool:
            """A1111's skip, asked between steps: the job ends, and progress says so."""
            if not _take(skip):
                return False
            seen = last[0]
            # The job running is the last one reported, or the next once that one was done.
            done = seen.step >= seen.total_steps
            job_no, step = (seen.job_no + 1, 0) if done else (seen.job_no, seen.step)
            marker = Progress(job_no, step, seen.total_steps, skipped=True)
            loop.call_soon_threadsafe(steps.put_nowait, marker)
            return True

        try:
            try:
                inputs = {key: await self.objects.get(key) for key in command.input_keys}
            except ObjectNotFoundError as exc:
                raise GenerationError("input_missing", f"input image {exc} is gone") from exc
            pipeline = await self._pipeline_or_error()
            generation = await asyncio.to_thread(
                pipeline.generate,
                command,
                inputs,
                on_step,
                stop_flag.is_set,
                should_skip,
            )
        except TaskCancelledError:
            return TaskCancelled(**common, at=time.time())
        except GenerationError as exc:
            return TaskFailed(**common, at=time.time(), code=exc.code, message=exc.message)
        finally:
            steps.put_nowait(None)
            await reporter
        keys = [
            names.image_key(command.user, command.task_id, n)
            for n in range(1, len(generation.images) + 1)
        ]
        for key, png in zip(keys, generation.images, strict=True):
            await self.objects.put(key, png)
        log.info(
            "task %s: %d images in %.2f s", command.task_id, len(keys), time.monotonic() - started
        )
        return TaskSucceeded(
            **common,
            at=time.time(),
            images=keys,
            info=info_json(generation.info),
            seeds=generation.seeds,
        )

    async def _report(
        self,
        command: GenerateImage,
        message: Msg,
        attempt: int,
        steps: asyncio.Queue[Progress | None],
    ) -> None:
        """Publish progress in order, with an in-progress ack per real step."""
        request = command.txt2img or command.img2img
        # Extras: one job per input image.
        job_count = request.n_iter if request else max(len(command.input_keys), 1)
        started = time.monotonic()
        while (item := await steps.get()) is not None:
            done = (item.job_no * item.total_steps + item.step) / (item.total_steps * job_count)
            elapsed = time.monotonic() - started
            eta = elapsed * (1 - done) / done if done > 0 else None
            self._last_step_at = time.time()
            await message.in_progress()
            preview_key = None
            if item.preview is not None:
                preview_key = names.preview_key(command.user, command.task_id)
                try:
                    await self.objects.put(preview_key, item.preview)
                except Exception as exc:  # a preview is a nicety: never fail a task on it
                    log.warning("preview upload failed: %s", exc)
                    preview_key = None
            await self._publish(
                TaskProgressed(
                    task_id=command.task_id,
                    attempt=attempt,
                    worker=self.settings.worker_id,
                    at=time.time(),
                    step=item.step,
                    total_steps=item.total_steps,
                    job_no=item.job_no,
                    job_count=job_count,
                    progress=round(done, 4),
                    eta_seconds=round(eta, 2) if eta is not None else None,
                    preview_key=preview_key,
                    skipped=item.skipped,
                ),
                dedupe_suffix=f".{item.job_no}.{item.step}" + (".skipped" if item.skipped else ""),
            )
