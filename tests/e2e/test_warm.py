"""Pre-warm: ``POST /models/{name}/warm`` starts a checkpoint's worker with no task queued;
its measured cold start (in phases) then shows in the function listing."""

from __future__ import annotations

import time
from typing import Any

import pytest

from proto.workers import WorkerState, WorkerStatus
from services.common import bus
from services.inference.coldstart import PHASES
from tests.system import System
from tests.waiting import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("system", ["local"], indirect=True)]

MODEL = "tiny.safetensors"


async def _post(system: System, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with system.http.post(system.url + path, json=body) as response:
        return response.status, await response.json()


async def _function(system: System) -> dict[str, Any]:
    async with system.http.get(f"{system.url}/list/sdapi/functions") as response:
        [function] = (await response.json())["functions"]
    assert isinstance(function, dict)
    return function


async def _ready_workers(system: System, want: int, timeout_s: float = 120) -> list[WorkerStatus]:
    nc = await bus.connect(system.nats_url, "warm-test")

    async def ready() -> tuple[list[WorkerStatus]] | None:
        found = [
            r
            for r in await bus.worker_records(nc.jetstream())
            if r.state is WorkerState.READY and r.model_name == MODEL
        ]
        return (found,) if len(found) == want else None  # a tuple: [] is an answer too

    try:
        [found] = await eventually(ready, f"{want} ready workers", timeout_s=timeout_s)
    finally:
        await nc.close()
    return found


async def test_warm_starts_a_worker_with_no_task_queued(system: System) -> None:
    status, body = await _post(system, "/models/nope.safetensors/warm", {})
    assert (404, "model_not_found") == (status, body["code"])
    status, body = await _post(system, f"/models/{MODEL}/warm", {"seconds": 0})
    assert 422 == status

    started = time.monotonic()
    status, body = await _post(system, f"/models/{MODEL}/warm", {"seconds": 600})
    assert (202, "warming") == (status, body["message"])
    [worker] = await _ready_workers(system, 1)
    ready_after = time.monotonic() - started
    assert 0 == await system.db["tasks"].count_documents({}), "no task was ever queued"
    assert [] == worker.task_ids

    # The worker measured its start in phases, from its own process's start.
    assert list(PHASES) == list(worker.load_phases)
    # Forked from the preloaded server (the default), its imports are done before it
    # starts: the phase is its own start up to its NATS connection, 0.15 s on a fast
    # machine (an exec'd worker counts the interpreter and torch's import, over 1 s).
    assert worker.load_phases["imports"] > 0, "the process's own start counts"
    assert sum(worker.load_phases.values()) < ready_after

    async def listed() -> dict[str, Any] | None:
        function = await _function(system)
        return function if function["replicas"] else None

    function = await eventually(listed, "the cold start in the listing", timeout_s=30)
    assert (1, "loaded") == (function["replicas"], function["state"])
    assert worker.load_phases == function["coldStartPhases"]
    assert function["coldStartSeconds"] == pytest.approx(sum(worker.load_phases.values()), 0.01)
    assert function["warmUntil"] is not None
    print(f"\nwarm: ready {ready_after:.1f} s after the request; phases {worker.load_phases}")

    # Past its deadline a warmed pool goes back to the idle timeout: zero workers.
    status, _ = await _post(system, "/batch_update_sd_resource", {"idleTimeout": 1})
    assert 200 == status
    status, _ = await _post(system, f"/models/{MODEL}/warm", {"seconds": 0.5})
    assert 202 == status
    await _ready_workers(system, 0)
