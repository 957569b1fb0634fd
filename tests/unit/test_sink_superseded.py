"""Which progress events of one fetch the sink need not write (a later one covers them)."""

from __future__ import annotations

from nats.aio.msg import Msg

from proto.events import TaskEvent, TaskProgressed
from services.storage.sink import _superseded


def _step(job_no: int, step: int, skipped: bool = False) -> tuple[Msg, TaskEvent]:
    event = TaskProgressed(task_id="t1", job_no=job_no, step=step, total_steps=9, skipped=skipped)
    return Msg(_client=None, subject="sd.event.t1.progress"), event  # type: ignore[arg-type]


def _written(*events: tuple[Msg, TaskEvent]) -> list[TaskEvent]:
    gone = _superseded(list(events))
    return [event for message, event in events if id(message) not in gone]


def test_only_a_tasks_latest_step_is_written() -> None:
    assert [_step(0, 3)[1]] == _written(_step(0, 2), _step(0, 3))


def test_a_skip_marker_covers_its_step() -> None:
    assert [_step(0, 3, skipped=True)[1]] == _written(_step(0, 3), _step(0, 3, skipped=True))


def test_a_skip_marker_is_written_though_the_next_job_came_with_it() -> None:
    """Progress says ``skipped`` until the next job's step is shown (it waits a moment
    for company): a fetch holding both must not drop the marker (CI saw 0 of 134
    progress reads say ``skipped``)."""
    marker, next_job = _step(0, 3, skipped=True), _step(1, 1)
    assert [marker[1], next_job[1]] == _written(marker, next_job)
