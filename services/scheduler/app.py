"""The scheduler's control loop (minimal: one worker per checkpoint with work).

Every tick: make sure each registered checkpoint has its consumer, read its backlog,
and keep one worker running while it has queued or in-flight tasks; a checkpoint idle
for ``idle_timeout_s`` goes to zero. The global GPU budget and weighted shares come
with the scheduler issue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from nats.js import JetStreamContext

from proto import ModelType, names
from services.common import bus
from services.scheduler.local import LocalBackend
from services.scheduler.settings import SchedulerSettings
from services.storage.models import ModelStore

log = logging.getLogger(__name__)


async def backlog(js: JetStreamContext, model_key: str) -> int:
    info = await js.consumer_info(names.TASK_STREAM, names.consumer_name(model_key))
    return int(info.num_pending or 0) + int(info.num_ack_pending or 0)


class Scheduler:
    def __init__(
        self,
        settings: SchedulerSettings,
        js: JetStreamContext,
        models: ModelStore,
        backend: LocalBackend,
    ) -> None:
        self.settings = settings
        self.js = js
        self.models = models
        self.backend = backend
        self._last_demand: dict[str, float] = {}

    async def tick(self) -> None:
        now = time.monotonic()
        current = self.backend.replicas()
        for model in await self.models.list(ModelType.STABLE_DIFFUSION):
            key = model["model_key"]
            if model.get("status") == "failed":
                continue
            await bus.ensure_task_consumer(self.js, key, self.settings)
            if await backlog(self.js, key) > 0:
                self._last_demand[key] = now
                desired = 1
            elif now - self._last_demand.get(key, -1e9) < self.settings.idle_timeout_s:
                desired = current.get(key, 0)
            else:
                desired = 0
            await self.backend.ensure(model, desired)

    async def run(self, stop: asyncio.Event) -> None:
        await bus.ensure_streams(self.js, self.settings)
        while not stop.is_set():
            try:
                await self.tick()
            except Exception:
                # A failed tick (NATS or MongoDB briefly away) must not end scheduling.
                log.exception("scheduler tick failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.poll_interval_s)
