"""The seed's functions API drives the worker pools: min instances kept warm, scale to
zero after the idle timeout, settings a backend cannot express reported, not dropped."""

from __future__ import annotations

import time
from typing import Any

import pytest

from services.common import bus
from tests.system import System
from tests.waiting import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("system", ["local"], indirect=True)]

MODEL = "tiny.safetensors"


async def _functions(system: System, path: str = "/list/sdapi/functions") -> dict[str, Any]:
    async with system.http.get(system.url + path) as response:
        assert 200 == response.status
        body: dict[str, Any] = await response.json()
    return body


async def _update(system: System, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with system.http.post(f"{system.url}/batch_update_sd_resource", json=body) as r:
        return r.status, await r.json()


async def _replicas_become(system: System, count: int, timeout_s: float = 90) -> float:
    started = time.monotonic()

    async def reached() -> bool:
        [function] = (await _functions(system))["functions"]
        return bool(function["replicas"] == count)

    await eventually(reached, f"{count} replicas", timeout_s=timeout_s, interval_s=0.2)
    return time.monotonic() - started


async def test_functions_lifecycle(system: System) -> None:
    listed = await _functions(system)
    assert "success" == listed["status"]
    [function] = listed["functions"]
    assert MODEL == function["model"]
    assert function["functionName"].startswith("sd_tiny-"), "named after its consumer"
    assert listed == await _functions(system, "/list/sdapi/fucntions")  # the seed's spelling

    status, error = await _update(system, {"minInstances": 2, "maxInstances": 1})
    assert (422, "minInstances") == (status, error["field"])
    status, result = await _update(
        system, {"models": [MODEL, "nope.safetensors"], "minInstances": 1}
    )
    assert (500, "fail") == (status, result["status"])
    assert [{"model": "nope.safetensors", "err": "not registered"}] == result["failFuncList"]

    # Warm pool: one worker without any task.
    status, result = await _update(
        system, {"minInstances": 1, "cpu": 4, "memorySize": 8192, "env": {"EXAMPLE": "1"}}
    )
    assert 200 == status
    assert ["cpu", "memorySize"] == result["functions"][0]["unsupported"]
    cold = await _replicas_become(system, 1)
    [function] = (await _functions(system))["functions"]
    assert (1, "loaded", {"cpu": 4, "memorySize": 8192, "env": {"EXAMPLE": "1"}}) == (
        function["minInstances"],
        function["state"],
        function["resources"],
    )

    # Scale to zero once idle for its own timeout.
    status, _ = await _update(system, {"minInstances": 0, "idleTimeout": 1})
    assert 200 == status
    await _replicas_become(system, 0)
    print(f"warm worker ready {cold:.1f} s after minInstances=1")

    async with system.http.post(
        f"{system.url}/del/sd/functions", json={"functions": [function["functionName"], "sd_x"]}
    ) as response:
        assert 500 == response.status
        assert [{"functionName": "sd_x", "err": "no such function"}] == (await response.json())[
            "fails"
        ]
    [function] = (await _functions(system))["functions"]
    assert ({}, 0) == (function["resources"], function["minInstances"])


async def test_restart_rolls_the_workers_and_loses_no_task(system: System) -> None:
    body = {
        "stable_diffusion_model": "tiny.safetensors",
        "prompt": "x",
        "steps": 2,
        "width": 64,
        "height": 64,
    }
    first = await system.submit(body)
    before = (await system.succeeded(first))["worker"]
    async with system.http.post(f"{system.url}/restart") as response:
        assert (200, {"message": "success"}) == (response.status, await response.json())
    after = [await system.submit({**body, "steps": 6}) for _ in range(3)]
    for task_id in after:
        await system.succeeded(task_id)
    # The worker that was up stepped down; a fresh one serves the pool.
    nc = await bus.connect(system.nats_url, "restart-test")
    try:

        async def stepped_down() -> bool:
            return before not in {w.worker for w in await bus.worker_records(nc.jetstream())}

        await eventually(stepped_down, f"{before} stepped down", interval_s=0.2)
    finally:
        await nc.close()
    last = await system.submit(body)
    done = await system.succeeded(last)
    assert before != done["worker"]
