"""The sink writes only the newest progress of each task per fetch."""

from __future__ import annotations

from typing import Any, cast

from nats.aio.msg import Msg

from proto.events import TaskEvent, TaskProgressed, TaskStarted, TaskSucceeded
from services.storage.sink import _superseded


def _progress(task: str, step: int, attempt: int = 1) -> TaskProgressed:
    return TaskProgressed(task_id=task, attempt=attempt, step=step, total_steps=3)


def test_only_the_progress_the_fold_keeps_is_written() -> None:
    events: list[TaskEvent] = [
        TaskStarted(task_id="a"),
        _progress("a", 1),
        _progress("b", 1),
        _progress("a", 2),
        _progress("a", 1, attempt=2),
        _progress("b", 2),
        TaskSucceeded(task_id="b", images=[]),
        _progress("a", 3),
    ]
    messages = [cast(Msg, object()) for _ in events]
    pairs: list[tuple[Msg, Any]] = list(zip(messages, events, strict=True))
    dropped = _superseded(pairs)
    kept = [event for message, event in pairs if id(message) not in dropped]
    # A later attempt outranks any step of an earlier one; out of order arrivals too.
    assert [
        TaskStarted(task_id="a"),
        _progress("a", 1, attempt=2),
        _progress("b", 2),
        TaskSucceeded(task_id="b", images=[]),
    ] == kept
    reordered: list[tuple[Msg, Any]] = [
        (cast(Msg, object()), e) for e in (_progress("c", 2), _progress("c", 1))
    ]
    dropped = _superseded(reordered)
    assert [_progress("c", 2)] == [e for m, e in reordered if id(m) not in dropped]
