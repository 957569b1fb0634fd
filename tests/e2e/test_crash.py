"""A worker killed mid-task (kill -9): the task is redelivered and still succeeds, once."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import System, start_system

pytestmark = pytest.mark.e2e


@pytest.fixture
async def fast_redelivery(
    tmp_path: Path, models_dir: Path, mongo_server: Any
) -> AsyncIterator[System]:
    # A short ack deadline so the test does not wait the default 60 s for redelivery.
    store = {"store_dir": str(tmp_path / "objects")}
    async with start_system(tmp_path, models_dir, mongo_server.url, store, ack_wait_s=2) as system:
        yield system


async def test_a_killed_worker_loses_no_task(fast_redelivery: System) -> None:
    system = fast_redelivery
    body = {
        "stable_diffusion_model": "tiny.safetensors",
        "prompt": "x",
        "seed": 9,
        "steps": 40,
        "width": 256,
        "height": 256,
    }
    task_id = await system.submit(body)
    running = await system.task_when(task_id, lambda d: d["progress"]["step"] >= 2)
    victim = int(running["worker"].rsplit("-", 1)[1])
    os.kill(victim, signal.SIGKILL)

    done = await system.task_when(task_id, lambda d: d["status"] in ("succeeded", "failed"))
    assert "succeeded" == done["status"], done["message"]
    assert 2 == done["attempt"]
    assert running["worker"] != done["worker"]
    assert [f"images/default/{task_id}_1.png"] == done["images"]
    assert await system.objects.exists(done["images"][0])


@pytest.fixture
async def short_grace(
    tmp_path: Path, models_dir: Path, mongo_server: Any, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[System]:
    # Operators' SDSWARM_* settings reach the workers; the ack deadline stays long, so a
    # fast redelivery can only come from the hand-back.
    monkeypatch.setenv("SDSWARM_STOP_GRACE_S", "0.5")
    store = {"store_dir": str(tmp_path / "objects")}
    async with start_system(tmp_path, models_dir, mongo_server.url, store, ack_wait_s=120) as s:
        yield s


async def test_a_stopped_worker_hands_its_task_back_at_once(short_grace: System) -> None:
    system = short_grace
    body = {
        "stable_diffusion_model": "tiny.safetensors",
        "prompt": "x",
        "seed": 9,
        "steps": 60,
        "width": 256,
        "height": 256,
    }
    task_id = await system.submit(body)
    running = await system.task_when(task_id, lambda d: d["progress"]["step"] >= 2)
    stopped_at = time.monotonic()
    os.kill(int(running["worker"].rsplit("-", 1)[1]), signal.SIGTERM)
    done = await system.task_when(task_id, lambda d: d["status"] in ("succeeded", "failed"))
    assert ("succeeded", 2) == (done["status"], done["attempt"])
    assert time.monotonic() - stopped_at < 100, "redelivered by the hand-back, not the deadline"
