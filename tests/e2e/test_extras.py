"""Extras through the whole system: a task on the extras pool, results in the store."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from proto import ModelType, names
from proto.codec import decode_generate
from proto.commands import Txt2ImgTask
from tests.fixtures.upscaler import save_compact
from tests.system import System

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("system", ["local"], indirect=True)]


def _png(size: tuple[int, int]) -> str:
    image = Image.new("RGB", size)
    for x in range(size[0]):
        image.putpixel((x, 0), (x * 7 % 256, 40, 200))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


async def _post(
    system: System, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    async with system.http.post(f"{system.url}{path}", json=body, headers=headers) as response:
        return response.status, await response.json()


async def test_extra_images_sync_runs_on_the_extras_pool(system: System) -> None:
    body = {"image": _png((40, 24)), "upscaler_1": "Lanczos", "upscaling_resize": 2}
    status, result = await _post(system, "/extra_images", body, {"taskId": "extras-sync-1"})
    assert (200, "succeeded") == (status, result["status"]), result
    assert "extras-sync-1" == result["taskId"]
    # Object keys carry the task's internal id (a chosen one is scoped to its user).
    internal = names.scoped_task_id("default", "extras-sync-1")
    assert [names.image_key("default", internal, 1)] == result["images"]
    image = Image.open(io.BytesIO(await system.objects.get(result["images"][0])))
    assert (80, 48) == image.size
    # A sync answer comes once the task document is terminal: the result route agrees.
    doc = await system.task("extras-sync-1")
    assert doc is not None
    assert "succeeded" == doc["status"]
    assert ("extras", names.EXTRAS_MODEL_KEY) == (doc["kind"], doc["model_key"])
    assert (1, 1) == (doc["progress"]["step"], doc["progress"]["total_steps"])
    async with system.http.get(f"{system.url}/tasks/extras-sync-1/result") as response:
        stored = await response.json()
    assert "Postprocess upscaler: Lanczos" in stored["info"]["postprocessing"]
    assert f"inputs/default/{internal}_0.png" == stored["parameters"]["image"]


async def test_a1111_extra_single_image_and_upscalers(system: System) -> None:
    body = {
        "image": _png((30, 20)),
        "resize_mode": 1,
        "upscaling_resize_w": 64,
        "upscaling_resize_h": 64,
        "upscaler_1": "Nearest",
    }
    status, result = await _post(system, "/sdapi/v1/extra-single-image", body)
    assert 200 == status, result
    image = Image.open(io.BytesIO(base64.b64decode(result["image"])))
    assert (64, 64) == image.size, "to size, cropped"
    assert "Postprocess crop to: 64x64" in result["html_info"]
    async with system.http.get(f"{system.url}/sdapi/v1/upscalers") as response:
        listed = await response.json()
    assert ["None", "Lanczos", "Nearest"] == [u["name"] for u in listed][:3]


@pytest.mark.parametrize(
    ("field", "value"),
    [("upscaler_1", "R-ESRGAN 4x+"), ("codeformer_visibility", 0.5), ("upscaling_resize", 9)],
)
async def test_bad_field_is_refused_and_nothing_queued(
    system: System, field: str, value: Any
) -> None:
    before = await system.db["tasks"].count_documents({"kind": "extras"})
    body = {"image": _png((16, 16)), "upscaler_1": "Lanczos", field: value}
    status, result = await _post(system, "/extra_images", body)
    assert 422 == status, result
    assert field == result["field"], result
    assert before == await system.db["tasks"].count_documents({"kind": "extras"})


async def test_async_extras_and_batch(system: System) -> None:
    body = {"image": _png((16, 8)), "upscaler_1": "Nearest", "upscaling_resize": 3}
    status, result = await _post(system, "/extra_images", body, {"Request-Type": "async"})
    assert (202, "waiting") == (status, result["status"]), result
    doc = await system.succeeded(result["taskId"])
    image = Image.open(io.BytesIO(await system.objects.get(doc["images"][0])))
    assert (48, 24) == image.size
    batch = {
        "imageList": [{"data": _png((16, 16)), "name": "a"}, {"data": _png((24, 8))}],
        "upscaler_1": "Lanczos",
        "upscaling_resize": 2,
    }
    status, result = await _post(system, "/sdapi/v1/extra-batch-images", batch)
    assert 200 == status, result
    sizes = [Image.open(io.BytesIO(base64.b64decode(i))).size for i in result["images"]]
    assert [(32, 32), (48, 16)] == sizes


async def test_registered_model_upscaler(system: System, tmp_path: Path) -> None:
    """A file in ``ESRGAN/`` is an upscaler, run through spandrel."""
    save_compact(tmp_path / "ESRGAN" / "tiny_x2.safetensors")
    await system.register_models(tmp_path, (ModelType.UPSCALER,))
    async with system.http.get(f"{system.url}/sdapi/v1/upscalers") as response:
        listed = {u["name"]: u["scale"] for u in await response.json()}
    assert 2 == listed["tiny_x2"], "the true scale, read from the weights at registration"
    body = {"image": _png((16, 8)), "upscaler_1": "tiny_x2", "upscaling_resize": 2}
    status, result = await _post(system, "/extra_images", body)
    assert (200, "succeeded") == (status, result["status"]), result
    image = Image.open(io.BytesIO(await system.objects.get(result["images"][0])))
    assert (32, 16) == image.size


async def test_hires_fix_with_a_registered_model_upscaler(system: System, tmp_path: Path) -> None:
    """``hr_upscaler`` may name a registered upscaler; an unknown name is a 422 that lists
    the built-ins and the registered models, and queues nothing."""
    save_compact(tmp_path / "ESRGAN" / "tiny_hr_x2.safetensors")
    await system.register_models(tmp_path, (ModelType.UPSCALER,))
    body = {
        "stable_diffusion_model": "tiny.safetensors",
        "prompt": "a cat",
        "steps": 2,
        "width": 64,
        "height": 64,
        "enable_hr": True,
        "hr_scale": 2,
        "denoising_strength": 0.5,
    }
    before = await system.db["tasks"].count_documents({})
    status, result = await _post(system, "/txt2img", body | {"hr_upscaler": "4x-UltraSharp"})
    assert (422, "hr_upscaler") == (status, result["field"]), result
    assert "Latent (bicubic antialiased)" in result["message"]
    assert "Lanczos" in result["message"]
    assert "tiny_hr_x2" in result["message"]
    assert before == await system.db["tasks"].count_documents({})
    status, result = await _post(system, "/txt2img", body | {"hr_upscaler": "tiny_hr_x2"})
    assert (200, "succeeded") == (status, result["status"]), result
    image = Image.open(io.BytesIO(await system.objects.get(result["images"][0])))
    assert (128, 128) == image.size
    assert "Hires upscaler: tiny_hr_x2" in image.text["parameters"]  # type: ignore[attr-defined]
    doc = await system.task(result["taskId"])
    assert doc is not None
    command = decode_generate(doc["command"])
    assert isinstance(command, Txt2ImgTask)
    assert command.hr_upscaler is not None, "the worker is told which file to run"
    assert command.hr_upscaler.path.endswith("tiny_hr_x2.safetensors")
