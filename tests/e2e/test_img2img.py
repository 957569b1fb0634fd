"""img2img and inpainting: inputs by base64 or owned object key, validated at the edge."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import pytest
from PIL import Image

from proto.commands import Img2ImgTask
from tests.system import System
from tests.waiting import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("system", ["local", "s3"], indirect=True)]

MODEL = "tiny.safetensors"


def _png(
    size: tuple[int, int] = (64, 64),
    color: tuple[int, int, int] = (200, 30, 30),
    image_format: str = "PNG",
    mode: str = "RGB",
) -> str:
    buffer = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 255).save(buffer, format=image_format)
    return base64.b64encode(buffer.getvalue()).decode()


async def _post(system: System, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with system.http.post(f"{system.url}{path}", json=body) as response:
        return response.status, await response.json()


async def test_img2img_with_base64_and_data_url(system: System) -> None:
    body = {
        "stable_diffusion_model": MODEL,
        "prompt": "x",
        "steps": 4,
        "width": 64,
        "height": 64,
        "seed": 3,
        "denoising_strength": 0.5,
        "init_images": ["data:image/png;base64," + _png()],
    }
    status, result = await _post(system, "/img2img", body)
    assert (200, "succeeded") == (status, result["status"]), result
    doc = await system.task(result["taskId"])
    assert doc is not None
    assert "img2img" == doc["kind"]
    assert 2 == doc["progress"]["total_steps"], "strength 0.5 of 4 steps runs 2"
    command = await system.command(result["taskId"])
    assert isinstance(command, Img2ImgTask)
    assert [f"inputs/default/{result['taskId']}_0.png"] == command.request.init_images
    image = Image.open(io.BytesIO(await system.objects.get(result["images"][0])))
    assert (64, 64) == image.size
    assert "Denoising strength: 0.5" in image.text["parameters"]  # type: ignore[attr-defined]


async def test_inpaint_from_an_earlier_result_key(system: System) -> None:
    status, first = await _post(
        system,
        "/txt2img",
        {"stable_diffusion_model": MODEL, "prompt": "x", "steps": 2, "width": 64, "height": 64},
    )
    assert 200 == status
    body = {
        "stable_diffusion_model": MODEL,
        "prompt": "y",
        "steps": 3,
        "width": 64,
        "height": 64,
        "init_images": [first["images"][0]],
        "mask": _png(mode="L"),
        "mask_blur": 2,
    }
    status, result = await _post(system, "/img2img", body)
    assert (200, "succeeded") == (status, result["status"]), result


@pytest.mark.parametrize(
    ("images", "field", "text"),
    [
        ([], "init_images", "at least one"),
        (["not base64 !!"], "init_images[0]", "neither base64 nor an object key"),
        ([_png(image_format="GIF")], "init_images[0]", "accepted: PNG, JPEG, WebP"),
        ([_png(size=(5000, 5000))], "init_images[0]", "at most 16777216 allowed"),
        (
            [base64.b64encode(base64.b64decode(_png())[:60]).decode()],
            "init_images[0]",
            "not a readable image",
        ),
        (["images/somebody-else/x_1.png"], "init_images[0]", "neither base64"),
        ([_png()] * 5, "init_images", "at most 4 images"),
    ],
)
async def test_bad_images_are_refused_before_anything_is_queued(
    system: System, images: list[str], field: str, text: str
) -> None:
    before = await system.db["tasks"].count_documents({})
    body = {"stable_diffusion_model": MODEL, "prompt": "x", "steps": 2, "init_images": images}
    status, error = await _post(system, "/img2img", body)
    assert (422, field) == (status, error.get("field")), error
    assert text in error["message"]
    assert before == await system.db["tasks"].count_documents({})


async def test_a1111_img2img(system: System) -> None:
    body = {
        "init_images": [_png()],
        "prompt": "z",
        "steps": 4,
        "denoising_strength": 0.75,
        "width": 64,
        "height": 64,
        "sampler_name": "Euler",
        "seed": 11,
        "resize_mode": 0,
        "include_init_images": False,
        "override_settings": {},
    }
    status, result = await _post(system, "/sdapi/v1/img2img", body)
    assert 200 == status, result
    assert 1 == len(result["images"])
    assert None is result["parameters"]["init_images"]
    assert 11 == json.loads(result["info"])["seed"]
    status, echoed = await _post(system, "/sdapi/v1/img2img", {**body, "include_init_images": True})
    assert 200 == status, echoed
    assert body["init_images"] == echoed["parameters"]["init_images"], "as the client sent them"

    # The queue is drained: nothing left behind by the sync call.
    async def drained() -> bool:
        query = {"status": {"$in": ["waiting", "running"]}}
        return not await system.db["tasks"].count_documents(query)

    await eventually(drained, "no task left open", timeout_s=10)
