"""``sdswarm scheduler`` (or ``python -m services.scheduler``): the scheduler as a service.

Several replicas may run; the one holding the lease in KV bucket ``sd_leader`` acts,
the others wait to take over. ``SDSWARM_SCHEDULER_BACKEND`` picks where workers run:
``local`` (processes on this machine) or ``swarm`` (one Docker Swarm service per
checkpoint, through the Docker Engine API at ``SDSWARM_DOCKER_URL``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from services.common import bus, logs, metrics
from services.common.settings import from_environ
from services.common.supervise import stop_on_signals
from services.scheduler.app import Backend, Scheduler
from services.scheduler.lease import Lease
from services.scheduler.settings import SchedulerSettings
from services.storage.stores import open_stores

log = logging.getLogger("sdswarm.scheduler")


async def open_backend(settings: SchedulerSettings, stack: contextlib.AsyncExitStack) -> Backend:
    match settings.scheduler_backend:
        case "local":
            from services.scheduler.local import LocalBackend

            local = LocalBackend(settings)
            stack.push_async_callback(local.aclose)
            return local
        case "swarm":
            from services.scheduler.swarm import SwarmBackend

            swarm = SwarmBackend(settings)
            stack.push_async_callback(swarm.aclose)
            return swarm
    raise SystemExit(
        f"invalid setting: SDSWARM_SCHEDULER_BACKEND={settings.scheduler_backend!r}"
        " (local or swarm)"
    )


async def serve(settings: SchedulerSettings) -> None:
    stop = stop_on_signals()
    async with contextlib.AsyncExitStack() as stack:
        stores = await open_stores(stack, settings)
        models, tasks = stores.models, stores.tasks
        nc = await bus.connect(settings.nats_url, "sdswarm-scheduler", settings)
        stack.push_async_callback(nc.drain)
        js = nc.jetstream()
        models.reads.announce = bus.registry_notice(nc)  # the model status, for gateways
        backend = await open_backend(settings, stack)
        lease = Lease(js, settings.lease_ttl_s, replicas=settings.stream_replicas)
        scheduler = Scheduler(settings, js, models, backend, tasks, lease)
        log.info(
            "scheduler %s: %s backend, budget %d slots; waiting for the lease",
            lease.holder,
            settings.scheduler_backend,
            settings.gpu_slots,
        )
        await scheduler.run(stop)


def main() -> None:
    settings = from_environ(SchedulerSettings)
    logs.setup(settings)
    asyncio.run(metrics.serving(settings, serve(settings), "scheduler metrics"))


if __name__ == "__main__":
    main()
