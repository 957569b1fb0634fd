"""Fault injection: no task lost, stuck or finished twice while workers are killed and
nats-server restarts. ``CHAOS_TASKS`` sets the size (60 here in CI, ≥ 500 with
``make chaos``); each scenario's counts are printed in the session summary."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
from collections.abc import AsyncIterator

import pytest

from services.common import bus
from services.common.bus import worker_records
from tests.chaos.conftest import REPORTS
from tests.chaos.harness import run_scenario
from tests.system import System, SystemFactory

pytestmark = pytest.mark.chaos


@pytest.fixture
async def system(make_system: SystemFactory) -> AsyncIterator[System]:
    async with make_system(
        gpu_slots=2,
        max_batch=4,  # workers take several tasks at once (kills then hit batches)
        ack_wait_s=3,  # a killed worker's task comes back within seconds
        max_deliver=5,
        reconcile_interval_s=2.0,
        reconcile_grace_s=5.0,
    ) as system:
        yield system


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def test_workers_killed_every_few_seconds(system: System) -> None:
    rng = random.Random(7)

    async def kill_workers(stop: asyncio.Event) -> int:
        nc = await bus.connect(system.nats_url, "chaos-killer")
        kills = 0
        try:
            while not stop.is_set():
                await _sleep_or_stop(stop, 2.0)
                if stop.is_set():
                    break
                workers = [w for w in await worker_records(nc.jetstream()) if w.pid]
                # Mostly mid-task (the interesting case), sometimes loading or idle.
                busy = [w.pid for w in workers if w.task_id]
                pids = busy if busy and rng.random() < 0.8 else [w.pid for w in workers]
                if pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(rng.choice(pids), signal.SIGKILL)
                        kills += 1
        finally:
            await nc.close()
        return kills

    report = await run_scenario(system, "worker kill -9 every 2 s", kill_workers)
    REPORTS.append(report.line())
    assert report.faults > 0
    assert report.passed, report.line()


async def test_workers_killed_mid_batch(system: System) -> None:
    """Kills land only on workers holding a batch of several tasks: every task of it
    comes back and is finished once."""
    rng = random.Random(11)

    async def kill_batches(stop: asyncio.Event) -> int:
        nc = await bus.connect(system.nats_url, "chaos-batch-killer")
        kills = 0
        try:
            while not stop.is_set():
                records = await worker_records(nc.jetstream())
                holding = [w.pid for w in records if w.pid and len(w.task_ids) >= 2]
                if not holding:
                    # A batch of the tiny model lasts about 0.1 s: look often, or the
                    # whole run can pass between two looks.
                    await _sleep_or_stop(stop, 0.02)
                    continue
                with contextlib.suppress(ProcessLookupError):
                    os.kill(rng.choice(holding), signal.SIGKILL)
                    kills += 1
                await _sleep_or_stop(stop, rng.uniform(0.5, 2.0))
        finally:
            await nc.close()
        return kills

    report = await run_scenario(system, "worker kill -9 mid-batch", kill_batches)
    REPORTS.append(report.line())
    assert report.faults > 0, "no worker was ever caught holding a batch"
    assert report.passed, report.line()


async def test_nats_server_restarted_twice(system: System) -> None:
    async def restart_nats(stop: asyncio.Event) -> int:
        restarts = 0
        server = system.nats_server
        for hard in (False, True):
            # Early and close together: both land while tasks are still flowing.
            await _sleep_or_stop(stop, 2.0 if hard else 3.0)
            if stop.is_set():
                break
            server.stop_grace_s = 0.0 if hard else 5.0  # kill -9, then a clean stop
            await server.stop()
            await asyncio.sleep(1.0)
            await server.start()  # same port, same JetStream store
            restarts += 1
        return restarts

    report = await run_scenario(system, "nats-server restart (clean, then kill -9)", restart_nats)
    REPORTS.append(report.line())
    assert report.faults == 2, "the run ended before both restarts"
    assert report.passed, report.line()


async def test_a_worker_hangs_mid_task(system: System) -> None:
    """A worker frozen mid-task (SIGSTOP: no steps, no in-progress acks) loses its task
    to another worker after the ack deadline; no task is lost or finished twice."""
    frozen: list[int] = []

    async def freeze_a_busy_worker(stop: asyncio.Event) -> int:
        nc = await bus.connect(system.nats_url, "chaos-freezer")
        try:
            while not stop.is_set() and not frozen:
                busy = [w.pid for w in await worker_records(nc.jetstream()) if w.task_id and w.pid]
                if busy:
                    os.kill(busy[0], signal.SIGSTOP)
                    frozen.append(busy[0])
                    break
                await _sleep_or_stop(stop, 0.1)
            await stop.wait()
        finally:
            for pid in frozen:  # a frozen worker never wakes up to finish late
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            await nc.close()
        return len(frozen)

    report = await run_scenario(system, "a worker frozen mid-task", freeze_a_busy_worker)
    REPORTS.append(report.line())
    assert 1 == report.faults
    assert report.passed, report.line()
