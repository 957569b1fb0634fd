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
from proto.commands import Txt2ImgTask
from proto.requests import Txt2ImgRequest
from services.common import bus
from services.inference.pipeline import Generation
from services.inference.settings import WorkerSettings
from services.inference.worker import Worker, sticky_cuda_error
from services.storage.objects import LocalObjectStore
from tests.fakes import FakePipeline

pytestmark = pytest.mark.integration


class BrokenGpu(FakePipeline):
    """A pipeline whose device failed the way a faulting kernel leaves it."""

    def answer(self, command: GenerateImage) -> Generation:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def _command(task_id: str, key: str, **fields: Any) -> Txt2ImgTask:
    request = Txt2ImgRequest(prompt="x", stable_diffusion_model="m")
    return Txt2ImgTask(
        task_id=task_id, user="u", model_name="m", model_key=key, request=request, **fields
    )


def test_which_errors_are_sticky() -> None:
    assert sticky_cuda_error(RuntimeError("CUDA error: device-side assert triggered"))
    assert not sticky_cuda_error(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not sticky_cuda_error(ValueError("illegal memory access in my own code"))


async def test_worker_hands_back_and_exits(nats_server: Any, tmp_path: Path) -> None:
    key = f"sticky-{secrets.token_hex(3)}"
    settings = WorkerSettings(
        model_name="m",
        model_key=key,
        checkpoint_path="",
        nats_url=nats_server.url,
        fetch_timeout_s=0.5,
    )
    nc = await bus.connect(nats_server.url, "sticky-test")
    js = nc.jetstream()
    await bus.ensure_streams(js, settings)
    objects = LocalObjectStore(tmp_path / "objects", "http://127.0.0.1", "s")
    worker = Worker(settings, nc, objects, BrokenGpu)
    task_id = secrets.token_hex(12)
    try:
        await bus.ensure_task_consumer(js, key, settings)
        command = _command(task_id, key)
        await js.publish(names.task_subject(key), encode(command), stream=names.TASK_STREAM)
        stop = asyncio.Event()
        await asyncio.wait_for(worker.run(stop), 60)  # returns: the worker stopped itself
        assert worker.fatal
        assert stop.is_set()
        assert 0 == worker.completed
        info = await js.consumer_info(names.TASK_STREAM, names.consumer_name(key))
        assert 1 == info.num_pending + info.num_ack_pending, "the task is back in the queue"
        with pytest.raises(NotFoundError):  # neither failed nor finished: handed back
            await js.get_last_msg(names.EVENT_STREAM, names.event_subject(task_id, "failed"))
    finally:
        await nc.close()


async def test_a_command_from_a_newer_gateway_fails_its_task_saying_so(
    nats_server: Any, tmp_path: Path
) -> None:
    """A worker never runs a command of a schema version it does not know: the task ends
    ``failed`` (``schema_unsupported``, naming both versions) and the message is acked."""
    from proto.commands import SCHEMA_VERSION
    from proto.events import TaskFailed, decode_event

    key = f"newer-{secrets.token_hex(3)}"
    settings = WorkerSettings(
        model_name="m", model_key=key, checkpoint_path="", nats_url=nats_server.url
    )
    nc = await bus.connect(nats_server.url, "newer-test")
    js = nc.jetstream()
    await bus.ensure_streams(js, settings)
    objects = LocalObjectStore(tmp_path / "objects", "http://127.0.0.1", "s")
    worker = Worker(settings, nc, objects, BrokenGpu)  # never called: nothing runs
    task_id = secrets.token_hex(12)
    try:
        await bus.ensure_task_consumer(js, key, settings)
        command = _command(task_id, key, schema_version=SCHEMA_VERSION + 1)
        ack = await js.publish(names.task_subject(key), encode(command), stream=names.TASK_STREAM)
        subscription = await js.pull_subscribe_bind(names.consumer_name(key), names.TASK_STREAM)
        [message] = await subscription.fetch(1, timeout=10)
        assert ack.seq == message.metadata.sequence.stream
        await worker.handle(message)
        stored = await js.get_last_msg(names.EVENT_STREAM, names.event_subject(task_id, "failed"))
        event = decode_event(stored.data or b"")
        assert isinstance(event, TaskFailed)
        assert "schema_unsupported" == event.code
        assert f"schema version {SCHEMA_VERSION + 1}" in event.message
        assert 0 == worker.completed
        info = await js.consumer_info(names.TASK_STREAM, names.consumer_name(key))
        assert 0 == info.num_pending + info.num_ack_pending, "acked: not retried"
    finally:
        await nc.close()
