"""Helpers of the scheduler's integration tests."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext

from proto import ModelType, names
from services.common import bus
from services.scheduler.app import Scheduler
from services.scheduler.local import LocalBackend
from services.scheduler.settings import SchedulerSettings
from services.storage.models import ModelStore, model_document
from services.storage.mongo import Document
from services.storage.tasks import TaskStore


def checkpoint(name: str) -> Document:
    """A registered checkpoint whose file no worker will load (stand-in workers)."""
    return model_document(
        name=name,
        model_type=ModelType.STABLE_DIFFUSION,
        path="/nonexistent.safetensors",
        family="sd1",
        size_bytes=1,
    )


def stand_in_worker(folder: Path, name: str, source: str) -> list[str]:
    """The command line of a stand-in worker process running ``source``."""
    script = folder / f"{name}.py"
    script.write_text(source)
    return [sys.executable, str(script)]


def scheduler_settings(
    nats_url: str, mongo_url: str, db: Any, folder: Path, **overrides: Any
) -> SchedulerSettings:
    """A scheduler's settings on these servers and database, its files under ``folder``."""
    return SchedulerSettings(
        nats_url=nats_url,
        mongodb_url=mongo_url,
        mongodb_db=db.name,
        worker_log_dir=str(folder / "logs"),
        cache_dir=str(folder / "cache"),
        **overrides,
    )


@dataclass
class Scheduling:
    """A scheduler on real servers whose local backend runs a stand-in worker, with one
    task queued for its checkpoint."""

    scheduler: Scheduler
    backend: LocalBackend
    models: ModelStore
    js: JetStreamContext
    task_seq: int
    """The queued task's stream sequence."""


async def scheduling_a_task(
    stack: contextlib.AsyncExitStack,
    settings: SchedulerSettings,
    db: Any,
    model: Document,
    command: list[str],
) -> Scheduling:
    """Register ``model`` in ``db``, queue a task for it and make a scheduler whose
    backend starts ``command``; ``stack`` closes the connection and stops the workers."""
    models = ModelStore(db)
    await models.upsert(model)
    nc = await bus.connect(settings.nats_url, "scheduling-test")
    stack.push_async_callback(nc.close)
    js = nc.jetstream()
    await bus.ensure_streams(js, settings)
    ack = await js.publish(names.task_subject(model["model_key"]), b"{}")
    backend = LocalBackend(settings, command=command)
    stack.push_async_callback(backend.aclose)
    scheduler = Scheduler(settings, js, models, backend, TaskStore(db))
    return Scheduling(scheduler, backend, models, js, ack.seq)
