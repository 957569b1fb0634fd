"""Every sampler × schedule type the API lists runs through the whole system (issue 15:
LMS needed scipy and the SDE samplers torchsde, and nothing tried the list end to end)."""

from __future__ import annotations

import pytest

from tests.system import System

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("system", ["local"], indirect=True)]


async def test_every_listed_sampler_and_schedule_type_runs(system: System) -> None:
    async with system.http.get(f"{system.url}/sdapi/v1/samplers") as response:
        samplers = [s["name"] for s in await response.json()]
    async with system.http.get(f"{system.url}/sdapi/v1/schedulers") as response:
        schedules = [s["name"] for s in await response.json()]
    assert len(samplers) >= 10
    assert len(schedules) >= 4
    failures = []
    for sampler in samplers:  # one sampler at a time: within the open-task quota
        submitted = {}
        for schedule in schedules:
            body = {
                "stable_diffusion_model": "tiny.safetensors",
                "prompt": "x",
                "steps": 3,
                "width": 64,
                "height": 64,
                "seed": 1,
                "sampler_name": sampler,
                "scheduler": schedule,
            }
            submitted[await system.submit(body)] = (sampler, schedule)
        for task_id, combination in submitted.items():
            doc = await system.task_when(
                task_id, lambda d: d["status"] in ("succeeded", "failed", "cancelled"), 300
            )
            if doc["status"] != "succeeded":
                failures.append((combination, doc.get("code"), doc.get("message")))
    assert [] == failures
