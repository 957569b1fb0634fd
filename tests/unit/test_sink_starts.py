"""Which write of its task a held start rides on (``TaskStore.begin``)."""

from __future__ import annotations

from nats.aio.msg import Msg

from proto.events import TaskEvent, TaskProgressed, TaskStarted
from services.storage.sink import _starts_riding, _superseded


def _message(event: TaskEvent) -> tuple[Msg, TaskEvent]:
    return Msg(_client=None, subject=f"sd.event.{event.task_id}"), event  # type: ignore[arg-type]


def _start(task_id: str = "t1", attempt: int = 1) -> tuple[Msg, TaskEvent]:
    return _message(TaskStarted(task_id=task_id, attempt=attempt))


def _step(
    step: int, *, task_id: str = "t1", attempt: int = 1, job_no: int = 0, skipped: bool = False
) -> tuple[Msg, TaskEvent]:
    return _message(
        TaskProgressed(
            task_id=task_id,
            attempt=attempt,
            job_no=job_no,
            step=step,
            total_steps=9,
            job_count=2,
            skipped=skipped,
        )
    )


def _carriers(over: set[str], *events: tuple[Msg, TaskEvent]) -> dict[TaskEvent, TaskEvent]:
    """Per event written with a start: that start."""
    fetched = list(events)
    riding = _starts_riding(fetched, _superseded(fetched), set(), over)
    by_id = {id(message): event for message, event in fetched}
    return {by_id[carrier]: riders[0][1] for carrier, riders in riding.items()}


def test_a_start_rides_on_its_latest_step_once_the_wait_is_over() -> None:
    start, first, latest = _start(), _step(1), _step(2)
    assert {latest[1]: start[1]} == _carriers({"t1"}, start, first, latest)


def test_a_start_waits_with_its_steps() -> None:
    assert {} == _carriers(set(), _start(), _step(1))


def test_a_skip_marker_written_at_once_carries_its_start() -> None:
    """The marker is written while the task waits: the start must not be left behind
    (a step written before its start would make the start's fields never land)."""
    start, marker = _start(), _step(3, skipped=True)
    assert {marker[1]: start[1]} == _carriers(set(), start, marker, _step(1, job_no=1))


def test_a_start_rides_only_on_its_own_task_and_attempt() -> None:
    assert {} == _carriers({"t1", "t2"}, _start(attempt=2), _step(1), _step(1, task_id="t2"))
