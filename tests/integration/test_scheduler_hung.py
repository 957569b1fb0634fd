"""A hung worker is replaced and its task redelivered, on a real nats-server and MongoDB.

The workers are real processes started by the local backend, running a stand-in worker
(written below) that behaves like a worker stuck inside a denoising step: it takes a
task, sends one in-progress ack, and from then on only heartbeats its liveness record
(busy, same task, same last step). The scheduler must kill it; JetStream then delivers
the task again to the replacement it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import pytest

from proto import names
from proto.workers import WorkerStatus
from services.common.bus import worker_records
from tests.integration.scheduling import (
    checkpoint,
    scheduler_settings,
    scheduling_a_task,
    stand_in_worker,
)

pytestmark = pytest.mark.integration
HUNG_AFTER_S = 1.5

STUCK_WORKER = """
import asyncio, os, time
from proto import names
from proto.codec import encode
from proto.workers import WorkerState, WorkerStatus
from services.common import bus

async def main() -> None:
    key = os.environ["SDSWARM_MODEL_KEY"]
    nc = await bus.connect(os.environ["SDSWARM_NATS_URL"], "stuck-worker")
    js = nc.jetstream()
    kv = await bus.worker_bucket(js)
    sub = await js.pull_subscribe_bind(durable=names.consumer_name(key), stream=names.TASK_STREAM)
    worker = f"stuck-{os.getpid()}"
    while True:
        try:
            [message] = await sub.fetch(1, timeout=1)
            break
        except TimeoutError:
            continue
    task = f"{message.metadata.sequence.stream}-{message.metadata.num_delivered}"
    step = time.time()
    await message.in_progress()
    while True:  # stuck in a step: heartbeats go on, steps do not
        status = WorkerStatus(
            worker=worker, model_key=key, model_name="m", state=WorkerState.BUSY,
            pid=os.getpid(), task_id=task, last_step_at=step, updated_at=time.time(),
        )
        await kv.put(names.worker_kv_key(worker), encode(status))
        await asyncio.sleep(0.3)

asyncio.run(main())
"""


async def test_a_worker_stuck_in_a_step_is_killed_and_its_task_delivered_again(
    private_nats_url: str, mongo_server: Any, fresh_db: Any, tmp_path: Path
) -> None:
    command = stand_in_worker(tmp_path, "stuck_worker", STUCK_WORKER)
    settings = scheduler_settings(
        private_nats_url,
        mongo_server.url,
        fresh_db,
        tmp_path,
        poll_interval_s=0.2,
        hung_after_s=HUNG_AFTER_S,
        ack_wait_s=2,
    )
    async with contextlib.AsyncExitStack() as stack:
        model = checkpoint("stuck.safetensors")
        key = model["model_key"]
        on = await scheduling_a_task(stack, settings, fresh_db, model, command)
        scheduler, backend, js = on.scheduler, on.backend, on.js
        stop = asyncio.Event()
        run = asyncio.create_task(scheduler.run(stop))

        async def record_of(task: str, timeout_s: float) -> tuple[WorkerStatus, float]:
            started = time.monotonic()
            while time.monotonic() - started < timeout_s:
                for record in await worker_records(js):
                    if record.task_id == task:
                        return record, time.monotonic()
                await asyncio.sleep(0.05)
            raise AssertionError(f"no worker took delivery {task} in {timeout_s} s")

        try:
            first, busy_at = await record_of(f"{on.task_seq}-1", 30)
            while not scheduler.replaced:
                assert time.monotonic() - busy_at < 10 * HUNG_AFTER_S, "never replaced"
                await asyncio.sleep(0.05)
            replaced_after = time.monotonic() - busy_at
            # Not before the limit (less the scheduler seeing it a poll earlier than we did).
            assert replaced_after >= HUNG_AFTER_S - 0.3
            second, _ = await record_of(f"{on.task_seq}-2", 30)  # redelivered to it
            # The hung one and its replacement (started on a tick after the kill).
            assert 2 == backend.started
            assert first.pid != second.pid
            print(f"hung worker replaced {replaced_after:.2f} s after it took the task")
        finally:
            stop.set()
            await run
        info = await js.consumer_info(names.TASK_STREAM, names.consumer_name(key))
        assert 1 == info.num_redelivered
