"""How a worker reports a running task's steps, on a real bus: every step is published,
in order and stamped with its own time, without waking the event loop once per step
(each wake cost the pipeline thread about 0.3 ms of the interpreter)."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.msg import Msg

from proto import GenerateImage, names
from proto.codec import encode
from proto.events import TaskProgressed, decode_event
from services.common import bus
from services.inference.pipeline import Generation, Inputs, StepCallback
from tests.fakes import FakePipeline, OnBus, worker_on_bus

pytestmark = pytest.mark.integration

STEPS = 40


class Stepping(FakePipeline):
    """Reports ``STEPS`` steps from the pipeline thread, a millisecond apart."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def generate(
        self,
        command: GenerateImage,
        inputs: Inputs,
        on_step: StepCallback,
        should_stop: Callable[[], bool],
        should_skip: Callable[[], bool] = lambda: False,
    ) -> Generation:
        for step in range(1, STEPS + 1):
            time.sleep(0.001)
            self.times.append(time.time())
            on_step(0, step, STEPS, None)
        return Generation(seeds=[1], images=[b"png"])


async def _one_task(on: OnBus) -> tuple[str, Msg]:
    """A task queued for the worker, and its message as the worker fetches it."""
    on.worker._cancels = await bus.cancel_bucket(on.js, on.settings)  # as run() sets it up
    task_id = secrets.token_hex(12)
    await bus.ensure_task_consumer(on.js, on.key, on.settings)
    await on.js.publish(
        names.task_subject(on.key), encode(on.command(task_id)), stream=names.TASK_STREAM
    )
    subscription = await on.js.pull_subscribe_bind(names.consumer_name(on.key), names.TASK_STREAM)
    [message] = await subscription.fetch(1, timeout=10)
    return task_id, message


async def test_every_step_is_published_in_order_without_a_wake_per_step(
    nats_server: Any, tmp_path: Path
) -> None:
    pipeline = Stepping()
    async with worker_on_bus(nats_server.url, tmp_path, lambda: pipeline) as on:
        js, worker = on.js, on.worker
        task_id, message = await _one_task(on)

        loop = asyncio.get_running_loop()
        wakes = 0
        original = loop.call_soon_threadsafe

        def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal wakes
            wakes += 1
            return original(*args, **kwargs)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign,assignment]
        try:
            await worker.handle_batch([message])
        finally:
            del loop.call_soon_threadsafe
        await asyncio.wait_for(worker.drain_outputs(), 30)
        # The thread pool's own hand-overs (the call's end), none per step.
        assert wakes <= 3, f"{wakes} wake-ups of the loop for {STEPS} steps"

        events = await js.pull_subscribe(
            names.event_subject(task_id, "progress"), stream=names.EVENT_STREAM
        )
        published = [decode_event(m.data) for m in await events.fetch(STEPS, timeout=10)]
        assert all(isinstance(e, TaskProgressed) for e in published)
        steps = [e for e in published if isinstance(e, TaskProgressed)]
        assert list(range(1, STEPS + 1)) == [e.step for e in steps]
        # Stamped when the pipeline thread reported them, not when they were published.
        assert all(abs(e.at - at) < 0.001 for e, at in zip(steps, pipeline.times, strict=True)), [
            (e.at, at) for e, at in zip(steps, pipeline.times, strict=True)
        ][:5]
