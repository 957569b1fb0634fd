"""Test doubles at the worker's pipeline boundary, and reading what reached the bus."""

from __future__ import annotations

from collections.abc import Callable

from nats.js import JetStreamContext

from proto import GenerateImage, names
from proto.events import TERMINAL_KINDS
from services.inference.pipeline import Generation, Inputs, StepCallback


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
