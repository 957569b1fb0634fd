"""ControlNet end to end: the seed's example unit, unchanged, under the names it uses;
the extension's listing routes; bad units refused before anything is stored or queued."""

from __future__ import annotations

import base64
import io
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.fixtures.tiny_controlnet import write_tiny_controlnet
from tests.fixtures.tiny_vae import write_tiny_vae
from tests.system import System, SystemFactory

pytestmark = pytest.mark.e2e

CONTROLNET = "control_v11p_sd15_scribble"


def _drawing() -> str:
    image = Image.new("RGB", (96, 64), "white")
    ImageDraw.Draw(image).rectangle((20, 10, 70, 50), outline="black", width=3)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def seed_unit(image: str) -> dict[str, Any]:
    """The unit of the seed document's txt2img example, its values unchanged (the
    document writes Python's True/False, which are JSON's true/false here)."""
    return {
        "image": image,
        "enabled": True,
        "module": "canny",
        "model": CONTROLNET,
        "weight": 1,
        "resize_mode": "Crop and Resize",
        "low_vram": False,
        "processor_res": 512,
        "threshold_a": 100,
        "threshold_b": 200,
        "guidance_start": 0,
        "guidance_end": 1,
        "pixel_perfect": True,
        "control_mode": "Balanced",
        "input_mode": "simple",
        "batch_images": "",
        "output_dir": "",
        "loopback": False,
    }


BODY = {
    "stable_diffusion_model": "diffusion_v1",
    "sd_vae": "vae_v1",
    "prompt": "Mountain landscape during sunset",
    "negative_prompt": "Avoid mountains",
    "steps": 3,
    "width": 64,
    "height": 64,
    "seed": 123456,
    "cfg_scale": 5,
}


@pytest.fixture(scope="module")
async def system(make_system: SystemFactory, tiny_checkpoint: Path) -> AsyncIterator[System]:
    models = make_system.models([])
    # The seed's names: a diffusers-folder checkpoint is registered by its folder name.
    shutil.copytree(
        tiny_checkpoint.parent / "tiny-diffusers", models / "Stable-diffusion" / "diffusion_v1"
    )
    write_tiny_vae(models / "VAE" / "vae_v1.safetensors")
    write_tiny_controlnet(models / "ControlNet" / f"{CONTROLNET}.safetensors")
    async with make_system(models=models) as system:
        yield system


async def _post(system: System, path: str, body: dict[str, Any], **headers: str) -> Any:
    async with system.http.post(f"{system.url}{path}", json=body, headers=headers) as response:
        return response.status, await response.json()


async def test_the_seed_example_unit_runs_and_steers(system: System) -> None:
    status, plain = await _post(system, "/txt2img", BODY)
    assert (200, "succeeded") == (status, plain["status"]), plain
    body = {**BODY, "alwayson_scripts": {"controlnet": {"args": [seed_unit(_drawing())]}}}
    status, controlled = await _post(system, "/txt2img", body)
    assert (200, "succeeded") == (status, controlled["status"]), controlled
    async with system.http.get(f"{system.url}/tasks/{controlled['taskId']}/result") as response:
        stored = await response.json()
    [unit] = stored["parameters"]["alwayson_scripts"]["controlnet"]["args"]
    key = f"inputs/default/{controlled['taskId']}_0.png"
    assert key == unit["image"], "the stored parameters hold the key, not the base64"
    images = [await system.objects.get(r["images"][0]) for r in (plain, controlled)]
    assert images[0] != images[1]
    text = Image.open(io.BytesIO(images[1])).text["parameters"]  # type: ignore[attr-defined]
    assert f"Model: {CONTROLNET} [" in text
    assert "Pixel Perfect: True" in text


async def test_img2img_unit_without_image_uses_the_init_image(system: System) -> None:
    unit = {"module": "invert", "model": f"{CONTROLNET} [0123abcd]", "weight": 0.8}
    body = {
        **BODY,
        "init_images": [_drawing()],
        "denoising_strength": 0.6,
        "alwayson_scripts": {"ControlNet": {"args": [unit, {"enabled": False}]}},
    }
    status, result = await _post(system, "/sdapi/v1/img2img", body)
    assert 200 == status, result
    assert "ControlNet 0: " in json.loads(result["info"])["infotexts"][0]


async def test_listing_routes(system: System) -> None:
    async with system.http.get(f"{system.url}/controlnet/model_list") as response:
        [title] = (await response.json())["model_list"]
    assert title.startswith(f"{CONTROLNET} [")
    async with system.http.get(f"{system.url}/controlnet/module_list") as response:
        modules = await response.json()
    assert {"none", "canny", "invert", "threshold"} <= set(modules["module_list"])
    assert {"name": "Threshold A", "value": 100, "min": 0, "max": 255} in modules["module_detail"][
        "canny"
    ]["sliders"]


@pytest.mark.parametrize(
    ("change", "code", "field"),
    [
        ({"model": "missing"}, "controlnet_not_found", "args[0].model"),
        ({"model": "None"}, "controlnet_not_found", "args[0].model"),
        ({"module": "openpose_full"}, "module_unavailable", "args[0].module"),
        ({"module": "sharpen"}, "invalid_field", "args[0].module"),
        ({"resize_mode": "Stretch"}, "invalid_field", "args[0].resize_mode"),
        ({"control_mode": 7}, "invalid_field", "args[0].control_mode"),
        ({"weight": 3}, "invalid_field", "args[0]"),
        ({"guidance_start": 0.8, "guidance_end": 0.2}, "invalid_field", "args[0].guidance_end"),
        ({"image": "bm90IGFuIGltYWdl"}, "invalid_image", "args[0].image"),
        ({"image": None}, "invalid_field", "args[0].image"),
    ],
)
async def test_bad_units_cost_nothing(
    system: System, change: dict[str, Any], code: str, field: str
) -> None:
    task_id = f"bad-unit-{code}-{len(json.dumps(change))}"
    unit = {**seed_unit(_drawing()), **change}
    body = {**BODY, "alwayson_scripts": {"controlnet": {"args": [unit]}}}
    status, error = await _post(system, "/txt2img", body, taskId=task_id)
    assert (422, code) == (status, error["code"]), error
    assert f"alwayson_scripts.controlnet.{field}" == error["field"]
    assert await system.task(task_id) is None
    assert not await system.objects.exists(f"inputs/default/{task_id}_0.png")


async def test_every_image_is_checked_before_any_is_stored(system: System) -> None:
    base: dict[str, Any] = {**BODY, "init_images": [_drawing()], "denoising_strength": 0.5}
    small = Image.new("L", (32, 32), 255)
    buffer = io.BytesIO()
    small.save(buffer, format="PNG")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"mask": base64.b64encode(buffer.getvalue()).decode()}, "mask"),
        (
            {"alwayson_scripts": {"controlnet": {"args": [{**seed_unit("bm90"), "image": "@@"}]}}},
            "alwayson_scripts.controlnet.args[0].image",
        ),
    ]
    for number, (change, field) in enumerate(cases):
        task_id = f"late-refusal-{number}"
        status, error = await _post(system, "/img2img", {**base, **change}, taskId=task_id)
        assert (422, field) == (status, error["field"]), error
        assert await system.task(task_id) is None
        assert not await system.objects.exists(f"inputs/default/{task_id}_0.png"), (
            "the valid init image was not stored either"
        )


async def test_detect_previews_a_preprocessor(system: System) -> None:
    body = {
        "controlnet_module": "canny",
        "controlnet_input_images": [_drawing()],
        "controlnet_processor_res": 128,
        "controlnet_threshold_a": 100,
        "controlnet_threshold_b": 200,
    }
    status, result = await _post(system, "/controlnet/detect", body)
    assert 200 == status, result
    [data] = result["images"]
    edges = Image.open(io.BytesIO(base64.b64decode(data)))
    assert (192, 128) == edges.size, "96×64 worked out with its short side at 128"
    assert {0, 255} == set(np.unique(np.asarray(edges.convert("L"))).tolist())
    status, error = await _post(system, "/controlnet/detect", {**body, "controlnet_module": "dw"})
    assert (422, "controlnet_module") == (status, error["field"])
    status, error = await _post(system, "/controlnet/detect", {"controlnet_module": "canny"})
    assert (422, "controlnet_images") == (status, error["field"])
