"""The worker container's healthcheck (Swarm replaces unhealthy tasks): run as Swarm
runs it, a process per check, against a real nats-server holding the worker's record."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

from proto import names
from proto.codec import encode
from proto.workers import WorkerState, WorkerStatus
from services.common import bus

WORKER = "sd_m-000000.1.task0abc"


async def _check(env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.scheduler.healthcheck",
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    return int(process.returncode or 0), output.decode()


def _age(state: Path, seconds: float) -> None:
    """Move what the check remembers ``seconds`` into the past: the clock it compares
    against, turned forward without waiting."""
    seen = json.loads(state.read_text())
    seen["since"] -= seconds
    state.write_text(json.dumps(seen))


async def test_a_worker_stuck_on_a_task_turns_unhealthy(
    private_nats_url: str, tmp_path: Path
) -> None:
    state = tmp_path / "health.json"
    env = {
        "SDSWARM_NATS_URL": private_nats_url,
        "SDSWARM_WORKER_ID": WORKER,
        "SDSWARM_HUNG_AFTER_S": "600",
        "SDSWARM_HEALTH_STATE": str(state),
    }
    nc = await bus.connect(private_nats_url, "healthcheck-test")
    try:
        bucket = await bus.worker_bucket(nc.jetstream())
        assert 0 == (await _check(env))[0]  # no record yet: healthy

        async def record(state: WorkerState, task: str | None, step: float | None) -> None:
            status = WorkerStatus(
                worker=WORKER,
                model_key="m-000000",
                model_name="m",
                state=state,
                task_id=task,
                last_step_at=step,
                updated_at=time.time(),
            )
            await bucket.put(names.worker_kv_key(WORKER), encode(status))

        await record(WorkerState.BUSY, "t1", 100.0)
        assert 0 == (await _check(env))[0]  # first sight of this step
        _age(state, 599)
        assert 0 == (await _check(env))[0]  # not yet the limit
        _age(state, 2)
        code, output = await _check(env)
        assert 1 == code
        assert output.startswith("unhealthy: no step of task t1 for 60"), output
        await record(WorkerState.BUSY, "t1", 101.0)  # a step: healthy again
        assert 0 == (await _check(env))[0]
        _age(state, 601)
        await record(WorkerState.READY, None, 101.0)  # idle is never hung
        assert 0 == (await _check(env))[0]
        await record(WorkerState.BUSY, "t2", 101.0)  # a new task starts its own clock
        assert 0 == (await _check(env))[0]
    finally:
        await nc.close()
    # NATS unreachable: healthy (an outage must not take every worker down).
    code, output = await _check(env | {"SDSWARM_NATS_URL": "nats://127.0.0.1:1"})
    assert 0 == code, output
