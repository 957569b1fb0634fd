"""Task events, past tense, published to ``sd.event.<task_id>.<kind>`` on ``SD_EVENTS``.

One subject family carries several types, so they form a tagged union decoded by one
typed decoder. Every event carries the delivery ``attempt`` that produced it: the fold
into MongoDB is fenced by it, so a late event of an older attempt never overwrites a
newer one.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import Struct


class _Event(Struct, kw_only=True, frozen=True, omit_defaults=True, tag_field="kind"):
    task_id: str
    attempt: int = 1
    """JetStream delivery count of the command that produced this event."""
    at: float = 0.0
    """Unix time the event happened (worker clock)."""
    worker: str = ""


class TaskStarted(_Event, tag="started", kw_only=True, frozen=True, omit_defaults=True):
    model_key: str = ""
    stream_seq: int = 0
    """The command's sequence in ``SD_TASKS`` (0: not said). The fold records it on the
    task, so the gateway's own record of it (for the reconciler) is needed only for a
    task that has not started yet."""


class TaskProgressed(_Event, tag="progress", kw_only=True, frozen=True, omit_defaults=True):
    step: int
    """Sampling steps done in the current job (1-based after the first step)."""
    total_steps: int
    job_no: int = 0
    """Index of the current job (one job per ``n_iter`` batch), 0-based as in A1111."""
    job_count: int = 1
    progress: float = 0.0
    """Fraction of the whole task done, 0..1."""
    eta_seconds: float | None = None
    preview_key: str | None = None
    """Object key of a small preview image, when previews are on."""
    skipped: bool = False
    """A1111's skip ended job ``job_no`` after ``step`` (its images are dropped; the task
    goes on with the next job, whose first progress clears the mark)."""


class TaskSucceeded(_Event, tag="succeeded", kw_only=True, frozen=True, omit_defaults=True):
    images: list[str]
    """Object keys of the output images, in order."""
    info: str = ""
    """A1111's ``info``: a JSON string (seeds, infotexts, sampler …)."""
    seeds: list[int] = []


class TaskFailed(_Event, tag="failed", kw_only=True, frozen=True, omit_defaults=True):
    code: str
    """Stable machine-readable code, e.g. ``model_load_failed``, ``max_deliveries``."""
    message: str
    retryable: bool = False


class TaskCancelled(_Event, tag="cancelled", kw_only=True, frozen=True, omit_defaults=True):
    reason: str = "cancelled by user"


TaskEvent = TaskStarted | TaskProgressed | TaskSucceeded | TaskFailed | TaskCancelled
TERMINAL_EVENTS = (TaskSucceeded, TaskFailed, TaskCancelled)

_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[TaskEvent] = msgspec.json.Decoder(TaskEvent)


def event_kind(event: TaskEvent) -> str:
    """The tag, also the last subject token: ``sd.event.<task_id>.<kind>``."""
    tag = type(event).__struct_config__.tag
    assert isinstance(tag, str)
    return tag


TERMINAL_KINDS: tuple[str, ...] = tuple(str(kind.__struct_config__.tag) for kind in TERMINAL_EVENTS)
"""The kinds (subject tokens) of the events that end a task: the terminal statuses."""


def encode_event(event: TaskEvent) -> bytes:
    return _encoder.encode(event)


def decode_event(data: bytes) -> TaskEvent:
    return _decoder.decode(data)


def event_to_builtins(event: TaskEvent) -> dict[str, Any]:
    out = msgspec.to_builtins(event)
    assert isinstance(out, dict)
    return out
