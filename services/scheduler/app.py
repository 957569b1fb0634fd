"""The scheduler's control loop: the global budget → consumer limits and workers.

Every tick it reads each checkpoint's consumer (backlog, in flight, current limit),
asks the pure policy (:mod:`services.scheduler.policy`) for shares and worker counts,
and applies them: limits are lowered before any is raised, a share of 0 pauses the
consumer (JetStream consumer pause) instead of deleting it, and workers are started or
stopped through the backend. The share it sets is also written to the consumer's
metadata (``sdswarm_share``): a ``max_ack_pending`` that differs from it was changed by
an operator and is honoured as a pin, counted in the budget, never fought.

With a :class:`~services.scheduler.lease.Lease`, several replicas may run and only the
one holding the lease ticks; every change is fenced by the lease (:class:`LeaseLost`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo

from proto import ModelFamily, ModelStatus, ModelType, names
from proto.workers import WorkerState, WorkerStatus
from services.common import bus, metrics
from services.common.bus import worker_records
from services.scheduler.hung import StepWatch
from services.scheduler.lease import Lease
from services.scheduler.policy import CheckpointLoad, Plan, consumer_limit, plan
from services.scheduler.settings import SchedulerSettings, max_batch
from services.storage.models import ModelStore, unregistered, usable, warm_until
from services.storage.mongo import Document
from services.storage.tasks import TaskStore

log = logging.getLogger(__name__)
SHARE_METADATA = "sdswarm_share"
SLOTS_METADATA = "sdswarm_slots"


@dataclass
class _Memory:
    """What the scheduler remembers per checkpoint between ticks."""

    last_demand: float = -1e12
    held_since: float | None = None
    pin_logged: int | None = None
    limit: int = 0
    """The consumer's ``max_ack_pending`` as read this tick (0 while paused)."""


def current_share(info: ConsumerInfo) -> tuple[int, int | None]:
    """(limit now, operator pin or None) read back from a consumer."""
    config = info.config
    if getattr(info, "paused", False):
        return 0, None
    limit = int(config.max_ack_pending or 0)
    recorded = (config.metadata or {}).get(SHARE_METADATA)
    if recorded is not None and recorded.isdigit() and int(recorded) != limit:
        return limit, limit
    return limit, None


def slots_of(info: ConsumerInfo, limit: int, batch: int) -> int:
    """The share (slots) behind a consumer's ``limit``: as recorded with the limit we set
    (one task per slot and ``batch`` per slot cannot be told apart otherwise); a limit
    we did not set (an operator's pin) counts as workers of ``batch`` tasks each."""
    metadata = info.config.metadata or {}
    recorded = metadata.get(SLOTS_METADATA)
    ours = metadata.get(SHARE_METADATA) == str(limit)
    if limit and ours and recorded is not None and recorded.isdigit():
        return int(recorded)
    return _slots(limit, batch)


def warming(model: Document) -> bool:
    """Pre-warmed (``POST /models/{name}/warm``) and its deadline not yet passed."""
    until = warm_until(model)
    return until is not None and until > dt.datetime.now(dt.UTC)


def _slots(tasks: int, batch: int) -> int:
    """Workers needed for ``tasks`` at ``batch`` tasks each."""
    return -(-tasks // max(batch, 1))


def running_slots(in_flight: int, batch: int) -> int:
    """The slots (workers) that ``in_flight`` tasks of a consumer hold at least: a worker
    holds ``bus.BATCHES_IN_FLIGHT`` batches (one running, one being stored)."""
    return _slots(in_flight, max(batch, 1) * bus.BATCHES_IN_FLIGHT)


def preview_decoder(family: str | None, decoders: list[Document]) -> str:
    """The path of the TAESD decoder (``vaeApprox``) for a checkpoint of ``family``; empty
    when none fits. TAESD and TAESDXL files have the same shapes, so the name tells them
    apart as in A1111 (``taesdxl_decoder``): "xl" in it means SDXL; SD1 and SD2 share one
    latent space; a name saying ``sd3`` or ``f1`` (other latent spaces) fits neither.
    ``decoders`` as :meth:`ModelStore.list` gives them: by name, deleted ones left out."""
    xl = (family or "").startswith(ModelFamily.SDXL.value)  # inpainting ones too
    for decoder in decoders:
        name = str(decoder["name"]).lower()
        if usable(decoder) and "sd3" not in name and "f1" not in name and ("xl" in name) == xl:
            return str(decoder["path"])
    return ""


def extras_pool() -> Document:
    """Extras (upscaling) need no checkpoint: a pool of their own, scaled like a checkpoint's
    (its workers start with no checkpoint path; see services/inference/extras.py)."""
    key = names.EXTRAS_MODEL_KEY
    # Upscaling tasks never share a call: a worker takes one at a time.
    return {
        "name": key,
        "model_key": key,
        "path": "",
        "status": ModelStatus.UNLOADED.value,
        "max_batch": 1,
    }


class Backend(Protocol):
    """Where workers run: local processes (local.py) or Swarm services (swarm.py)."""

    def replicas(self) -> dict[str, int]:
        """Workers per model key, as of the last reconcile."""
        ...

    async def reconcile(self) -> None:
        """Refresh what :meth:`replicas` reports (reap dead processes, list services)."""
        ...

    async def ensure(self, model: Document, replicas: int) -> None: ...

    async def step_down(self) -> None:
        """This replica stopped leading: give up what only the leader may hold."""
        ...

    async def replace(self, worker: WorkerStatus) -> bool:
        """Stop a hung worker now (it gets no grace: it is stuck); whether it could."""
        ...


class LeaseLost(Exception):
    """The lease lapsed while a plan was being applied: the rest of it is dropped."""


class Scheduler:
    def __init__(
        self,
        settings: SchedulerSettings,
        js: JetStreamContext,
        models: ModelStore,
        backend: Backend,
        tasks: TaskStore,
        lease: Lease | None = None,
    ) -> None:
        self.settings = settings
        self.js = js
        self.models = models
        self.tasks = tasks
        self.backend = backend
        self.lease = lease
        self._memory: dict[str, _Memory] = {}
        self.last_plan: Plan | None = None
        self.ticks = 0
        """Ticks applied (a standby replica applies none)."""
        self.steps = StepWatch(settings.hung_after_s)
        self.replaced = 0
        """Hung workers replaced."""

    def _fence(self) -> None:
        if self.lease is not None and not self.lease.held():
            raise LeaseLost(self.lease.holder)

    async def _load(self, model: Document, workers: int, busy: int, now: float) -> CheckpointLoad:
        """The checkpoint's load in slots (workers): a slot runs up to ``max_batch``
        tasks, so tasks queued and allowed are divided by it (rounded up), tasks in
        flight by the batches it holds (:func:`running_slots`), and in flight is at
        least its busy workers."""
        key = model["model_key"]
        memory = self._memory.setdefault(key, _Memory())
        info = await bus.ensure_task_consumer(self.js, key, self.settings, paused=True)
        backlog, running = int(info.num_pending or 0), int(info.num_ack_pending or 0)
        metrics.consumer_seen(key, backlog, running)
        batch = max_batch(self.settings, model)
        limit, pinned = current_share(info)
        memory.limit = limit
        share = slots_of(info, limit, batch)
        if pinned is not None and memory.pin_logged != pinned:
            log.warning("%s: max_ack_pending %d set by an operator; honoured as a pin", key, pinned)
            memory.pin_logged = pinned
        if backlog or running:
            memory.last_demand = now
        oldest = await self.tasks.oldest_waiting(key) if backlog else None
        wait = (dt.datetime.now(dt.UTC) - oldest).total_seconds() if oldest else 0.0
        return CheckpointLoad(
            key=key,
            backlog=_slots(backlog, batch),
            running=max(running_slots(running, batch), busy),
            share=share,
            workers=workers,
            oldest_wait_s=max(wait, 0.0),
            held_since=memory.held_since,
            idle_s=now - memory.last_demand,
            min_instances=max(int(model.get("min_instances") or 0), 1 if warming(model) else 0),
            max_instances=model.get("max_instances"),
            pinned=_slots(pinned, batch) if pinned is not None else None,
            idle_timeout_s=model.get("idle_timeout_s"),
        )

    async def _set_share(self, model: Document, share: int, limit: int) -> None:
        """``share`` slots as ``limit`` tasks in flight (:func:`consumer_limit`)."""
        key = model["model_key"]
        consumer = names.consumer_name(key)
        if share == 0:
            await self.js.pause_consumer(names.TASK_STREAM, consumer, bus.PAUSED_FOREVER)
            return
        config = bus.task_consumer_config(key, self.settings, max_ack_pending=limit)
        config.metadata = {SHARE_METADATA: str(limit), SLOTS_METADATA: str(share)}
        await self.js.add_consumer(names.TASK_STREAM, config)  # an update: same durable
        await self.js.resume_consumer(names.TASK_STREAM, consumer)

    async def tick(self) -> Plan:
        now = time.monotonic()
        await self.backend.reconcile()
        replicas = self.backend.replicas()
        # Failed checkpoints stay scheduled: their worker fails queued tasks with the
        # reason at once (the gateway refuses new ones), so nothing waits forever.
        models = await self.models.list(ModelType.STABLE_DIFFUSION)
        decoders = await self.models.list(ModelType.VAE_APPROX)
        for model in models:  # what its workers draw live previews with
            model["preview_decoder"] = preview_decoder(model.get("family"), decoders)
        records = await worker_records(self.js)
        await self._sync_statuses(models, records)
        await self._replace_hung(records)
        models.append(extras_pool())
        busy: dict[str, int] = {}
        alive: dict[str, int] = {}
        for record in records:
            alive[record.model_key] = alive.get(record.model_key, 0) + 1
            if record.state is WorkerState.BUSY:
                busy[record.model_key] = busy.get(record.model_key, 0) + 1
        loads = [
            await self._load(m, replicas.get(m["model_key"], 0), busy.get(m["model_key"], 0), now)
            for m in models
        ]
        result = plan(
            loads,
            self.settings.gpu_slots,
            idle_timeout_s=self.settings.idle_timeout_s,
            starvation_s=self.settings.starvation_s,
        )
        by_key = {load.key: load for load in loads}
        by_model = {m["model_key"]: m for m in models}
        # Workers that could take a task now or soon: what the backend runs (a stopping
        # one included), what the liveness records show (a previous leader's too), what
        # the plan starts.
        limits = {
            key: consumer_limit(
                share,
                max_batch(self.settings, by_model[key]),
                max(replicas.get(key, 0), alive.get(key, 0), result.workers[key]),
                bus.BATCHES_IN_FLIGHT,
            )
            for key, share in result.shares.items()
        }
        # Lower first, then raise: the budget holds between the two consumer updates.
        changes = sorted(
            (
                k
                for k in result.shares
                if (result.shares[k], limits[k]) != (by_key[k].share, self._memory[k].limit)
                and by_key[k].pinned is None
            ),
            key=lambda k: (result.shares[k] - by_key[k].share, limits[k] - self._memory[k].limit),
        )
        for key in changes:
            self._fence()
            await self._set_share(by_model[key], result.shares[key], limits[key])
        for key, share in result.shares.items():
            memory = self._memory[key]
            memory.held_since = (memory.held_since or now) if share > 0 else None
        for model in models:
            key = model["model_key"]
            workers = result.workers[key]
            if unregistered(model):
                # Listed while its first file was being registered (the tasks that want
                # it came after): a worker started from this record would serve no hash.
                # The next tick reads the finished record.
                workers = min(workers, replicas.get(key, 0))
            if key in result.reasons:
                log.info(
                    "%s: scaling to %d workers (%s)",
                    key,
                    workers,
                    result.reasons[key],
                    extra={"model_key": key},
                )
            self._fence()
            await self.backend.ensure(model, workers)
        await self._stop_orphans(replicas, {m["model_key"] for m in models})
        self.last_plan = result
        metrics.scheduled(self.settings.gpu_slots, loads, result, records, replicas)
        self.ticks += 1
        return result

    async def _stop_orphans(self, replicas: dict[str, int], live: set[str]) -> None:
        """Workers of a checkpoint that was deleted (or vanished from the registry) stop,
        and a backend drops what it keeps for it (a Swarm service, even at 0 replicas)."""
        for key, count in replicas.items():
            if key in live:
                continue
            gone = {"model_key": key, "name": key, "status": ModelStatus.DELETED.value}
            model = await self.models.by_key(key) or gone
            if count:
                log.info("%s: not a live checkpoint any more, stopping its workers", key)
            self._fence()
            await self.backend.ensure(model, 0)

    async def _replace_hung(self, records: list[WorkerStatus]) -> None:
        """Workers alive but stuck mid-task are stopped; the policy then starts others
        (their slots are still demanded) and JetStream redelivers the task once the
        in-progress acks have stopped for ``ack_wait``."""
        for worker in self.steps.hung(records, time.monotonic()):
            log.warning(
                "worker %s (%s) hung: no step of task %s for %.0f s; replacing it",
                worker.worker,
                worker.model_key,
                worker.task_id,
                self.settings.hung_after_s,
                extra={
                    "model_key": worker.model_key,
                    "worker": worker.worker,
                    "task_id": worker.task_id,
                },
            )
            self._fence()
            self.steps.handled(worker.worker)
            if await self.backend.replace(worker):
                self.replaced += 1

    async def _sync_statuses(self, models: list[Document], records: list[WorkerStatus]) -> None:
        """Registry statuses follow the workers' real state (the seed's were always "loaded")."""
        by_model: dict[str, list[WorkerStatus]] = {}
        for record in records:
            by_model.setdefault(record.model_key, []).append(record)
        for model in models:
            own = by_model.get(model["model_key"], [])
            live = [r for r in own if r.state in (WorkerState.READY, WorkerState.BUSY)]
            failed = [r for r in own if r.state is WorkerState.FAILED]
            error = model.get("error")
            await self._record_cold_start(model, live)
            if live:
                status = ModelStatus.LOADED
            elif any(r.state is WorkerState.LOADING for r in own):
                status = ModelStatus.LOADING
            elif failed:
                status, error = ModelStatus.FAILED, failed[0].error
            elif model["status"] in (ModelStatus.LOADING.value, ModelStatus.LOADED.value):
                status = ModelStatus.UNLOADED
            else:
                continue  # unloaded, or failed at registration: no worker changes that
            if (status.value, len(live)) != (model["status"], model.get("loaded_workers", 0)):
                await self.models.set_status(model["name"], status, error, workers=len(live))
                model["status"] = status.value

    async def _record_cold_start(self, model: Document, live: list[WorkerStatus]) -> None:
        """The checkpoint's measured cold start (the slowest of its live workers), kept on
        its record as ``cold_start_s``, what a task waits for when no worker is warm, with
        that worker's phases as ``cold_start_phases``. A worker that reports phases is
        measured from its process's start (their sum), an older one by its load alone."""
        measured = [
            (round(sum(r.load_phases.values()), 3) if r.load_phases else r.load_seconds, r)
            for r in live
        ]
        known = [(s, r) for s, r in measured if s is not None]
        if not known:
            return
        seconds, slowest = max(known, key=lambda m: m[0])
        phases = dict(slowest.load_phases)
        if (seconds, phases) != (model.get("cold_start_s"), model.get("cold_start_phases", {})):
            await self.models.record_cold_start(model, seconds, phases)
            model["cold_start_s"], model["cold_start_phases"] = seconds, phases

    async def run(self, stop: asyncio.Event) -> None:
        await bus.ensure_streams(self.js, self.settings)
        keeper = asyncio.create_task(self._keep_lease(stop)) if self.lease else None
        acting = False
        try:
            while not stop.is_set():
                if self.lease is None or self.lease.held():
                    acting = True
                    await self._tick_logged()
                elif acting:
                    acting = False
                    metrics.stood_down()
                    await self.backend.step_down()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.settings.poll_interval_s)
        finally:
            if keeper is not None and self.lease is not None:
                keeper.cancel()
                await asyncio.gather(keeper, return_exceptions=True)
                await self.lease.release()

    async def _tick_logged(self) -> None:
        try:
            await self.tick()
        except LeaseLost:
            log.warning("lease lost during a tick: the rest of its plan is dropped")
        except Exception:
            # A failed tick (NATS or MongoDB briefly away) must not end scheduling.
            log.exception("scheduler tick failed")

    async def _keep_lease(self, stop: asyncio.Event) -> None:
        """Acquire or renew the lease apart from ticks, which may take longer than it."""
        assert self.lease is not None
        while not stop.is_set():
            try:
                await self.lease.keep()
            except Exception:
                log.exception("lease renewal failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.lease.ttl_s / 4)
