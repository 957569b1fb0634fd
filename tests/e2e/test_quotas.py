"""Per-user limits: too many open tasks or too many submissions a minute → 429 with
Retry-After, and the refused request creates nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import System, start_system

pytestmark = pytest.mark.e2e
BODY = {"stable_diffusion_model": "tiny.safetensors", "prompt": "x", "steps": 150}


@pytest.fixture
async def limited(tmp_path: Path, models_dir: Path, mongo_server: Any) -> AsyncIterator[System]:
    async with start_system(
        tmp_path,
        models_dir,
        mongo_server.url,
        max_open_tasks_per_user=2,
        max_tasks_per_minute=3,
    ) as system:
        yield system


async def _refused(system: System, task_id: str) -> dict[str, Any]:
    async with system.http.post(
        f"{system.url}/txt2img",
        json=BODY,
        headers={"Request-Type": "async", "taskId": task_id},
    ) as response:
        body: dict[str, Any] = await response.json()
        assert 429 == response.status, body
        assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert await system.task(task_id) is None, "a refused request creates no task"
    return body


async def test_open_tasks_and_rate_limits(limited: System) -> None:
    system = limited
    first = [await system.submit(BODY) for _ in range(2)]
    body = await _refused(system, "over-open-limit")
    assert "rate_limited" == body["code"]
    assert "unfinished tasks" in body["message"]

    for task_id in first:
        async with system.http.post(f"{system.url}/tasks/{task_id}/cancellation") as response:
            assert 202 == response.status
        await system.task_when(task_id, lambda d: d["status"] == "cancelled")
    third = await system.submit({**BODY, "steps": 2})  # the 3rd submission this minute
    body = await _refused(system, "over-rate-limit")
    assert "per minute" in body["message"]
    await system.task_when(third, lambda d: d["status"] == "succeeded")


async def test_a_full_queue_refuses_with_429_and_creates_nothing(
    tmp_path: Path, models_dir: Path, mongo_server: Any
) -> None:
    """The task stream holds one message: while the first task is queued or running (its
    worker is still starting), a second is refused by JetStream's limit: 429 queue_full."""
    async with start_system(
        tmp_path, models_dir, mongo_server.url, task_stream_max_msgs=1
    ) as system:
        first = await system.submit({**BODY, "steps": 2})
        body = await _refused(system, "over-queue")
        assert "queue_full" == body["code"]
        await system.task_when(first, lambda d: d["status"] == "succeeded")
