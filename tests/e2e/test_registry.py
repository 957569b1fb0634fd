"""The model API end to end: upload (HTTP and CLI), object-store registration with its
etag checked, refusals that execute nothing, names with spaces and Unicode, and delete
while tasks are queued."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import pickle
import shutil
import sys
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file
from safetensors.torch import load_file
from safetensors.torch import save_file as save_file_torch

from services.common import bus
from services.common.bus import worker_records
from tests.system import System, SystemFactory
from tests.waiting import eventually, until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
async def system(make_system: SystemFactory) -> AsyncIterator[System]:
    models = make_system.models()
    async with make_system(models=models, gpu_slots=1, registry_wait_s=30) as system:
        yield system


async def _status_is(system: System, name: str, status: str | None) -> bool:
    """Whether the model's status is ``status`` (None: the model is gone, 404)."""
    code, body = await _get(system, name)
    return (code == 404) if status is None else (code == 200 and body["status"] == status)


def _url(system: System, name: str, **query: str) -> str:
    suffix = f"?{urllib.parse.urlencode(query)}" if query else ""
    return f"{system.url}/models/{urllib.parse.quote(name)}{suffix}"


async def _get(system: System, name: str, **query: str) -> tuple[int, Any]:
    async with system.http.get(_url(system, name, **query)) as response:
        return response.status, await response.json()


async def _upload(system: System, name: str, data: bytes, **query: str) -> tuple[int, Any]:
    async with system.http.put(
        _url(system, name, **query),
        data=io.BytesIO(data),
        headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(data))},
    ) as response:
        return response.status, await response.json()


async def test_upload_then_generate_with_a_unicode_name(
    system: System, tiny_checkpoint: Path
) -> None:
    name = "my models/Ünïcode ckpt v1.safetensors"
    data = tiny_checkpoint.read_bytes()  # noqa: ASYNC240
    status, body = await _upload(system, name, data)
    assert 201 == status, body
    model = body["model"]
    assert (name, "unloaded", "sd1") == (model["name"], model["status"], model["family"])
    assert hashlib.sha256(data).hexdigest() == model["sha256"]

    # The A1111 enumeration and the registry agree.
    async with system.http.get(f"{system.url}/sdapi/v1/sd-models") as response:
        titles = {m["model_name"]: m for m in await response.json()}
    assert "Ünïcode ckpt v1" in titles
    assert model["sha256"] == titles["Ünïcode ckpt v1"]["sha256"]

    seen: set[str] = set()

    async def watch() -> None:
        while True:
            seen.add((await _get(system, name))[1]["status"])
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    try:
        body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64}
        body["stable_diffusion_model"] = name
        async with system.http.post(f"{system.url}/txt2img", json=body) as response:
            result = await response.json()
            assert 200 == response.status, result
        assert "succeeded" == result["status"]
        # The scheduler syncs statuses on its next tick.
        await until(lambda: "loaded" in seen, f"loaded among {seen}", timeout_s=30)
    finally:
        watcher.cancel()
    assert "loaded" in seen, seen
    assert {"unloaded", "loading", "loaded"} >= seen, seen


async def test_uploads_that_are_not_safe_tensors_are_refused(
    system: System, tiny_checkpoint: Path
) -> None:
    marker = Path(os.environ.get("TMPDIR", "/tmp")) / f"sdswarm-pwned-{os.getpid()}"
    payload = pickle.dumps(_Exploit(str(marker)))
    data = tiny_checkpoint.read_bytes()  # noqa: ASYNC240
    cases = {
        "truncated.safetensors": data[: len(data) // 2],
        "pickled.safetensors": payload,
        "huge-header.safetensors": (2**40).to_bytes(8, "little") + b"{}",
    }
    for name, content in cases.items():
        status, body = await _upload(system, name, content)
        assert 422 == status, (name, body)
        assert "invalid_model" == body["code"]
        assert 404 == (await _get(system, name))[0], "a refused upload registers nothing"
    status, body = await _upload(system, "model.ckpt", payload)
    assert (422, "name") == (status, body["field"]), "pickles need the operator's opt-in"
    assert not marker.exists(), "nothing in an uploaded file is ever executed"
    folder = Path(system.settings.models_dir) / "Stable-diffusion"
    assert folder.is_dir()
    assert not [p for p in folder.rglob("*") if p.name.startswith(".")], "no partial files"

    # A LoRA slot does not take a checkpoint: the declared type must match the tensors.
    status, body = await _upload(system, "style", data, type="lora")
    assert 422 == status
    assert "is a stableDiffusion" in body["message"]


class _Exploit:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.path}",))


async def test_register_from_the_object_store_checks_the_etag(
    system: System, tiny_checkpoint: Path
) -> None:
    data = tiny_checkpoint.read_bytes()  # noqa: ASYNC240
    await system.objects.put("uploads/admin/tiny-copy.safetensors", data, "application/x-st")
    request = {
        "type": "stableDiffusion",
        "name": "copied.safetensors",
        "ossPath": "uploads/admin/tiny-copy.safetensors",
        "etag": "0" * 32,
    }
    async with system.http.post(f"{system.url}/models", json=request) as response:
        body = await response.json()
        assert (422, "invalid_model") == (response.status, body["code"]), body
    status, model = await _get(system, "copied.safetensors")
    assert (200, "failed") == (status, model["status"])
    assert "etag" in model["error"]

    # The right etag (here the MD5, as S3 reports it for single-part uploads) registers.
    request["etag"] = hashlib.md5(data, usedforsecurity=False).hexdigest()
    async with system.http.post(f"{system.url}/models", json=request) as response:
        body = await response.json()
        assert 201 == response.status, body
    assert ("unloaded", "uploads/admin/tiny-copy.safetensors") == (
        body["model"]["status"],
        body["model"]["ossPath"],
    )
    async with system.http.post(f"{system.url}/models", json=request) as response:
        assert (409, "model_exists") == (response.status, (await response.json())["code"])


async def test_cli_add_ls_rm(system: System, tiny_checkpoint: Path, tmp_path: Path) -> None:
    source = tmp_path / "cli model.safetensors"
    shutil.copy(tiny_checkpoint, source)
    base = [sys.executable, "-m", "services.cli", "models", "--url", system.url]

    async def cli(*args: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            *base, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await process.communicate()
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    code, out, err = await cli("add", str(source))
    assert 0 == code, err
    assert "cli model.safetensors: unloaded" in out
    assert "100.0%" in err, "a progress bar on stderr"
    code, out, _ = await cli("ls", "--type", "stableDiffusion")
    assert any(line.endswith(" cli model.safetensors") for line in out.splitlines()), out
    code, out, _ = await cli("rm", "cli model.safetensors")
    assert (0, "delete success") == (code, json.loads(out)["message"])
    assert 404 == (await _get(system, "cli model.safetensors"))[0]


async def test_delete_fails_queued_tasks_and_stops_workers(
    system: System, tiny_checkpoint: Path
) -> None:
    name = "doomed.safetensors"
    status, _ = await _upload(system, name, tiny_checkpoint.read_bytes())  # noqa: ASYNC240
    assert 201 == status
    body = {"prompt": "x", "steps": 30, "width": 64, "height": 64}
    task_ids = [await system.submit({**body, "stable_diffusion_model": name}) for _ in range(3)]
    async with system.http.delete(_url(system, name)) as response:
        assert 200 == response.status
    assert 404 == (await _get(system, name))[0]
    async with system.http.post(
        f"{system.url}/txt2img", json={**body, "stable_diffusion_model": name}
    ) as response:
        assert 404 == response.status, "new requests for a deleted model: 404 at once"

    finished = [
        await system.task_when(t, lambda d: d["status"] in ("succeeded", "failed", "cancelled"))
        for t in task_ids
    ]
    # A task a worker had already started may finish; every other one fails with the reason.
    deleted = [d for d in finished if d["status"] == "failed"]
    assert deleted, [d["status"] for d in finished]
    assert all(d.get("code") == "model_deleted" for d in deleted)
    assert all("deleted" in d["message"] for d in deleted)
    assert {"succeeded", "failed"} >= {d["status"] for d in finished}

    # The record stays for history; no worker of it is left.
    history = await system.db["models"].find_one({"name": name})
    assert "deleted" == history["status"]
    assert not (Path(system.settings.models_dir) / "Stable-diffusion" / name).exists()
    nc = await bus.connect(system.nats_url, "registry-test")
    try:

        async def stopped() -> bool:
            workers = await worker_records(nc.jetstream())
            return all(w.model_key != history["model_key"] for w in workers)

        await eventually(stopped, "no worker of the deleted model", interval_s=0.2)
    finally:
        await nc.close()


async def test_dropped_in_files_appear_on_refresh_and_enumerations_agree(
    system: System,
) -> None:
    folder = Path(system.settings.models_dir) / "Lora"
    folder.mkdir(exist_ok=True)
    key = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors = {f"{key}.lora_down.weight": np.zeros((4, 768), dtype=np.float16)}
    save_file(tensors, str(folder / "ink.v2.safetensors"))
    async with system.http.post(f"{system.url}/sdapi/v1/refresh-loras") as response:
        assert 200 == response.status
    async with system.http.get(f"{system.url}/sdapi/v1/loras") as response:
        loras = {m["name"]: m for m in await response.json()}
    async with system.http.get(f"{system.url}/models", params={"type": "lora"}) as response:
        registry = {m["name"]: m for m in await response.json()}
    assert set(loras) == set(registry)
    assert "ink.v2" in loras
    assert ("unloaded", "sd1") == (registry["ink.v2"]["status"], registry["ink.v2"]["family"])


def _variant(checkpoint: Path, target: Path) -> bytes:
    """Another valid checkpoint: the same tiny model with one weight changed."""
    state = load_file(str(checkpoint))
    state["model.diffusion_model.out.2.bias"] += 0.5
    save_file_torch(state, str(target))
    return target.read_bytes()


async def _statuses_while(system: System, name: str, work: Any) -> list[str]:
    """The model's statuses seen while ``work`` runs, consecutive repeats dropped."""
    seen: list[str] = []

    async def watch() -> None:
        while True:
            status, body = await _get(system, name)
            current = body["status"] if status == 200 else "absent"
            if not seen or seen[-1] != current:
                seen.append(current)
            await asyncio.sleep(0.03)

    watcher = asyncio.create_task(watch())
    try:
        await work
    finally:
        watcher.cancel()
    status, body = await _get(system, name)  # the status the work left behind
    final = body["status"] if status == 200 else "absent"
    if not seen or seen[-1] != final:
        seen.append(final)
    return seen


async def test_statuses_follow_upload_load_and_idle_stop(
    system: System, tiny_checkpoint: Path
) -> None:
    name = "statuses.safetensors"
    data = tiny_checkpoint.read_bytes()  # noqa: ASYNC240

    async def slow_body() -> AsyncIterator[bytes]:
        quarter = len(data) // 4 + 1
        for start in range(0, len(data), quarter):
            yield data[start : start + quarter]
            await asyncio.sleep(0.3)

    async def upload() -> None:
        async with system.http.put(
            _url(system, name),
            data=slow_body(),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(data))},
        ) as response:
            assert 201 == response.status, await response.text()

    seen = await _statuses_while(system, name, upload())
    assert ["registering", "unloaded"] == [s for s in seen if s != "absent"], seen

    # Its pool stops 1 s after its last task; the status follows the worker.
    async with system.http.post(
        f"{system.url}/batch_update_sd_resource", json={"models": [name], "idleTimeout": 1}
    ) as response:
        assert 200 == response.status, await response.text()

    async def generate_then_idle() -> None:
        body = {"prompt": "x", "steps": 2, "width": 64, "height": 64}
        body["stable_diffusion_model"] = name
        async with system.http.post(f"{system.url}/txt2img", json=body) as response:
            assert 200 == response.status, await response.text()
        await eventually(lambda: _status_is(system, name, "unloaded"), "the idle worker stopped")

    seen = await _statuses_while(system, name, generate_then_idle())
    # `loading` lasts as long as the tiny model takes to load (about a second here), so a
    # very fast load may pass between two scheduler ticks; the order is what must hold.
    assert ["unloaded", "loaded", "unloaded"] == [s for s in seen if s != "loading"], seen
    assert {"unloaded", "loading", "loaded"} >= set(seen)

    # With no warm worker, a waiting task's ETA is the measured cold start.
    body = {"prompt": "x", "steps": 2, "width": 64, "height": 64, "stable_diffusion_model": name}
    task_id = await system.submit(body)
    async with system.http.get(f"{system.url}/tasks/{task_id}/progress") as response:
        progress = await response.json()
    assert "waiting" == progress["status"], "its pool was stopped: it waits for a cold start"
    assert progress["coldStartSeconds"] > 0
    assert progress["coldStartSeconds"] == progress["etaRelative"]
    await system.succeeded(task_id)


async def test_replacing_a_checkpoint_rolls_its_workers_and_loses_no_task(
    system: System, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    name = "rolling.safetensors"
    first = tiny_checkpoint.read_bytes()  # noqa: ASYNC240
    assert 201 == (await _upload(system, name, first))[0]
    body: dict[str, Any] = {"prompt": "x", "steps": 2, "width": 64, "height": 64}
    body["stable_diffusion_model"] = name

    async def model_hash() -> str:
        async with system.http.post(
            f"{system.url}/sdapi/v1/txt2img",
            json={**body, "override_settings": {"sd_model_checkpoint": name}},
        ) as response:
            result = await response.json()
            assert 200 == response.status, result
        return str(json.loads(result["info"])["sd_model_hash"])

    assert hashlib.sha256(first).hexdigest()[:10] == await model_hash()
    queued = [await system.submit({**body, "steps": 8}) for _ in range(3)]
    second = _variant(tiny_checkpoint, tmp_path / "b.safetensors")
    status, replaced = await _upload(system, name, second)
    assert 200 == status, replaced
    assert hashlib.sha256(second).hexdigest() == replaced["model"]["sha256"]
    for task_id in queued:
        await system.succeeded(task_id)
    # The worker that held the old weights stepped down; a fresh one loaded the new file.
    new_hash = hashlib.sha256(second).hexdigest()[:10]

    async def new_weights() -> bool:
        return await model_hash() == new_hash

    await eventually(new_weights, "a worker with the new weights")


async def test_delete_with_drain_runs_the_queue_first(
    system: System, tiny_checkpoint: Path
) -> None:
    name = "drained.safetensors"
    status, _ = await _upload(system, name, tiny_checkpoint.read_bytes())  # noqa: ASYNC240
    assert 201 == status
    body = {"prompt": "x", "steps": 6, "width": 64, "height": 64, "stable_diffusion_model": name}
    queued = [await system.submit(body) for _ in range(2)]
    async with system.http.delete(_url(system, name, drain="true")) as response:
        answer = await response.json()
        assert 202 == response.status, answer
    assert "draining" == answer["message"]
    async with system.http.post(f"{system.url}/txt2img", json=body) as response:
        assert 404 == response.status, "no new work for a draining model"
    for task_id in queued:
        await system.succeeded(task_id)
    await eventually(lambda: _status_is(system, name, None), "model deleted", timeout_s=30)
    history = await system.db["models"].find_one({"name": name})
    assert "deleted" == history["status"]
    assert not (Path(system.settings.models_dir) / "Stable-diffusion" / name).exists()
