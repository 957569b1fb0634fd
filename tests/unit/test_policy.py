"""The scheduling policy: budget invariant, fair shares, starvation bound, scale to zero."""

import random
from dataclasses import replace

import pytest

from services.common import bus
from services.scheduler.policy import CheckpointLoad, consumer_limit, plan

IDLE, STARVE = 300.0, 60.0


def _load(key: str, **fields: object) -> CheckpointLoad:
    values: dict[str, object] = {"backlog": 0, "running": 0, "share": 0, "workers": 0}
    values.update(fields)
    return CheckpointLoad(key=key, **values)  # type: ignore[arg-type]


def _used(loads: list[CheckpointLoad], shares: dict[str, int]) -> int:
    return sum(max(shares[load.key], load.running) for load in loads)


def test_budget_is_never_exceeded_randomized() -> None:
    rng = random.Random(1234)
    for _ in range(3000):
        budget = rng.randint(1, 12)
        loads: list[CheckpointLoad] = []
        left = budget
        for i in range(rng.randint(1, 8)):
            share = rng.randint(0, left)
            running = rng.randint(0, share + (1 if rng.random() < 0.2 else 0))
            running = min(running, left) if running > share else running
            left -= max(share, running)
            loads.append(
                _load(
                    f"m{i}",
                    backlog=rng.randint(0, 20),
                    running=running,
                    share=share,
                    workers=rng.randint(0, 3),
                    oldest_wait_s=rng.uniform(0, 120),
                    held_since=rng.uniform(0, 100) if share else None,
                    idle_s=rng.uniform(0, 600),
                    max_instances=rng.choice([None, 1, 2, 5]),
                    min_instances=rng.randint(0, 1),
                )
            )
        assert _used(loads, {x.key: x.share for x in loads}) <= budget  # precondition
        result = plan(loads, budget, idle_timeout_s=IDLE, starvation_s=STARVE)
        assert _used(loads, result.shares) <= budget, (budget, loads, result)
        # Busy workers: a checkpoint's are at most its live workers and at most the tasks
        # its consumer lets out, besides the slots its running tasks already hold.
        batch = rng.randint(1, 8)
        busy = 0
        for load in loads:
            alive = max(load.workers, result.workers[load.key])
            limit = consumer_limit(result.shares[load.key], batch, alive, bus.BATCHES_IN_FLIGHT)
            busy += max(min(alive, limit), load.running)
        assert busy <= budget, (budget, batch, loads, result)
        for load in loads:
            assert 0 <= result.shares[load.key]
            assert result.workers[load.key] <= budget
            if load.max_instances is not None:
                assert result.workers[load.key] <= max(load.max_instances, load.min_instances)


def test_equal_demand_gets_equal_shares() -> None:
    loads = [_load("a", backlog=10), _load("b", backlog=10)]
    assert {"a": 2, "b": 2} == plan(loads, 4, idle_timeout_s=IDLE, starvation_s=STARVE).shares


def test_shares_follow_demand() -> None:
    loads = [_load("a", backlog=30), _load("b", backlog=10), _load("c")]
    result = plan(loads, 4, idle_timeout_s=IDLE, starvation_s=STARVE)
    assert {"a": 3, "b": 1, "c": 0} == result.shares
    assert {"a": 3, "b": 1, "c": 0} == result.workers


def test_a_share_never_exceeds_demand_or_max_instances() -> None:
    loads = [_load("a", backlog=1), _load("b", backlog=50, max_instances=2)]
    assert {"a": 1, "b": 2} == plan(loads, 8, idle_timeout_s=IDLE, starvation_s=STARVE).shares


def test_a_starving_checkpoint_gets_the_longest_holders_slot_at_its_task_boundary() -> None:
    old = _load("old", backlog=9, running=1, share=1, workers=1, held_since=10.0)
    new = _load("new", backlog=9, running=1, share=1, workers=1, held_since=50.0)
    starving = _load("late", backlog=1, oldest_wait_s=STARVE + 1)
    first = plan([old, new, starving], 2, idle_timeout_s=IDLE, starvation_s=STARVE)
    # The longest holder is lowered now; its running task is not interrupted, so the
    # starving checkpoint cannot start yet without exceeding the budget.
    assert {"old": 0, "new": 1, "late": 0} == first.shares
    finished = replace(old, running=0, share=0)
    second = plan([finished, new, starving], 2, idle_timeout_s=IDLE, starvation_s=STARVE)
    assert {"old": 0, "new": 1, "late": 1} == second.shares


def test_holders_keep_their_slots_on_ties() -> None:
    loads = [_load("a", backlog=5, share=1, workers=1, held_since=1.0), _load("b", backlog=5)]
    assert {"a": 1, "b": 0} == plan(loads, 1, idle_timeout_s=IDLE, starvation_s=STARVE).shares


@pytest.mark.parametrize(
    ("idle_s", "min_instances", "expected"), [(10.0, 0, 1), (IDLE + 1, 0, 0), (IDLE + 1, 1, 1)]
)
def test_scale_to_zero_after_idle_timeout(idle_s: float, min_instances: int, expected: int) -> None:
    load = _load("a", workers=1, idle_s=idle_s, min_instances=min_instances)
    result = plan([load], 2, idle_timeout_s=IDLE, starvation_s=STARVE)
    assert expected == result.workers["a"]
    # A warm pool keeps a spare slot (its next task starts at once); a cold one holds none.
    assert expected == result.shares["a"]


def test_instances_settings_never_start_more_workers_than_the_budget() -> None:
    """Each worker holds a GPU slot: minInstances and maxInstances beyond the budget (the
    API allows 10 000) are capped at it, not obeyed to the machine's exhaustion."""
    pinned = _load("a", workers=0, idle_s=IDLE + 1, min_instances=10_000)
    wide = _load("b", backlog=50, workers=2, max_instances=10_000)
    result = plan([pinned, wide], 3, idle_timeout_s=IDLE, starvation_s=STARVE)
    assert result.workers["a"] <= 3
    assert result.workers["b"] <= 3


def test_spare_slots_never_delay_demand() -> None:
    warm = _load("warm", workers=1, share=1, idle_s=5.0)
    busy = _load("busy", backlog=5)
    result = plan([warm, busy], 1, idle_timeout_s=IDLE, starvation_s=STARVE)
    assert {"warm": 0, "busy": 1} == result.shares


def test_an_operator_pin_is_honoured_and_counted() -> None:
    loads = [_load("pinned", backlog=9, pinned=1, share=1), _load("b", backlog=9)]
    assert {"pinned": 1, "b": 2} == plan(loads, 3, idle_timeout_s=IDLE, starvation_s=STARVE).shares


@pytest.mark.parametrize(
    ("share", "workers", "expected"),
    [(0, 1, 0), (2, 2, 8), (2, 1, 8), (1, 2, 1), (2, 3, 2)],
)
def test_the_consumer_lets_out_a_batch_per_slot_only_while_each_worker_has_a_slot(
    share: int, workers: int, expected: int
) -> None:
    """Two workers sharing one slot of batch 4 could each take a task: one task per slot
    then, so busy workers stay within the share however the tasks spread."""
    assert expected == consumer_limit(share, 4, workers)


def test_a_pool_holding_slots_keeps_no_more_workers_than_its_share() -> None:
    """Checkpoint a had the whole budget; b's demand takes a slot, and a's second worker
    stops (it could only hold GPU memory and turn a's batching off)."""
    a = _load("a", backlog=5, share=2, workers=2, held_since=1.0)
    b = _load("b", backlog=5, oldest_wait_s=STARVE + 1)
    result = plan([a, b], 2, idle_timeout_s=IDLE, starvation_s=STARVE)
    assert {"a": 1, "b": 1} == result.shares
    assert {"a": 1, "b": 1} == result.workers
    assert "1 slot(s) now" == result.reasons["a"]


def test_a_paused_pool_keeps_its_warm_workers_until_idle() -> None:
    paused = _load("paused", backlog=3, share=0, workers=2, idle_s=5.0)
    holder = _load("holder", backlog=9, running=2, share=2, workers=2, held_since=1.0)
    result = plan([paused, holder], 2, idle_timeout_s=IDLE, starvation_s=STARVE)
    assert 0 == result.shares["paused"]
    assert 2 == result.workers["paused"]


def test_spare_slots_keep_every_warm_worker_of_an_idle_pool() -> None:
    idle = _load("a", workers=2, share=2, idle_s=5.0)
    result = plan([idle], 2, idle_timeout_s=IDLE, starvation_s=STARVE)
    assert {"a": 2} == result.shares
    assert {"a": 2} == result.workers


def test_a_paused_checkpoint_gets_back_the_slot_its_running_task_holds() -> None:
    """m1's only task is in flight on a worker that was stopped (its consumer paused, no
    backlog), and m2 holds the other slot: no slot is free, yet m1's share must come back
    to 1 (its running task holds that slot already), or the paused consumer would never
    redeliver the task (seen as a hang once workers held two batches)."""
    loads = [
        _load("m1", running=1, share=0, workers=1, idle_s=0.0),
        _load("m2", share=1, workers=1, idle_s=0.0),
    ]
    result = plan(loads, 2, idle_timeout_s=IDLE, starvation_s=STARVE)
    assert 1 == result.shares["m1"]
    assert _used(loads, result.shares) <= 2


@pytest.mark.parametrize(
    ("share", "workers", "expected"), [(0, 1, 0), (2, 2, 16), (2, 1, 16), (1, 2, 1)]
)
def test_a_slot_holds_a_batch_running_and_one_being_stored(
    share: int, workers: int, expected: int
) -> None:
    assert expected == consumer_limit(share, 4, workers, 2)
