"""Test doubles at the worker's pipeline boundary, a worker on a real bus around them,
and reading what reached the bus."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext

from proto import GenerateImage, names
from proto.commands import Txt2ImgTask
from proto.events import TERMINAL_KINDS
from proto.requests import Txt2ImgRequest
from services.common import bus
from services.inference.pipeline import Generation, Inputs, Pipeline, StepCallback
from services.inference.settings import WorkerSettings
from services.inference.worker import Worker
from services.storage.objects import LocalObjectStore


class FakePipeline:
    """A pipeline (``services.inference.pipeline.Pipeline``) whose outcome is
    :meth:`answer`'s, without a model."""

    def generate(
        self,
        command: GenerateImage,
        inputs: Inputs,
        on_step: StepCallback,
        should_stop: Callable[[], bool],
        should_skip: Callable[[], bool] = lambda: False,
    ) -> Generation:
        return self.answer(command)

    def answer(self, command: GenerateImage) -> Generation:
        raise NotImplementedError


async def ends_stored(js: JetStreamContext, task_id: str) -> int:
    """How many terminal events of the task the event stream holds."""
    ends = 0
    for kind in TERMINAL_KINDS:
        info = await js.stream_info(
            names.EVENT_STREAM, subjects_filter=names.event_subject(task_id, kind)
        )
        ends += sum((info.state.subjects or {}).values())
    return ends


@dataclass(frozen=True)
class OnBus:
    worker: Worker
    js: JetStreamContext
    key: str
    """The checkpoint's key: its subject and consumer."""
    settings: WorkerSettings

    def command(self, task_id: str, **fields: Any) -> Txt2ImgTask:
        request = Txt2ImgRequest(prompt="x", stable_diffusion_model="m")
        return Txt2ImgTask(
            task_id=task_id, user="u", model_name="m", model_key=self.key, request=request, **fields
        )


@contextlib.asynccontextmanager
async def worker_on_bus(
    nats_url: str, folder: Path, pipeline: Callable[[], Pipeline], **settings: Any
) -> AsyncIterator[OnBus]:
    """A worker of a checkpoint of its own (``run()`` not started), on real streams, with
    ``pipeline`` as its model and a local object store under ``folder``."""
    key = f"w-{secrets.token_hex(4)}"
    worker_settings = WorkerSettings(
        model_name="m", model_key=key, checkpoint_path="", nats_url=nats_url, **settings
    )
    nc = await bus.connect(nats_url, f"test-{key}")
    try:
        js = nc.jetstream()
        await bus.ensure_streams(js, worker_settings)
        objects = LocalObjectStore(folder / "objects", "http://127.0.0.1", "s")
        yield OnBus(Worker(worker_settings, nc, objects, pipeline), js, key, worker_settings)
    finally:
        await nc.close()
