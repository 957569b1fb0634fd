"""The storage service: everything that keeps MongoDB true to the bus, in one process.

- the event sink (task events → task documents);
- the dead-letter handler (tasks JetStream gave up on end ``failed`` with a reason);
- the reconciler (tasks whose publish never landed or whose message was lost);
- the models-folder scanner (dropped-in and removed files);
- the webhook dispatcher, only while webhooks are on (``webhook_allow_hosts``).

``sdswarm storage`` runs it on its own (Swarm: one or more replicas; every part is
idempotent); ``sdswarm up`` runs the same tasks inside the embedded system.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from nats.aio.client import Client
from pymongo.asynchronous.database import AsyncDatabase

from services.common import bus, logs, metrics
from services.common.settings import StoreSettings, from_environ
from services.common.supervise import stop_on_signals, supervised
from services.storage.deadletters import run_dead_letters
from services.storage.models import ModelStore
from services.storage.mongo import Document
from services.storage.reconcile import run_reconciler
from services.storage.scan import register_models, run_drains, run_scanner
from services.storage.sink import run_sink
from services.storage.stores import open_stores
from services.storage.tasks import TaskStore
from services.storage.webhooks import Dispatcher

log = logging.getLogger(__name__)


def storage_parts(
    settings: StoreSettings,
    nc: Client,
    db: AsyncDatabase[Document],
    stop: asyncio.Event,
) -> dict[str, Callable[[], Coroutine[Any, Any, None]]]:
    """The storage parts by name, each a coroutine factory (a restart calls it again).

    With webhooks off (no ``webhook_allow_hosts``, the default) the gateway refuses a
    task that names one, so the dispatcher does not run: it would fetch, decode and ack
    every event for nothing. Its durable consumer, if an earlier run made one, keeps its
    place; once webhooks are on again it delivers from there (within the stream's age
    limit) the events of tasks accepted while they were on.
    """
    js = nc.jetstream()
    models, tasks = ModelStore(db), TaskStore(db)
    models.reads.announce = bus.registry_notice(nc)  # registrations, for the gateways
    parts = {
        "storage sink": lambda: run_sink(nc, tasks, stop),
        "dead letters": lambda: run_dead_letters(nc, db, stop),
        "reconciler": lambda: run_reconciler(
            js,
            tasks,
            stop,
            interval_s=settings.reconcile_interval_s,
            grace_s=settings.reconcile_grace_s,
            lost_after_s=settings.lost_after_s,
            max_errors=settings.reconcile_max_errors,
        ),
        "webhooks": lambda: Dispatcher(nc, db, settings).run(stop),
        "model drains": lambda: run_drains(Path(settings.models_dir), models, tasks, stop),
        "model scanner": lambda: run_scanner(
            Path(settings.models_dir),
            models,
            stop,
            settings.model_scan_interval_s,
            settings.allow_pickle,
        ),
    }
    if not settings.webhook_allow_hosts:
        log.info("webhooks are off (no SDSWARM_WEBHOOK_ALLOW_HOSTS): no webhook dispatcher")
        del parts["webhooks"]
    return parts


def start_storage_tasks(
    settings: StoreSettings,
    nc: Client,
    db: AsyncDatabase[Document],
    stop: asyncio.Event,
) -> list[asyncio.Task[None]]:
    """Start the storage parts, each supervised (restarted on error) until ``stop``."""
    return [
        asyncio.create_task(supervised(name, run, stop), name=name.replace(" ", "-"))
        for name, run in storage_parts(settings, nc, db, stop).items()
    ]


async def serve(settings: StoreSettings) -> None:
    stop = stop_on_signals()
    async with contextlib.AsyncExitStack() as stack:
        stores = await open_stores(stack, settings)
        nc = await bus.connect(settings.nats_url, "sdswarm-storage", settings)
        stack.push_async_callback(nc.drain)
        # Gateways already running forget what they knew of the models folder.
        stores.models.reads.announce = bus.registry_notice(nc)
        await register_models(Path(settings.models_dir), stores.models, settings.allow_pickle)
        js = nc.jetstream()
        await bus.ensure_streams(js, settings)
        running = start_storage_tasks(settings, nc, stores.db, stop)
        log.info("storage service running (models folder %s)", settings.models_dir)
        await stop.wait()
        await asyncio.gather(*running, return_exceptions=True)


def main() -> None:
    settings = from_environ(StoreSettings)
    logs.setup(settings)
    asyncio.run(metrics.serving(settings, serve(settings), "storage metrics"))
