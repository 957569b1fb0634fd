"""Hung-worker detection: alive, holding a task, no step for longer than the limit."""

from proto.workers import WorkerState, WorkerStatus
from services.scheduler.hung import ALIVE_S, StepWatch

LIMIT = 60.0


def _busy(task: str = "t1", step: float | None = 100.0, beat: float = 0.0) -> WorkerStatus:
    return WorkerStatus(
        worker="w1",
        model_key="m-000000",
        model_name="m",
        state=WorkerState.BUSY,
        task_id=task,
        last_step_at=step,
        updated_at=beat,
    )


def test_a_worker_without_a_step_for_the_limit_is_hung_once() -> None:
    watch = StepWatch(LIMIT)
    assert [] == watch.hung([_busy(beat=1)], now=0)
    assert [] == watch.hung([_busy(beat=2)], now=LIMIT - 1)
    assert ["w1"] == [w.worker for w in watch.hung([_busy(beat=3)], now=LIMIT)]
    watch.handled("w1")
    assert [] == watch.hung([_busy(beat=4)], now=LIMIT + 5)  # not reported again


def test_steps_and_new_tasks_restart_the_clock() -> None:
    watch = StepWatch(LIMIT)
    watch.hung([_busy(step=100, beat=1)], now=0)
    assert [] == watch.hung([_busy(step=150, beat=2)], now=50)  # a step: progress
    assert [] == watch.hung([_busy(step=150, beat=3)], now=100)  # 50 s since it was seen
    # A new task is not judged by the last step of the one before it.
    assert [] == watch.hung([_busy(task="t2", step=150, beat=4)], now=120)
    assert [] == watch.hung([_busy(task="t2", step=150, beat=5)], now=120 + LIMIT - 1)
    assert 1 == len(watch.hung([_busy(task="t2", step=150, beat=6)], now=120 + LIMIT))


def test_idle_dead_and_unlimited_workers_are_never_hung() -> None:
    watch = StepWatch(LIMIT)
    idle = WorkerStatus(worker="w1", model_key="m-000000", model_name="m", state=WorkerState.READY)
    watch.hung([_busy(beat=1)], now=0)
    assert [] == watch.hung([idle], now=LIMIT * 2)  # idle again: forgotten
    assert [] == watch.hung([_busy(beat=1)], now=LIMIT * 2)
    # Its heartbeat stopped ALIVE_S ago: a dead worker's leftover record, not a hung one.
    assert [] == watch.hung([_busy(beat=1)], now=LIMIT * 2 + max(LIMIT, ALIVE_S))
    never = StepWatch(0)
    never.hung([_busy(beat=1)], now=0)
    assert [] == never.hung([_busy(beat=2)], now=10 * LIMIT)
