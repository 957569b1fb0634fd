"""A task the bus hands out twice ends once.

A nats-server killed with kill -9 can lose a consumer's last acks and delivery counts
and hand out again a task that is running or has just ended, under another delivery
count. Both attempts run to the end; the event stream must keep one end (the chaos
suite counts a second as a duplicate), and both messages must be acked."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Any

import pytest

from proto import GenerateImage, names
from proto.codec import encode
from proto.commands import Txt2ImgTask
from proto.requests import Txt2ImgRequest
from services.common import bus
from services.inference.pipeline import Generation
from services.inference.settings import WorkerSettings
from services.inference.worker import Worker
from services.storage.objects import LocalObjectStore
from tests.fakes import FakePipeline, ends_stored

pytestmark = pytest.mark.integration


class Instant(FakePipeline):
    """Answers at once with one tiny image."""

    def answer(self, command: GenerateImage) -> Generation:
        return Generation(seeds=[1], images=[b"png"])


async def test_two_attempts_running_at_once_end_the_task_once(
    nats_server: Any, tmp_path: Path
) -> None:
    key = f"twice-{secrets.token_hex(3)}"
    settings = WorkerSettings(
        model_name="m", model_key=key, checkpoint_path="", nats_url=nats_server.url
    )
    nc = await bus.connect(nats_server.url, "twice-test")
    js = nc.jetstream()
    await bus.ensure_streams(js, settings)
    objects = LocalObjectStore(tmp_path / "objects", "http://127.0.0.1", "s")
    worker = Worker(settings, nc, objects, Instant)
    worker._cancels = await bus.cancel_bucket(js, settings)  # as run() sets it up
    task_id = secrets.token_hex(12)
    request = Txt2ImgRequest(prompt="x", stable_diffusion_model="m")
    command = Txt2ImgTask(task_id=task_id, user="u", model_name="m", model_key=key, request=request)
    try:
        await bus.ensure_task_consumer(js, key, settings, max_ack_pending=4)
        # The same task twice on the queue, as a consumer that lost its state hands it out.
        for copy in ("a", "b"):
            await js.publish(
                names.task_subject(key),
                encode(command),
                stream=names.TASK_STREAM,
                headers={names.MSG_ID_HEADER: f"{task_id}-{copy}"},
            )
        subscription = await js.pull_subscribe_bind(names.consumer_name(key), names.TASK_STREAM)
        first, second = await subscription.fetch(2, timeout=10)
        await second.nak()
        [again] = await subscription.fetch(1, timeout=10)
        assert (1, 2) == (first.metadata.num_delivered, again.metadata.num_delivered)
        # Held together: neither end is out when the other is admitted, so both run.
        await worker.handle_batch([first, again])
        await asyncio.wait_for(worker.drain_outputs(), 30)
        assert 1 == await ends_stored(js, task_id)
        info = await js.consumer_info(names.TASK_STREAM, names.consumer_name(key))
        assert 0 == info.num_pending + info.num_ack_pending, "both messages acked"
    finally:
        await nc.close()
