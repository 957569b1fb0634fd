"""Restarting nats-server mid-run loses no task: clients reconnect, pulls resume."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import System, start_system

pytestmark = pytest.mark.e2e


@pytest.fixture
async def restartable(tmp_path: Path, models_dir: Path, mongo_server: Any) -> AsyncIterator[System]:
    store = {"store_dir": str(tmp_path / "objects")}
    async with start_system(tmp_path, models_dir, mongo_server.url, store, ack_wait_s=5) as system:
        yield system


BODY = {
    "stable_diffusion_model": "tiny.safetensors",
    "prompt": "x",
    "steps": 8,
    "width": 128,
    "height": 128,
}


@pytest.mark.parametrize("hard", [False, True], ids=["sigterm", "sigkill"])
async def test_tasks_survive_a_nats_restart(restartable: System, hard: bool) -> None:
    system = restartable
    before = [await system.submit(BODY) for _ in range(3)]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the first task is running
        doc = await system.task(before[0])
        if doc is not None and doc["status"] != "waiting":
            break
        await asyncio.sleep(0.05)
    server = system.nats_server
    if hard:
        server.stop_grace_s = 0.0  # straight to SIGKILL
    await server.stop()
    await asyncio.sleep(1.0)
    await server.start()  # same port, same JetStream store
    after = [await system.submit(BODY) for _ in range(2)]

    deadline = time.monotonic() + 240
    pending = set(before + after)
    while pending and time.monotonic() < deadline:
        for task_id in list(pending):
            doc = await system.task(task_id)
            if doc is not None and doc["status"] in ("succeeded", "failed", "cancelled"):
                assert "succeeded" == doc["status"], (task_id, doc["message"])
                pending.discard(task_id)
        await asyncio.sleep(0.2)
    assert not pending, f"stuck after the restart: {sorted(pending)}"
