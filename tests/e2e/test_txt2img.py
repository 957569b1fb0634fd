"""txt2img end to end: gateway → NATS → real worker (diffusers, tiny checkpoint) →
object store and MongoDB, with both object-store backends."""

from __future__ import annotations

import asyncio
import io
import json
import time
from typing import Any

import pytest
from nats.js.errors import NotFoundError
from PIL import Image
from PIL.PngImagePlugin import PngImageFile

from proto import names
from proto.commands import Txt2ImgTask
from proto.enums import TaskStatus
from services.common import bus
from tests.e2e.test_preview_decoder import blocky
from tests.system import System
from tests.waiting import eventually

pytestmark = pytest.mark.e2e

MODEL = "tiny.safetensors"
BODY = {
    "stable_diffusion_model": MODEL,
    "prompt": "a photo of a cat",
    "negative_prompt": "blurry",
    "steps": 4,
    "width": 64,
    "height": 64,
    "seed": 1234,
    "sampler_name": "Euler a",
}
DEADLINE_S = 180


async def _poll_result(system: System, task_id: str) -> dict[str, Any]:
    async def finished() -> dict[str, Any] | None:
        async with system.http.get(f"{system.url}/tasks/{task_id}/result") as response:
            assert 200 == response.status
            result: dict[str, Any] = await response.json()
        return result if TaskStatus(result["status"]).terminal else None

    return await eventually(finished, f"task {task_id} finished", timeout_s=DEADLINE_S)


async def test_async_txt2img_progress_sse_and_result(system: System) -> None:
    started = time.monotonic()
    async with system.http.post(
        f"{system.url}/txt2img", json={**BODY, "batch_size": 2}, headers={"Request-Type": "async"}
    ) as response:
        assert 202 == response.status
        body = await response.json()
        assert response.headers["taskId"] == body["taskId"]
    assert "waiting" == body["status"]
    assert time.monotonic() - started < 5, "async submit must answer at once"
    task_id = body["taskId"]

    events = await asyncio.wait_for(system.events(task_id), DEADLINE_S)
    kinds = [name for name, _ in events]
    assert "succeeded" == kinds[-1], kinds
    steps = [data["step"] for name, data in events if name == "progress"]
    assert sorted(steps) == steps
    assert len(steps) >= 2, steps
    assert 4 == steps[-1]
    previews = [d["preview_key"] for n, d in events if n == "progress" and d.get("preview_key")]
    assert [f"images/default/{task_id}_progress.png"] == sorted(set(previews))
    preview = Image.open(io.BytesIO(await system.objects.get(previews[0])))
    assert (64, 64) == preview.size, "8×8 latents shown ×8"
    assert blocky(preview), "no TAESD registered: the latent approximation"
    assert kinds.index("started") < kinds.index("progress")
    start = next(data for name, data in events if name == "started")
    assert start["stream_seq"] > 0, "a start records its command's stream sequence"

    result = await _poll_result(system, task_id)
    assert "succeeded" == result["status"]
    assert [f"images/default/{task_id}_1.png", f"images/default/{task_id}_2.png"] == result[
        "images"
    ]
    assert 2 == len(result["ossUrl"])
    for key in result["images"]:
        image = Image.open(io.BytesIO(await system.objects.get(key)))
        assert isinstance(image, PngImageFile)
        assert (64, 64) == image.size
        assert "Steps: 4, Sampler: Euler a" in image.text["parameters"]
    for url, key in zip(result["ossUrl"], result["images"], strict=True):
        async with system.http.get(url) as download:
            assert 200 == download.status
            assert "image/png" == download.content_type
            assert await system.objects.get(key) == await download.read()
            etag = download.headers["ETag"]
        # Served from the file: ranges and revalidation, not a whole read into memory.
        async with system.http.get(url, headers={"Range": "bytes=1-3"}) as part:
            assert (206, b"PNG") == (part.status, await part.read())
        async with system.http.get(url, headers={"If-None-Match": etag}) as again:
            assert 304 == again.status
    assert [1234, 1235] == result["info"]["all_seeds"]
    assert 4 == result["parameters"]["steps"]

    doc = await system.task(task_id)
    assert doc is not None
    assert "succeeded" == doc["status"]
    assert doc["created_at"] <= doc["started_at"] <= doc["finished_at"]
    command = await system.command(task_id)
    assert isinstance(command, Txt2ImgTask)
    assert MODEL == command.request.stable_diffusion_model
    assert json.loads(doc["info"])["seed"] == 1234

    async with system.http.get(f"{system.url}/tasks/{task_id}/progress") as response:
        progress = await response.json()
    assert (1.0, "succeeded", 4) == (
        progress["progress"],
        progress["status"],
        progress["state"]["sampling_step"],
    )


async def test_sync_txt2img_returns_the_result_in_one_call(system: System) -> None:
    async with system.http.post(f"{system.url}/txt2img", json=BODY) as response:
        assert 200 == response.status
        body = await response.json()
    assert "succeeded" == body["status"]
    assert 1 == len(body["ossUrl"])
    async with system.http.get(body["ossUrl"][0]) as download:
        image = Image.open(io.BytesIO(await download.read()))
    assert (64, 64) == image.size


async def test_same_seed_gives_byte_identical_images(system: System) -> None:
    keys = []
    for _ in range(2):
        async with system.http.post(f"{system.url}/txt2img", json={**BODY, "seed": 99}) as r:
            body = await r.json()
            assert "succeeded" == body["status"], body
        keys.append(body["images"][0])
    first, second = [await system.objects.get(key) for key in keys]
    assert first == second


@pytest.mark.parametrize(
    ("payload", "status", "field"),
    [
        (json.dumps({**BODY, "width": 513}).encode(), 422, "width"),
        (b"{this is not json", 400, None),
        (
            json.dumps({**BODY, "stable_diffusion_model": "nope.safetensors"}).encode(),
            404,
            "stable_diffusion_model",
        ),
        (json.dumps({**BODY, "steps": 100_000}).encode(), 422, "steps"),
    ],
)
async def test_bad_input_costs_nothing(
    system: System, payload: bytes, status: int, field: str | None
) -> None:
    nc = await bus.connect(system.nats_url, "e2e-check")
    try:
        js = nc.jetstream()
        before_msgs = (await js.stream_info(names.TASK_STREAM)).state.messages
        before_docs = await system.db["tasks"].count_documents({})
        async with system.http.post(
            f"{system.url}/txt2img", data=payload, headers={"Content-Type": "application/json"}
        ) as response:
            assert status == response.status
            error = await response.json()
        assert error.get("field") == field
        assert error["message"]
        assert before_docs == await system.db["tasks"].count_documents({})
        assert before_msgs == (await js.stream_info(names.TASK_STREAM)).state.messages
        # An unknown model never gets a consumer, so no worker can ever start for it.
        with pytest.raises(NotFoundError):
            await js.consumer_info(
                names.TASK_STREAM, names.consumer_name(names.model_key("nope.safetensors"))
            )
    finally:
        await nc.close()


async def test_healthz_and_models(system: System) -> None:
    async with system.http.get(f"{system.url}/healthz") as response:
        assert 200 == response.status
        assert {"nats": "ok", "mongodb": "ok", "objects": "ok"} == (await response.json())["checks"]
    async with system.http.get(f"{system.url}/models") as response:
        models = await response.json()
    assert [MODEL] == [m["name"] for m in models]
    assert "sd1" == models[0]["family"]
    assert "stableDiffusion" == models[0]["type"]
    async with system.http.get(f"{system.url}/openapi.json") as response:
        assert "3.1.0" == (await response.json())["openapi"]
    async with system.http.get(f"{system.url}/docs") as response:
        assert "/sdapi/v1/txt2img" in await response.text()
