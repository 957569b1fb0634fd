"""Per-user limits: too many open tasks or too many submissions a minute → 429 with
Retry-After, and the refused request creates nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.system import System, SystemFactory

pytestmark = pytest.mark.e2e
BODY = {"stable_diffusion_model": "tiny.safetensors", "prompt": "x", "steps": 2}


@pytest.fixture
async def limited(make_system: SystemFactory) -> AsyncIterator[System]:
    # A budget of 0 slots: every task stays queued (open) until cancelled, and no worker
    # runs diffusion for a test that only needs tasks held open.
    async with make_system(max_open_tasks_per_user=2, max_tasks_per_minute=3, gpu_slots=0) as s:
        yield s


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
    third = await system.submit(BODY)  # the 3rd submission this minute: open slots came back
    doc = await system.task(third)
    assert doc is not None
    assert "waiting" == doc["status"], "no slot: nothing runs, the tasks stay open"
    body = await _refused(system, "over-rate-limit")
    assert "per minute" in body["message"]


async def test_a_full_queue_refuses_with_429_and_creates_nothing(
    make_system: SystemFactory,
) -> None:
    """The task stream holds one message and no slot runs it: a second task is refused by
    JetStream's limit (its error code, not its wording): 429 queue_full, nothing stored."""
    async with make_system(task_stream_max_msgs=1, gpu_slots=0) as system:
        first = await system.submit(BODY)
        body = await _refused(system, "over-queue")
        assert "queue_full" == body["code"]
        doc = await system.task(first)
        assert doc is not None
        assert "waiting" == doc["status"]
