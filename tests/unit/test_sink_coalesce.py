"""The sink writes only the newest progress of each task per fetch."""

from __future__ import annotations

from typing import Any, cast

from nats.aio.msg import Msg

from proto.events import TaskEvent, TaskProgressed, TaskStarted, TaskSucceeded
from services.storage.sink import _superseded, _with_previews


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


def test_the_step_kept_says_a_preview_of_its_fetch_exists() -> None:
    """Previews come every few steps: the step that had one is often superseded by a
    later one that had none, in the same fetch (the console then showed no preview)."""
    shown = TaskProgressed(task_id="a", step=1, total_steps=3, preview_key="p/a")
    events: list[TaskEvent] = [shown, _progress("a", 2), _progress("a", 1, attempt=2)]
    events += [_progress("b", 2)]
    pairs: list[tuple[Msg, Any]] = [(cast(Msg, object()), e) for e in events]
    carried = [e for _, e in _with_previews(pairs)]
    # The same attempt only (a new attempt renders its own); other tasks untouched.
    assert [
        shown,
        TaskProgressed(task_id="a", step=2, total_steps=3, preview_key="p/a"),
        _progress("a", 1, attempt=2),
        _progress("b", 2),
    ] == carried
