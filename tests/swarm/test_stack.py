"""The stack on a live swarm, through its gateway (one deployment, tests in order).

A checkpoint's worker service ``sd_<key>`` is created by the scheduler's Swarm backend on
the real engine, scaled with demand and to zero when idle; a function update rolls it, a
model delete removes it; a worker killed mid-task and a NATS node taken away lose nothing.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.swarm import engine
from tests.swarm.conftest import IDLE_TIMEOUT_S, Stack

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(1800)]

MODEL = "tiny.safetensors"
BODY = {
    "stable_diffusion_model": MODEL,
    "prompt": "a lighthouse",
    "steps": 4,
    "width": 64,
    "height": 64,
    "seed": 7,
    "sampler_name": "Euler a",
}
STATE: dict[str, Any] = {}


def _replicas(service: str) -> str | None:
    return engine.services().get(service)


async def _until(check: Any, timeout_s: float, what: str) -> Any:
    return await asyncio.to_thread(engine.wait_until, check, timeout_s, what)


async def _succeeded(stack: Stack, task_id: str) -> list[tuple[str, dict[str, Any]]]:
    events = await stack.events(task_id)
    kinds = [name for name, _ in events]
    assert "succeeded" == kinds[-1], kinds
    return events


async def test_txt2img_sync_and_async_with_sse_creates_the_worker_service(
    stack: Stack, tiny_checkpoint: Any
) -> None:
    with tiny_checkpoint.open("rb") as file:  # streamed, with its Content-Length
        status, answer = await stack.call("PUT", f"/models/{MODEL}?type=stableDiffusion", data=file)
    assert status in (200, 201), answer
    status, model = await stack.call("GET", f"/models/{MODEL}?type=stableDiffusion")
    assert 200 == status, model
    STATE["service"] = service = f"sd_{model['modelKey']}"
    started = time.monotonic()
    status, answer = await stack.call(
        "POST", "/txt2img", json=BODY, headers={"Request-Type": "sync"}
    )
    assert 200 == status, answer
    assert "succeeded" == answer["status"]
    engine.FIGURES["first_image_s"] = round(time.monotonic() - started, 1)
    # The scheduler made the service on the engine: docker service ls shows it.
    assert service in engine.services()
    task_id = await stack.submit({**BODY, "seed": 8})
    events = await _succeeded(stack, task_id)
    assert {"started", "progress", "succeeded"} <= {name for name, _ in events}


async def test_the_service_scales_with_demand_and_to_zero_when_idle(stack: Stack) -> None:
    service = STATE["service"]
    tasks = [await stack.submit({**BODY, "seed": n, "steps": 30}) for n in range(12)]
    # A backlog: the scheduler grants the checkpoint both slots (GPU_SLOTS=2).
    await _until(lambda: (_replicas(service) or "").endswith("/2"), 120, f"{service} → 2")
    for task_id in tasks:
        await _succeeded(stack, task_id)
    idle = time.monotonic()
    await _until(lambda: _replicas(service) == "0/0", IDLE_TIMEOUT_S + 120, f"{service} at 0")
    engine.FIGURES["scale_to_zero_after_idle_s"] = round(time.monotonic() - idle, 1)


async def test_a_worker_killed_mid_task_has_its_task_redelivered_and_done_once(
    stack: Stack,
) -> None:
    service = STATE["service"]
    task_id = await stack.submit({**BODY, "steps": 150, "width": 256, "height": 256})

    async def running() -> bool:
        return await stack.status(task_id) == "running"

    deadline = time.monotonic() + 300
    while not await running():
        assert time.monotonic() < deadline, "the task never ran"
        await asyncio.sleep(0.5)
    [container] = engine.sh(
        "docker", "ps", "-q", "--filter", f"label=com.docker.swarm.service.name={service}"
    ).split()
    engine.sh("docker", "kill", container)
    events = await _succeeded(stack, task_id)
    attempts = {int(data.get("attempt", 1)) for name, data in events if name == "started"}
    succeeded = [name for name, _ in events if name == "succeeded"]
    engine.FIGURES["kill_redeliver"] = f"attempts {sorted(attempts)}, succeeded {len(succeeded)}"
    assert len(attempts) >= 2
    assert 1 == len(succeeded)


async def test_a_nats_node_scaled_to_zero_and_back_loses_nothing(stack: Stack) -> None:
    engine.sh("docker", "service", "scale", "-d", f"{engine.STACK}_nats-2=0")
    await _until(lambda: _replicas(f"{engine.STACK}_nats-2") == "0/0", 60, "nats-2 down")
    tasks = [await stack.submit({**BODY, "seed": 100 + n}) for n in range(4)]
    engine.sh("docker", "service", "scale", "-d", f"{engine.STACK}_nats-2=1")
    tasks += [await stack.submit({**BODY, "seed": 200 + n}) for n in range(4)]
    for task_id in tasks:
        await _succeeded(stack, task_id)
    await _until(lambda: _replicas(f"{engine.STACK}_nats-2") == "1/1", 120, "nats-2 back")


async def test_a_function_env_update_rolls_the_service(stack: Stack) -> None:
    service = STATE["service"]
    status, answer = await stack.call(
        "POST",
        "/batch_update_sd_resource",
        json={"models": [MODEL], "env": {"SDSWARM_PREVIEW_INTERVAL_S": "3"}, "minInstances": 1},
    )
    assert 200 == status, answer

    def rolled() -> bool:
        env = engine.sh(
            "docker", "service", "inspect", service,
            "--format", "{{json .Spec.TaskTemplate.ContainerSpec.Env}}",
        )  # fmt: skip
        return "SDSWARM_PREVIEW_INTERVAL_S=3" in env and _replicas(service) == "1/1"

    await _until(rolled, 180, f"{service} rolled with the new env")
    task_id = await stack.submit({**BODY, "seed": 300})
    await _succeeded(stack, task_id)


async def test_a_model_delete_removes_its_service(stack: Stack) -> None:
    service = STATE["service"]
    status, answer = await stack.call("DELETE", f"/models/{MODEL}?type=stableDiffusion")
    assert 200 == status, answer
    await _until(lambda: service not in engine.services(), 120, f"{service} removed")


async def test_stack_rm_leaves_no_worker_service(stack: Stack, tiny_checkpoint: Any) -> None:
    name = "tiny-again.safetensors"
    with tiny_checkpoint.open("rb") as file:
        status, answer = await stack.call("PUT", f"/models/{name}?type=stableDiffusion", data=file)
    assert status in (200, 201), answer
    status, answer = await stack.call(
        "POST", "/txt2img", json={**BODY, "stable_diffusion_model": name}
    )
    assert 200 == status, answer
    status, model = await stack.call("GET", f"/models/{name}?type=stableDiffusion")
    assert f"sd_{model['modelKey']}" in engine.services()
    started = time.monotonic()
    await asyncio.to_thread(engine.remove_stack)
    engine.FIGURES["stack_rm_s"] = round(time.monotonic() - started, 1)
    assert [] == [n for n in engine.services() if n.startswith("sd_")]
