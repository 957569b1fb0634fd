"""The scheduling policy: a pure function from load to GPU shares and worker counts.

Invariant: the slots in use — for each checkpoint ``max(share, running)``, because a
lowered share stops new deliveries but never interrupts a task — never exceed the
budget. So shares are lowered at once and raised only into slots that are free *now*;
a slot taken from one checkpoint reaches another at the first's next task boundary.

Busy workers never exceed the budget either. A worker runs up to ``max_batch`` tasks
at once and holds ``batches`` of them (the one running, the one before it being
stored), so a checkpoint's consumer may have ``share × max_batch × batches`` tasks in
flight only while it has no more workers than slots; when it has more (warm workers
kept while paused, a ``minInstances`` floor, a worker still stopping), those tasks
could each land on their own worker, so it gets one task per slot
(:func:`consumer_limit`). And a checkpoint that holds slots keeps no more workers than
that (or its floor): a surplus warm worker would only hold GPU memory and turn batching
off.

Allocation is weighted fair share by demand (D'Hondt: the next slot goes to the highest
``demand / (slots + 1)``), with two corrections: a checkpoint whose oldest task has
waited past ``starvation_s`` gets one slot, taken from the checkpoint that has held
slots longest, and current holders win ties, so shares do not flap.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field


@dataclass(frozen=True)
class CheckpointLoad:
    key: str
    backlog: int
    """Tasks queued and not yet delivered."""
    running: int
    """Tasks delivered and not yet acknowledged."""
    share: int
    """Slots granted now (its consumer's ``max_ack_pending``; 0 when paused)."""
    workers: int
    oldest_wait_s: float = 0.0
    """Age of its oldest queued task."""
    held_since: float | None = None
    """When it last went from 0 to ≥1 slot (monotonic), None while it holds none."""
    idle_s: float = 0.0
    """Seconds since it last had backlog or running tasks."""
    min_instances: int = 0
    max_instances: int | None = None
    pinned: int | None = None
    """An operator's manual limit: honoured as the share, counted in the budget."""
    idle_timeout_s: float | None = None
    """Its own idle timeout (function setting); None: the scheduler's."""


@dataclass(frozen=True)
class Plan:
    shares: dict[str, int]
    workers: dict[str, int]
    reasons: dict[str, str] = field(default_factory=dict)


def _cap(load: CheckpointLoad, budget: int) -> int:
    return min(_instances_cap(load, budget), load.backlog + load.running)


def _starving(load: CheckpointLoad, starvation_s: float) -> bool:
    return load.backlog > 0 and load.oldest_wait_s >= starvation_s


def _warm(load: CheckpointLoad, idle_timeout_s: float) -> bool:
    timeout = idle_timeout_s if load.idle_timeout_s is None else load.idle_timeout_s
    return load.workers > 0 and (load.idle_s < timeout or load.min_instances > 0)


def ideal_shares(
    loads: list[CheckpointLoad],
    budget: int,
    starvation_s: float,
    idle_timeout_s: float = float("inf"),
) -> dict[str, int]:
    """The allocation we would want if every slot were free now."""
    ideal = {load.key: 0 for load in loads}
    free = budget
    for load in loads:
        if load.pinned is not None:
            ideal[load.key] = load.pinned
            free -= load.pinned
    candidates = [load for load in loads if load.pinned is None and _cap(load, budget) > 0]

    def entry(load: CheckpointLoad) -> tuple[float, int, int, str, CheckpointLoad]:
        # D'Hondt over demand; current holders win ties (stability), then larger backlog.
        weight = -(load.backlog + load.running) / (ideal[load.key] + 1)
        return (weight, -min(load.share, 1), -load.backlog, load.key, load)

    heap = [entry(c) for c in candidates]
    heapq.heapify(heap)
    while free > 0 and heap:
        *_, key, load = heapq.heappop(heap)
        ideal[key] += 1
        free -= 1
        if ideal[key] < _cap(load, budget):
            heapq.heappush(heap, entry(load))
    # Starvation bound: a checkpoint waiting too long takes one slot from the checkpoint
    # that has held slots longest (it loses it at its next task boundary).
    starving = sorted(
        (c for c in candidates if _starving(c, starvation_s) and ideal[c.key] == 0),
        key=lambda c: -c.oldest_wait_s,
    )
    if starving:
        victims = sorted(
            (v for v in candidates if ideal[v.key] > 0),
            key=lambda v: (v.held_since is None, v.held_since or 0.0, v.key),
        )
        position = 0
        for load in starving:
            while position < len(victims) and ideal[victims[position].key] == 0:
                position += 1
            if position == len(victims):
                break
            ideal[victims[position].key] -= 1
            ideal[load.key] = 1
    # Slots nobody is asking for stay with warm pools, one per warm worker (current
    # holders first), so their next task starts at once instead of waiting a tick for the
    # consumer to resume, and their workers are kept.
    spare = budget - sum(ideal.values())
    for load in sorted(loads, key=lambda w: (-w.share, w.key)):
        if spare <= 0:
            break
        if load.pinned is None and _warm(load, idle_timeout_s):
            kept = min(load.workers, _instances_cap(load, budget)) - ideal[load.key]
            if kept > 0:
                ideal[load.key] += min(kept, spare)
                spare -= min(kept, spare)
    return ideal


def _instances_cap(load: CheckpointLoad, budget: int) -> int:
    return budget if load.max_instances is None else min(budget, load.max_instances)


def plan(
    loads: list[CheckpointLoad],
    budget: int,
    *,
    idle_timeout_s: float,
    starvation_s: float,
) -> Plan:
    ideal = ideal_shares(loads, budget, starvation_s, idle_timeout_s)
    by_key = {load.key: load for load in loads}
    # Lower at once; what stays in use is max(share, running).
    shares = {k: min(by_key[k].share, ideal[k]) for k in ideal}
    used = sum(max(shares[k], by_key[k].running) for k in shares)
    free = budget - used
    # Raise into free slots, most-wanted first: starving, then largest shortfall.
    wanting = sorted(
        (k for k in shares if ideal[k] > shares[k]),
        key=lambda k: (not _starving(by_key[k], starvation_s), shares[k] - ideal[k], k),
    )
    for key in wanting:
        # Even with no slot free, a share may rise up to the slots the checkpoint's own
        # running tasks hold: that costs nothing, and a paused consumer would never
        # redeliver a task whose worker died (it would stay in flight for good).
        in_use = max(shares[key], by_key[key].running)
        grant = min(ideal[key] - shares[key], free + (in_use - shares[key]))
        new_share = shares[key] + max(grant, 0)
        free -= max(new_share, by_key[key].running) - in_use
        shares[key] = new_share
    workers: dict[str, int] = {}
    reasons: dict[str, str] = {}
    for load in loads:
        # A worker holds a GPU slot (its model in GPU memory) even when idle: no pool has
        # more workers than the budget, whatever its min/maxInstances say (a minInstances
        # of 10 000 once started that many local workers and exhausted the machine).
        cap = _instances_cap(load, budget)
        floor = min(load.min_instances, budget)
        share = shares[load.key]
        wanted = max(share, floor)
        timeout = idle_timeout_s if load.idle_timeout_s is None else load.idle_timeout_s
        if share == 0 and (load.backlog or load.running or load.idle_s < timeout):
            # Hysteresis: a paused pool keeps its warm workers (they cannot take a task)
            # until it has been idle long enough.
            wanted = max(wanted, min(load.workers, cap))
        elif wanted < load.workers:
            reasons[load.key] = (
                f"idle for {load.idle_s:.0f} s" if share == 0 else f"{share} slot(s) now"
            )
        workers[load.key] = min(wanted, max(cap, floor))
    return Plan(shares=shares, workers=workers, reasons=reasons)


def consumer_limit(share: int, max_batch: int, workers: int, batches: int = 1) -> int:
    """The tasks a checkpoint's consumer may have in flight (its ``max_ack_pending``) for
    ``share`` slots, when ``workers`` of its workers are alive (the most of what the
    backend runs, the liveness records show and the plan wants): ``batches`` of
    ``max_batch`` per slot (a worker runs one and stores the one before) while every
    worker has a slot of its own, else one per slot, so that however the tasks spread
    over the workers, no more of them are busy than the share allows."""
    if share <= 0:
        return 0
    return share * max(max_batch, 1) * max(batches, 1) if workers <= share else share
