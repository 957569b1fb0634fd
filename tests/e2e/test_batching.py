"""Cross-request batching through the whole system: tasks queued together for one
checkpoint share diffusers calls, and each still gets its own events, result and image."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from proto.workers import WorkerState
from services.common import bus
from tests.system import System, SystemFactory
from tests.waiting import eventually

pytestmark = pytest.mark.e2e

MODEL = "tiny.safetensors"
MAX_BATCH = 4
TOLERANCE = 2
"""As in tests/integration/test_batching.py (README, "Batching")."""


@pytest.fixture
async def batching_system(make_system: SystemFactory) -> AsyncIterator[System]:
    async with make_system(max_batch=MAX_BATCH, gpu_slots=1) as system:
        yield system


def _body(**fields: Any) -> dict[str, Any]:
    return {"stable_diffusion_model": MODEL, "steps": 3, "width": 64, "height": 64, **fields}


async def _pixels(system: System, key: str) -> np.ndarray[Any, Any]:
    data = await system.objects.get(key)
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


async def _batch_seen(system: System, size: int, timeout_s: float = 120) -> list[str]:
    """The task ids of the first batch of at least ``size`` tasks a worker reports."""
    nc = await bus.connect(system.nats_url, "batch-watch")

    async def held() -> list[str] | None:
        for record in await bus.worker_records(nc.jetstream()):
            if record.state is WorkerState.BUSY and len(record.task_ids) >= size:
                return record.task_ids
        return None

    try:
        return await eventually(held, f"a worker holding {size} tasks", timeout_s=timeout_s)
    finally:
        await nc.close()


async def test_queued_tasks_share_calls_and_each_gets_its_own_result(
    batching_system: System,
) -> None:
    system = batching_system
    prompts = ["a cat", "a dog", "(a red fox:1.2)", "a boat at dusk"]
    # Queued before any worker is warm: the first fetch takes all four.
    ids = [await system.submit(_body(prompt=p, seed=100 + i)) for i, p in enumerate(prompts)]
    batch = await _batch_seen(system, MAX_BATCH)
    assert sorted(ids) == sorted(batch)
    streams = await asyncio.gather(*(system.events(t) for t in ids))
    for task_id, events in zip(ids, streams, strict=True):
        kinds = [name for name, _ in events]
        assert "started" == kinds[0]
        assert "succeeded" == kinds[-1]
        assert all(data["task_id"] == task_id for _, data in events), "its own events only"
        assert [1, 2, 3] == [data["step"] for name, data in events if name == "progress"]
    # Each image equals the same request run alone (synchronously, nothing beside it).
    for i, (task_id, prompt) in enumerate(zip(ids, prompts, strict=True)):
        # The SSE stream ends with the event; the document follows once the sink folds it.
        batched = await system.succeeded(task_id)
        async with system.http.post(
            f"{system.url}/txt2img", json=_body(prompt=prompt, seed=100 + i)
        ) as response:
            assert 200 == response.status, await response.text()
            alone = await response.json()
        difference = np.abs(
            await _pixels(system, batched["images"][0]) - await _pixels(system, alone["images"][0])
        ).max()
        assert difference <= TOLERANCE, (prompt, difference)


async def test_cancelling_one_task_of_a_running_batch(batching_system: System) -> None:
    system = batching_system
    ids = [await system.submit(_body(prompt=f"p{i}", seed=i, steps=60)) for i in range(3)]
    await _batch_seen(system, 3)
    victim = ids[1]
    await system.task_when(victim, lambda d: d["progress"]["step"] >= 1)
    async with system.http.post(f"{system.url}/tasks/{victim}/cancellation") as response:
        assert response.status in (200, 202), await response.text()
    cancelled = await system.task_when(victim, lambda d: d["status"] == "cancelled", 60)
    others = [
        await system.task_when(t, lambda d: d["status"] in ("succeeded", "failed"), 300)
        for t in ids
        if t != victim
    ]
    assert ["succeeded", "succeeded"] == [d["status"] for d in others]
    assert [] == cancelled["images"]
    # The victim ended at a step boundary while its neighbours were still denoising.
    assert all(cancelled["finished_at"] < d["finished_at"] for d in others)
