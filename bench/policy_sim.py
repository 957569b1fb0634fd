"""Simulate the scheduling policy at cluster scale: 1 000 GPU slots, 500 checkpoints.

Synthetic demand (bursty, skewed by a Zipf-like popularity) is fed through
``services.scheduler.policy.plan`` tick by tick; tasks take a few ticks. Prints the time
per decision, whether the budget was ever exceeded, and how many ticks left a slot idle
while some checkpoint had backlog for longer than one tick.

    .venv/bin/python bench/policy_sim.py [--slots 1000] [--checkpoints 500] [--ticks 300]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import deque

from services.scheduler.policy import CheckpointLoad, plan


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slots", type=int, default=1000)
    parser.add_argument("--checkpoints", type=int, default=500)
    parser.add_argument("--ticks", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--load", type=float, default=1.0, help="mean arrivals / capacity")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    keys = [f"m{i:03d}" for i in range(args.checkpoints)]
    popularity = [1 / (i + 1) for i in range(args.checkpoints)]
    backlog = dict.fromkeys(keys, 0)
    queued_at: dict[str, deque[int]] = {k: deque() for k in keys}
    running: dict[str, list[int]] = {k: [] for k in keys}  # finish tick per task
    share = dict.fromkeys(keys, 0)
    held: dict[str, float | None] = dict.fromkeys(keys, None)
    timings, over_budget, idle_with_backlog = [], 0, 0
    for tick in range(args.ticks):
        # Arrivals in bursts; tasks last 2.5 ticks on average, so capacity is slots / 2.5.
        mean = args.load * args.slots / 2.5
        arrivals = rng.randint(0, int(4 * mean)) if rng.random() < 0.5 else 0
        for key in rng.choices(keys, popularity, k=arrivals):
            backlog[key] += 1
            queued_at[key].append(tick)
        # Completions.
        for key in keys:
            running[key] = [t for t in running[key] if t > tick]
        loads = [
            CheckpointLoad(
                key=k,
                backlog=backlog[k],
                running=len(running[k]),
                share=share[k],
                workers=share[k],
                oldest_wait_s=float(tick - queued_at[k][0]) if queued_at[k] else 0.0,
                held_since=held[k],
            )
            for k in keys
        ]
        started = time.perf_counter()
        result = plan(loads, args.slots, idle_timeout_s=60, starvation_s=30)
        timings.append(time.perf_counter() - started)
        share = result.shares
        used = sum(max(share[k], len(running[k])) for k in keys)
        over_budget += used > args.slots
        for key in keys:
            held[key] = (held[key] or float(tick)) if share[key] else None
            # Deliveries: JetStream hands out tasks up to the share.
            while backlog[key] and len(running[key]) < share[key]:
                backlog[key] -= 1
                queued_at[key].popleft()
                running[key].append(tick + rng.randint(1, 4))
        in_flight = sum(len(running[k]) for k in keys)
        waiting_long = any(q and tick - q[0] > 1 for q in queued_at.values())
        idle_with_backlog += in_flight < args.slots and waiting_long
    ms = [t * 1000 for t in timings]
    print(f"slots={args.slots} checkpoints={args.checkpoints} ticks={args.ticks} load={args.load}")
    print(f"decision time: median {statistics.median(ms):.2f} ms, max {max(ms):.2f} ms")
    print(f"ticks over budget: {over_budget}")
    print(f"ticks with an idle slot while a task waited > 1 tick: {idle_with_backlog}")


if __name__ == "__main__":
    main()
