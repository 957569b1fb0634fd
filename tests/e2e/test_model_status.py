"""Model statuses follow the workers: unloaded → loaded; a file that fails to load is
`failed` with the reason, and its queued task fails with that reason instead of waiting."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file, save_file

from tests.system import System, SystemFactory
from tests.waiting import eventually

pytestmark = pytest.mark.e2e


@pytest.fixture
async def good_and_bad(make_system: SystemFactory, tiny_checkpoint: Path) -> AsyncIterator[System]:
    models = make_system.models(["good.safetensors"])
    # Passes the header checks, but a UNet tensor is missing: only loading finds out.
    state = load_file(str(tiny_checkpoint))
    del state["model.diffusion_model.out.2.bias"]
    save_file(state, str(models / "Stable-diffusion" / "bad.safetensors"))
    async with make_system(models=models, gpu_slots=2) as system:
        yield system


async def _models(system: System) -> dict[str, dict[str, Any]]:
    async with system.http.get(f"{system.url}/models") as response:
        return {m["name"]: m for m in await response.json()}


async def test_statuses_are_true(good_and_bad: System) -> None:
    system = good_and_bad
    assert {"good.safetensors": "unloaded", "bad.safetensors": "unloaded"} == {
        k: v["status"] for k, v in (await _models(system)).items()
    }
    tasks = {}
    for name in ("good.safetensors", "bad.safetensors"):
        body = {
            "stable_diffusion_model": name,
            "prompt": "x",
            "steps": 2,
            "width": 64,
            "height": 64,
        }
        tasks[name] = await system.submit(body)

    good = await system.finished(tasks["good.safetensors"])
    bad = await system.finished(tasks["bad.safetensors"])
    assert "succeeded" == good["status"]
    assert ("failed", "model_load_failed") == (bad["status"], bad["code"])
    assert "bad.safetensors" in bad["message"]

    async def settled() -> Any:
        models = await _models(system)
        ok = models["good.safetensors"]["status"] == "loaded"
        return models if ok and models["bad.safetensors"]["status"] == "failed" else None

    models = await eventually(settled, "good loaded, bad failed", timeout_s=120)
    assert 1 == models["good.safetensors"]["loadedWorkers"]
    assert "bad.safetensors" in models["bad.safetensors"]["error"]
    # New work for the failed checkpoint is refused up front.
    body = {"stable_diffusion_model": "bad.safetensors", "prompt": "x", "steps": 2}
    async with system.http.post(f"{system.url}/txt2img", json=body) as response:
        assert (409, "model_unusable") == (response.status, (await response.json())["code"])

    # The operator's view, from the same sources.
    env = {
        **os.environ,
        "SDSWARM_NATS_URL": system.nats_url,
        "SDSWARM_MONGODB_URL": system.settings.mongodb_url,
        "SDSWARM_MONGODB_DB": system.settings.mongodb_db,
        "SDSWARM_GPU_SLOTS": "2",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        "status",
        "--data-dir",
        "/nonexistent",
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    lines = out.decode().splitlines()
    assert 0 == process.returncode
    good_line = next(line for line in lines if line.startswith("good.safetensors"))
    assert "loaded" in good_line
    assert "1 ready" in good_line
    assert lines[-1].startswith("budget: ")
    assert lines[-1].endswith("of 2 slots in use   (* = operator pin)")
