"""A sticky CUDA error (the context is unusable) makes the worker hand its task back at
once and exit non-zero, instead of failing the task or taking more work."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Any

import pytest
from nats.js.errors import NotFoundError

from proto import GenerateImage, names
from proto.codec import encode
from services.common import bus
from services.inference.pipeline import Generation
from services.inference.worker import sticky_cuda_error
from tests.fakes import FakePipeline, worker_on_bus

pytestmark = pytest.mark.integration


class BrokenGpu(FakePipeline):
    """A pipeline whose device failed the way a faulting kernel leaves it."""

    def answer(self, command: GenerateImage) -> Generation:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_which_errors_are_sticky() -> None:
    assert sticky_cuda_error(RuntimeError("CUDA error: device-side assert triggered"))
    assert not sticky_cuda_error(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not sticky_cuda_error(ValueError("illegal memory access in my own code"))


async def test_worker_hands_back_and_exits(nats_server: Any, tmp_path: Path) -> None:
    async with worker_on_bus(nats_server.url, tmp_path, BrokenGpu, fetch_timeout_s=0.5) as on:
        js, worker = on.js, on.worker
        task_id = secrets.token_hex(12)
        await bus.ensure_task_consumer(js, on.key, on.settings)
        command = on.command(task_id)
        await js.publish(names.task_subject(on.key), encode(command), stream=names.TASK_STREAM)
        stop = asyncio.Event()
        await asyncio.wait_for(worker.run(stop), 60)  # returns: the worker stopped itself
        assert worker.fatal
        assert stop.is_set()
        assert 0 == worker.completed
        info = await js.consumer_info(names.TASK_STREAM, names.consumer_name(on.key))
        assert 1 == info.num_pending + info.num_ack_pending, "the task is back in the queue"
        with pytest.raises(NotFoundError):  # neither failed nor finished: handed back
            await js.get_last_msg(names.EVENT_STREAM, names.event_subject(task_id, "failed"))


async def test_a_command_from_a_newer_gateway_fails_its_task_saying_so(
    nats_server: Any, tmp_path: Path
) -> None:
    """A worker never runs a command of a schema version it does not know: the task ends
    ``failed`` (``schema_unsupported``, naming both versions) and the message is acked."""
    from proto.commands import SCHEMA_VERSION
    from proto.events import TaskFailed, decode_event

    # BrokenGpu is never called: nothing runs.
    async with worker_on_bus(nats_server.url, tmp_path, BrokenGpu) as on:
        js, worker = on.js, on.worker
        task_id = secrets.token_hex(12)
        await bus.ensure_task_consumer(js, on.key, on.settings)
        command = on.command(task_id, schema_version=SCHEMA_VERSION + 1)
        subject = names.task_subject(on.key)
        ack = await js.publish(subject, encode(command), stream=names.TASK_STREAM)
        subscription = await js.pull_subscribe_bind(names.consumer_name(on.key), names.TASK_STREAM)
        [message] = await subscription.fetch(1, timeout=10)
        assert ack.seq == message.metadata.sequence.stream
        await worker.handle(message)
        stored = await js.get_last_msg(names.EVENT_STREAM, names.event_subject(task_id, "failed"))
        event = decode_event(stored.data or b"")
        assert isinstance(event, TaskFailed)
        assert "schema_unsupported" == event.code
        assert f"schema version {SCHEMA_VERSION + 1}" in event.message
        assert 0 == worker.completed
        info = await js.consumer_info(names.TASK_STREAM, names.consumer_name(on.key))
        assert 0 == info.num_pending + info.num_ack_pending, "acked: not retried"
