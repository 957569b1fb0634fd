"""Local-process worker backend: worker subprocesses on this machine.

Each worker is ``python -m services.inference`` with its settings in ``SDSWARM_*``
variables, forked from a server that has its imports done (``worker_preload``, see
forkserver.py) or started as a fresh interpreter. Crashed workers are reaped on every
reconcile and replaced while demand lasts; scale-down sends SIGTERM (the worker finishes
its step loop and naks or completes) and SIGKILL after a grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import msgspec

from proto.workers import WorkerStatus
from services.common.cores import compute_threads, usable_cores
from services.common.settings import PREFIX, StoreSettings
from services.common.supervise import die_with_parent
from services.scheduler.forkserver import ForkServer
from services.scheduler.settings import SchedulerSettings, max_batch
from services.storage.mongo import Document

log = logging.getLogger(__name__)
STOP_GRACE_S = 30.0


def worker_environ(settings: SchedulerSettings, model: Document) -> dict[str, str]:
    """The environment of a local worker for ``model``: ours plus its settings."""
    # Operators' SDSWARM_* settings reach the workers (e.g. SDSWARM_PREVIEW_INTERVAL_S);
    # connections and the checkpoint are then set from the scheduler's own view.
    env = (
        dict(os.environ)
        | worker_settings(settings, model)
        | {f"{PREFIX}PARENT_PID": str(os.getpid())}
    )
    return env | cpu_share(env, settings.gpu_slots, usable_cores())


def cpu_share(env: Mapping[str, str], slots: int, cores: int) -> dict[str, str]:
    """The compute threads of a local worker on the CPU: the cores shared by the workers
    the budget lets run at once, so that they do not outnumber the cores
    (:func:`~services.common.cores.compute_threads`). Nothing when the operator chose
    (``SDSWARM_CPU_THREADS``, also as a function's env, or ``OMP_NUM_THREADS``); a
    worker on a GPU does not use it."""
    if env.get(f"{PREFIX}CPU_THREADS", "0") not in ("", "0") or env.get("OMP_NUM_THREADS"):
        return {}
    return {f"{PREFIX}CPU_THREADS": str(compute_threads(cores, slots))}


def worker_settings(settings: SchedulerSettings, model: Document) -> dict[str, str]:
    """A worker's ``SDSWARM_*`` settings for ``model`` (any backend): connections, the
    function's own ``env``, then its checkpoint."""
    env: dict[str, str] = {}
    for name in StoreSettings.__struct_fields__:
        value = getattr(settings, name)
        env[PREFIX + name.upper()] = (
            value if isinstance(value, str) else msgspec.json.encode(value).decode()
        )
    # A function's own environment (POST /batch_update_sd_resource "env"), then ours.
    env |= {str(k): str(v) for k, v in ((model.get("function") or {}).get("env") or {}).items()}
    source = str(model.get("source") or "")
    from_store = source.startswith("object:")
    env |= {
        f"{PREFIX}MODEL_NAME": model["name"],
        f"{PREFIX}MODEL_KEY": model["model_key"],
        f"{PREFIX}CHECKPOINT_PATH": model["path"],
        f"{PREFIX}MODEL_HASH": (model.get("sha256") or "")[:10],
        f"{PREFIX}MODEL_SHA256": model.get("sha256") or "",
        # The file that hash describes: a worker hashes one renamed over it since.
        f"{PREFIX}MODEL_SIZE": str(model.get("size_bytes") or 0),
        f"{PREFIX}MODEL_MTIME": repr(float(model.get("mtime") or 0)),
        # Registered from the object store: nodes without the models folder fetch it.
        f"{PREFIX}MODEL_OBJECT": source.removeprefix("object:") if from_store else "",
        f"{PREFIX}CACHE_DIR": settings.cache_dir,
        f"{PREFIX}DEVICE": settings.device,
        f"{PREFIX}ALLOW_PICKLE": "true" if settings.allow_pickle else "false",
        f"{PREFIX}PREDICTION_TYPE": model.get("prediction_type") or "",
        f"{PREFIX}PREVIEW_DECODER_PATH": model.get("preview_decoder") or "",
        f"{PREFIX}MAX_BATCH": str(max_batch(settings, model)),
        f"{PREFIX}METRICS_PORT": str(settings.worker_metrics_port),
    }
    return env


class WorkerProcess(Protocol):
    """What the backend needs of a worker process: an ``asyncio.subprocess.Process`` or a
    :class:`~services.scheduler.forkserver.ForkedWorker`."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...

    async def wait(self) -> int: ...


@dataclass
class _Pool:
    processes: list[WorkerProcess] = field(default_factory=list)


class LocalBackend:
    def __init__(self, settings: SchedulerSettings, command: list[str] | None = None) -> None:
        self.settings = settings
        self.command = command or [sys.executable, "-m", "services.inference"]
        """The worker's command line (tests run stand-in workers)."""
        self.forks = ForkServer() if command is None and settings.worker_preload else None
        """Workers are forks of the preloaded server (forkserver.py), not this command."""
        self._pools: dict[str, _Pool] = {}
        self._gpu_of: dict[int, str] = {}
        """pid → the GPU it was given (``settings.gpus``)."""
        self.started = 0
        self.crashed = 0

    def _reap(self, key: str) -> list[WorkerProcess]:
        pool = self._pools.setdefault(key, _Pool())
        alive = []
        for process in pool.processes:
            if process.returncode is None:
                alive.append(process)
                continue
            self._gpu_of.pop(process.pid, None)
            if process.returncode != 0:
                self.crashed += 1
                log.warning("worker %s for %s exited with %s", process.pid, key, process.returncode)
        pool.processes = alive
        return alive

    def replicas(self) -> dict[str, int]:
        return {key: len(self._reap(key)) for key in list(self._pools)}

    async def reconcile(self) -> None:
        """Nothing to list: this process started every worker it has (reaped in replicas())."""

    async def replace(self, worker: WorkerStatus) -> bool:
        """Kill a hung worker of ours (SIGKILL: a stuck step never sees SIGTERM's flag);
        the next ensure() starts another while its checkpoint has demand."""
        for pool in self._pools.values():
            for process in pool.processes:
                if process.pid == worker.pid and process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    await process.wait()
                    log.warning("killed hung worker %s (pid %s)", worker.worker, process.pid)
                    return True
        return False

    async def step_down(self) -> None:
        """Another replica leads now and starts its own workers: ours hand back their tasks."""
        await self.aclose()

    async def ensure(self, model: Document, replicas: int) -> None:
        key = model["model_key"]
        alive = self._reap(key)
        while len(alive) < replicas:
            process = await self._spawn(model)
            if process is None:
                break
            alive.append(process)
        while len(alive) > replicas:
            await self._stop(alive.pop())

    def _free_gpu(self) -> str | None:
        for pool in self._pools.values():  # forget the GPUs of exited workers
            for process in pool.processes:
                if process.returncode is not None:
                    self._gpu_of.pop(process.pid, None)
        taken = set(self._gpu_of.values())
        return next((gpu for gpu in self.settings.gpus if gpu not in taken), None)

    async def _spawn(self, model: Document) -> WorkerProcess | None:
        env = worker_environ(self.settings, model)
        gpu = None
        if self.settings.gpus:
            # One GPU per worker: two workers on one GPU would fight over its memory.
            gpu = self._free_gpu()
            if gpu is None:
                log.warning(
                    "%s: no free GPU of %s for another worker",
                    model["model_key"],
                    ",".join(self.settings.gpus),
                )
                return None
            env["CUDA_VISIBLE_DEVICES"] = gpu
        log_path = Path(self.settings.worker_log_dir) / f"worker-{model['model_key']}.log"
        await asyncio.to_thread(log_path.parent.mkdir, parents=True, exist_ok=True)
        process: WorkerProcess | None = None
        if self.forks is not None:
            try:
                process = await self.forks.fork(env, str(log_path))
            except (RuntimeError, OSError) as exc:
                log.error("the fork server failed (%s): workers start as fresh processes", exc)
                await self.forks.aclose()
                self.forks = None
        if process is None:
            log_file = await asyncio.to_thread(open, log_path, "ab")
            with log_file:
                process = await asyncio.create_subprocess_exec(
                    *self.command,
                    env=env,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                    # Gone with the scheduler, even on its kill -9: its task is redelivered.
                    preexec_fn=die_with_parent(signal.SIGKILL),
                )
        self.started += 1
        if gpu is not None:
            self._gpu_of[process.pid] = gpu
        log.info("started worker %s for %s (GPU %s)", process.pid, model["model_key"], gpu or "-")
        return process

    async def _stop(self, process: WorkerProcess) -> None:
        if process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_GRACE_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        log.info("stopped worker %s", process.pid)

    async def aclose(self) -> None:
        processes = [p for pool in self._pools.values() for p in pool.processes]
        await asyncio.gather(*(self._stop(p) for p in processes))
        self._pools.clear()
        if self.forks is not None:
            await self.forks.aclose()
        log.info("local backend closed: %d started, %d crashed", self.started, self.crashed)
