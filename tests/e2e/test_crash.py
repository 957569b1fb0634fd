"""A worker killed mid-task (kill -9): the task is redelivered and still succeeds, once."""

from __future__ import annotations

import os
import signal

import pytest

from services.storage.mongo import Document
from tests.system import System, SystemFactory

pytestmark = pytest.mark.e2e

BODY = {
    "stable_diffusion_model": "tiny.safetensors",
    "prompt": "x",
    "seed": 9,
    "steps": 20,
    "width": 256,
    "height": 256,
}


async def _signal_mid_task(system: System, signum: signal.Signals) -> tuple[Document, Document]:
    """Send ``signum`` to the worker of a task that has made steps; the task document
    then, and once it is terminal."""
    task_id = await system.submit(BODY)
    running = await system.task_when(task_id, lambda d: d["progress"]["step"] >= 2)
    os.kill(int(running["worker"].rsplit("-", 1)[1]), signum)
    done = await system.succeeded(task_id)
    # Attempt 2: the signal landed mid-task (a task finished first would stay attempt 1).
    assert (2, [f"images/default/{task_id}_1.png"]) == (done["attempt"], done["images"])
    assert running["worker"] != done["worker"]
    assert await system.objects.exists(done["images"][0])
    return running, done


async def test_a_killed_worker_loses_no_task(make_system: SystemFactory) -> None:
    # A short ack deadline so the test does not wait the default 60 s for redelivery.
    async with make_system(ack_wait_s=2) as system:
        await _signal_mid_task(system, signal.SIGKILL)


async def test_a_stopped_worker_hands_its_task_back_at_once(
    make_system: SystemFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Operators' SDSWARM_* settings reach the workers. The ack deadline (an hour) is far
    # beyond the test's waits: a redelivery within them can only come from the hand-back.
    monkeypatch.setenv("SDSWARM_STOP_GRACE_S", "0.5")
    async with make_system(ack_wait_s=3600) as system:
        await _signal_mid_task(system, signal.SIGTERM)
