"""Prometheus metrics: every definition, the hooks the services call, and the listener.

One module so that a metric's name, labels and meaning are read in one place. Labels
never carry per-user data (no user names, task ids or webhook hosts): ``model`` is a
checkpoint's key, ``status`` / ``state`` / ``code`` / ``outcome`` are from fixed
vocabularies. Each process exposes what it sees:

- gateway: submissions, API errors by code, request durations, open event streams;
- storage service: task transitions folded from events (by status and checkpoint), wait
  and run time histograms, task errors by code, webhook deliveries;
- scheduler (the replica leading; a standby reports ``sdswarm_scheduler_leader 0`` and
  nothing else of its own): queue depth and oldest wait, budget shares, workers by
  state, cold starts and their phases; its listener also serves ``/targets``, the
  workers' metrics addresses for Prometheus' ``http_sd_configs``;
- worker: its state, batch sizes, device seconds per task, its own cold-start phases.

``sdswarm up`` runs gateway, storage and scheduler in one process: one listener serves
them all. The listener is off unless ``SDSWARM_METRICS_PORT`` is set (``-1``: a free port
chosen by the kernel, logged, and for workers written into their liveness record).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client import generate_latest as _generate_latest

if TYPE_CHECKING:
    from aiohttp import web

    from proto.workers import CompileStatus, WorkerStatus
    from services.common.settings import BusSettings
    from services.scheduler.policy import CheckpointLoad, Plan

log = logging.getLogger(__name__)
# A ``*_created`` series beside every counter and histogram doubles what Prometheus stores
# for a timestamp it does not need (counter resets are detected without it).
disable_created_metrics()  # type: ignore[no-untyped-call]

_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
"""Task and cold-start durations: tiny models on CPU take 0.1 s, SDXL at 1024² minutes."""
_BATCHES = (1, 2, 3, 4, 6, 8, 12, 16, 32)

# --- tasks (gateway: waiting; storage sink: the rest) -----------------------------------
TASKS = Counter(
    "sdswarm_tasks",
    "Tasks entering a status, by checkpoint: waiting when submitted (gateway), the others"
    " as the storage sink folds their events, once each (running: once per delivery"
    " attempt, a redelivered task starts again).",
    ["model", "status"],
)
TASK_ERRORS = Counter(
    "sdswarm_task_errors", "Failed tasks by checkpoint and error code.", ["model", "code"]
)
TASK_WAIT = Histogram(
    "sdswarm_task_wait_seconds",
    "Submitted → started (queue wait, including any cold start), of finished tasks.",
    ["model"],
    buckets=_SECONDS,
)
TASK_RUN = Histogram(
    "sdswarm_task_run_seconds",
    "Started → finished (last attempt's start), by final status.",
    ["model", "status"],
    buckets=_SECONDS,
)

# --- workers (each worker process) -------------------------------------------------------
WORKER_STATE = Gauge(
    "sdswarm_worker_state", "1 for this worker's current state.", ["model", "state"]
)
BATCH_SIZE = Histogram(
    "sdswarm_batch_size", "Tasks run together in one pipeline call.", ["model"], buckets=_BATCHES
)
GPU_SECONDS = Histogram(
    "sdswarm_task_gpu_seconds",
    "Device seconds per task: a call's wall time shared among the tasks of its batch"
    " (CPU seconds on CPU workers). The sum over time is the device time spent.",
    ["model"],
    buckets=_SECONDS,
)
WORKER_COLD_START_PHASE = Gauge(
    "sdswarm_worker_cold_start_phase_seconds",
    "This worker's cold start, per phase (from the process's start; see coldstart.py).",
    ["model", "phase"],
)
WORKER_COMPILE_STATE = Gauge(
    "sdswarm_worker_compile_state",
    "1 for the compiled UNet's current state (SDSWARM_COMPILE: off, compiling, ready, failed).",
    ["model", "state"],
)
WORKER_COMPILED_SHAPES = Gauge(
    "sdswarm_worker_compiled_shapes", "Shapes the compiled UNet has ready.", ["model"]
)
WORKER_COMPILE_SECONDS = Gauge(
    "sdswarm_worker_compile_seconds", "Seconds the compiled UNet spent compiling.", ["model"]
)
WORKER_COMPILED_CALLS = Gauge(
    "sdswarm_worker_compiled_unet_calls",
    "UNet calls served by compiled graphs since the worker started (others ran eagerly).",
    ["model"],
)

# --- scheduler (the leading replica) -------------------------------------------------------
LEADER = Gauge("sdswarm_scheduler_leader", "1 while this scheduler replica acts (holds the lease).")
QUEUE_DEPTH = Gauge(
    "sdswarm_queue_depth", "Tasks queued and not yet fetched, per checkpoint.", ["model"]
)
IN_FLIGHT = Gauge(
    "sdswarm_tasks_in_flight", "Tasks fetched by workers and not yet acked.", ["model"]
)
OLDEST_WAIT = Gauge(
    "sdswarm_queue_oldest_wait_seconds",
    "Age of the oldest waiting task, per checkpoint (0 when none waits).",
    ["model"],
)
BUDGET = Gauge(
    "sdswarm_budget_slots", "The global GPU budget (SDSWARM_GPU_SLOTS); 0 on a standby replica."
)
SHARE = Gauge(
    "sdswarm_budget_share_slots", "Slots of the budget granted to each checkpoint.", ["model"]
)
PINNED = Gauge(
    "sdswarm_budget_pinned_slots",
    "Slots pinned by an operator (max_ack_pending set by hand), per checkpoint.",
    ["model"],
)
WORKERS = Gauge(
    "sdswarm_workers", "Live workers by state (their liveness records).", ["model", "state"]
)
REPLICAS = Gauge("sdswarm_worker_replicas", "Workers the backend runs, per checkpoint.", ["model"])
COLD_STARTS = Counter(
    "sdswarm_cold_starts",
    "Workers that became ready (counted once per worker while one scheduler leads).",
    ["model"],
)
COLD_START_SECONDS = Histogram(
    "sdswarm_cold_start_seconds",
    "Process start → ready of each new worker.",
    ["model"],
    buckets=_SECONDS,
)
COLD_START_PHASE = Histogram(
    "sdswarm_cold_start_phase_seconds",
    "Each new worker's cold start, per phase.",
    ["model", "phase"],
    buckets=_SECONDS,
)

# --- gateway ---------------------------------------------------------------------------------
SSE_CLIENTS = Gauge("sdswarm_sse_clients", "Open event streams (SSE) on this gateway.")
API_ERRORS = Counter(
    "sdswarm_api_errors", "Error answers by code and HTTP status.", ["code", "status"]
)
REQUEST_SECONDS = Histogram(
    "sdswarm_http_request_seconds",
    "Time to answer an API request, by route (sync requests include the generation).",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 600),
)

# --- storage service -------------------------------------------------------------------------
WEBHOOKS = Counter(
    "sdswarm_webhook_deliveries",
    "Webhook delivery attempts: delivered, failed (retried later) or gave_up.",
    ["outcome"],
)


def generate_latest() -> bytes:
    return _generate_latest(REGISTRY)


# --- hooks: one call each from the services ------------------------------------------------


def task_submitted(model_key: str) -> None:
    TASKS.labels(model_key, "waiting").inc()


def task_started(model_key: str) -> None:
    TASKS.labels(model_key, "running").inc()


ENDED_FIELDS = {"user": 1, "model_key": 1, "created_at": 1, "started_at": 1}
"""What the sink's terminal fold reads back of a task (fields the fold leaves alone)."""


def _seconds(later: Any, earlier: Any) -> float | None:
    if not isinstance(later, dt.datetime) or not isinstance(earlier, dt.datetime):
        return None
    if (later.tzinfo is None) != (earlier.tzinfo is None):
        later, earlier = later.replace(tzinfo=None), earlier.replace(tzinfo=None)
    seconds: float = (later - earlier).total_seconds()
    return max(seconds, 0.0)


def task_ended(before: Mapping[str, Any], status: str, at: float, code: str = "") -> None:
    """A task reached ``status`` (once): ``before`` is its document as it was."""
    model = str(before.get("model_key") or "")
    TASKS.labels(model, status).inc()
    if code:
        TASK_ERRORS.labels(model, code).inc()
    finished = dt.datetime.fromtimestamp(at, dt.UTC) if at else dt.datetime.now(dt.UTC)
    started, created = before.get("started_at"), before.get("created_at")
    wait = _seconds(started, created)
    if wait is not None:
        TASK_WAIT.labels(model).observe(wait)
    run = _seconds(finished, started)
    if run is not None:
        TASK_RUN.labels(model, status).observe(run)


class _WorkerClock:
    busy_since: float | None = None
    tasks: int = 0


_worker = _WorkerClock()


def worker_state(
    model_key: str, state: str, tasks: int, phases: Mapping[str, float] | None
) -> None:
    """A worker's state changed; ``tasks`` in hand. Busy → anything: one call ended."""
    from proto.workers import WorkerState

    now = time.monotonic()
    if _worker.busy_since is not None and _worker.tasks:
        share = (now - _worker.busy_since) / _worker.tasks
        for _ in range(_worker.tasks):
            GPU_SECONDS.labels(model_key).observe(share)
    _worker.busy_since, _worker.tasks = None, 0
    if state == WorkerState.BUSY and tasks:
        _worker.busy_since, _worker.tasks = now, tasks
        BATCH_SIZE.labels(model_key).observe(tasks)
    for each in WorkerState:
        WORKER_STATE.labels(model_key, each.value).set(1 if each.value == state else 0)
    if state == WorkerState.READY and phases:
        for phase, seconds in phases.items():
            WORKER_COLD_START_PHASE.labels(model_key, phase).set(seconds)


def worker_compile(model_key: str, status: CompileStatus) -> None:
    """The compiled UNet's progress, with each liveness record (``SDSWARM_COMPILE``)."""
    from proto.workers import CompileState

    for each in CompileState:
        WORKER_COMPILE_STATE.labels(model_key, each.value).set(each == status.state)
    WORKER_COMPILED_SHAPES.labels(model_key).set(len(status.ready))
    WORKER_COMPILE_SECONDS.labels(model_key).set(status.seconds)
    WORKER_COMPILED_CALLS.labels(model_key).set(status.calls)


def webhook(outcome: str) -> None:
    WEBHOOKS.labels(outcome).inc()


class _SchedulerView:
    """What the leading scheduler saw last: raw consumer counts, workers counted once."""

    def __init__(self) -> None:
        self.consumers: dict[str, tuple[int, int]] = {}
        self.seen_ready: set[str] = set()
        self.targets: list[dict[str, Any]] = []


_scheduler = _SchedulerView()
_SCHEDULER_GAUGES = (QUEUE_DEPTH, IN_FLIGHT, OLDEST_WAIT, SHARE, PINNED, WORKERS, REPLICAS)


def consumer_seen(model_key: str, pending: int | None, ack_pending: int | None) -> None:
    _scheduler.consumers[model_key] = (int(pending or 0), int(ack_pending or 0))


def scheduled(
    budget: int,
    loads: Iterable[CheckpointLoad],
    result: Plan,
    records: Iterable[WorkerStatus],
    replicas: Mapping[str, int],
) -> None:
    """One applied tick: every scheduler gauge is set afresh (gone checkpoints vanish)."""
    from proto.workers import WorkerState

    LEADER.set(1)
    BUDGET.set(budget)
    for gauge in _SCHEDULER_GAUGES:
        gauge.clear()
    for load in loads:
        pending, in_flight = _scheduler.consumers.get(load.key, (0, 0))
        QUEUE_DEPTH.labels(load.key).set(pending)
        IN_FLIGHT.labels(load.key).set(in_flight)
        OLDEST_WAIT.labels(load.key).set(load.oldest_wait_s)
        SHARE.labels(load.key).set(result.shares.get(load.key, load.share))
        if load.pinned is not None:
            PINNED.labels(load.key).set(load.pinned)
        REPLICAS.labels(load.key).set(replicas.get(load.key, 0))
        for state in WorkerState:
            WORKERS.labels(load.key, state.value).set(0)
    live: set[str] = set()
    targets = []
    for record in records:
        WORKERS.labels(record.model_key, record.state.value).inc()
        live.add(record.worker)
        if record.metrics_address:
            labels = {"model": record.model_key, "worker": record.worker}
            targets.append({"targets": [record.metrics_address], "labels": labels})
        ready = record.state in (WorkerState.READY, WorkerState.BUSY)
        if ready and record.load_phases and record.worker not in _scheduler.seen_ready:
            _scheduler.seen_ready.add(record.worker)
            COLD_STARTS.labels(record.model_key).inc()
            COLD_START_SECONDS.labels(record.model_key).observe(sum(record.load_phases.values()))
            for phase, seconds in record.load_phases.items():
                COLD_START_PHASE.labels(record.model_key, phase).observe(seconds)
    _scheduler.seen_ready &= live
    _scheduler.targets = targets


def stood_down() -> None:
    """This replica no longer leads: what it would report is the leader's to say."""
    LEADER.set(0)
    BUDGET.set(0)
    for gauge in _SCHEDULER_GAUGES:
        gauge.clear()
    _scheduler.consumers.clear()
    _scheduler.targets = []


def worker_targets() -> list[dict[str, Any]]:
    """Prometheus HTTP service discovery: the workers' metrics addresses."""
    return list(_scheduler.targets)


# --- the listener ------------------------------------------------------------------------------


def scrape_address(host: str, port: int) -> str:
    """Where Prometheus reaches a listener on ``host:port``. A wildcard: this host's own
    address (in a container, its address on its first network: Docker writes the
    hostname into ``/etc/hosts``), else its name."""
    if host not in ("", "0.0.0.0", "::"):
        return f"{host}:{port}"
    name = socket.gethostname()
    try:
        return f"{socket.gethostbyname(name)}:{port}"
    except OSError:
        return f"{name}:{port}"


async def metrics_response(_: web.Request) -> web.Response:
    from aiohttp import web

    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _targets(_: web.Request) -> web.Response:
    from aiohttp import web

    return web.json_response(worker_targets())


@contextlib.asynccontextmanager
async def listening(settings: BusSettings, what: str = "metrics") -> AsyncIterator[str | None]:
    """``/metrics`` and ``/targets`` on ``metrics_host:metrics_port`` while inside; yields
    the scrape address, or None when ``metrics_port`` is 0 (off). ``-1``: a free port."""
    if settings.metrics_port == 0:
        yield None
        return
    from aiohttp import web

    app = web.Application()
    app.router.add_get("/metrics", metrics_response)
    app.router.add_get("/targets", _targets)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.metrics_host, max(settings.metrics_port, 0))
        try:
            await site.start()
        except OSError as exc:
            from services.common.servers import PortInUseError

            raise PortInUseError(
                f"{what}: cannot listen on {settings.metrics_host}:{settings.metrics_port}"
                f" ({exc.strerror}): choose another SDSWARM_METRICS_PORT, or -1 for a free one"
            ) from exc
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        port = int(sockets[0].getsockname()[1]) if sockets else settings.metrics_port
        address = scrape_address(settings.metrics_host, port)
        _listening.append(address)
        log.info("%s: http://%s:%d/metrics", what, settings.metrics_host, port)
        try:
            yield address
        finally:
            _listening.remove(address)
    finally:
        await runner.cleanup()


_listening: list[str] = []


def listening_at() -> str:
    """The scrape address of this process's listener ('' when none)."""
    return _listening[-1] if _listening else ""


async def serving(settings: BusSettings, main: Awaitable[None], what: str) -> None:
    """Run a service's ``main`` with its metrics listener (when ``metrics_port`` is set)."""
    async with listening(settings, what):
        await main
