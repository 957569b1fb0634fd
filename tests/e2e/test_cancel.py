"""Cancellation stops only the named task: queued ones never start, running ones stop."""

from __future__ import annotations

from typing import Any

import pytest

from tests.system import System
from tests.waiting import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("system", ["local"], indirect=True)]

MODEL = "tiny.safetensors"
DEADLINE_S = 180


async def _submit(system: System, **fields: Any) -> str:
    body = {"stable_diffusion_model": MODEL, "prompt": "x", "seed": 5, **fields}
    return await system.submit(body)


async def _until(system: System, task_id: str, check: Any) -> dict[str, Any]:
    """The task's ``GET /tasks/{id}/progress`` once ``check`` holds for it."""

    async def holds() -> dict[str, Any] | None:
        async with system.http.get(f"{system.url}/tasks/{task_id}/progress") as response:
            progress: dict[str, Any] = await response.json()
        return progress if check(progress) else None

    return await eventually(holds, f"task {task_id}", timeout_s=DEADLINE_S)


async def _cancel(system: System, task_id: str) -> tuple[int, dict[str, Any]]:
    async with system.http.post(f"{system.url}/tasks/{task_id}/cancellation") as response:
        return response.status, await response.json()


async def test_running_and_queued_tasks_are_cancelled_others_succeed(system: System) -> None:
    running = await _submit(system, steps=150, width=256, height=256)
    queued = await _submit(system, steps=3, width=64, height=64)
    bystander = await _submit(system, steps=3, width=64, height=64)

    await _until(system, running, lambda p: p["state"]["sampling_step"] >= 2)
    assert 202 == (await _cancel(system, queued))[0]
    # A waiting task is cancelled at once, before any worker sees it.
    await _until(system, queued, lambda p: p["status"] == "cancelled")
    assert 202 == (await _cancel(system, running))[0]

    stopped = await _until(system, running, lambda p: p["status"] != "running")
    assert "cancelled" == stopped["status"]
    assert stopped["state"]["sampling_step"] < 150
    assert stopped["state"]["interrupted"]
    done = await _until(system, bystander, lambda p: p["status"] in ("succeeded", "failed"))
    assert "succeeded" == done["status"]

    queued_doc = await system.task(queued)
    assert queued_doc is not None
    assert ("cancelled", None) == (queued_doc["status"], queued_doc["started_at"])
    running_doc = await system.task(running)
    assert running_doc is not None
    assert [] == running_doc["images"]


async def test_cancelling_a_finished_task_is_a_conflict_that_changes_nothing(
    system: System,
) -> None:
    task_id = await _submit(system, steps=2, width=64, height=64)
    await _until(system, task_id, lambda p: p["status"] == "succeeded")
    status, body = await _cancel(system, task_id)
    assert (409, "task_finished") == (status, body["code"])
    doc = await system.task(task_id)
    assert doc is not None
    assert "succeeded" == doc["status"]
    assert 1 == len(doc["images"])
