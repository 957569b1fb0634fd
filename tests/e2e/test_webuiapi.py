"""An off-the-shelf AUTOMATIC1111 API client, ``webuiapi``, used unchanged against the
gateway — with HTTP Basic auth, as such clients authenticate to a webui started with
``--api-auth`` (the user's name and an API key as the password)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import msgspec
import pytest
import requests
from aiohttp import web
from PIL import Image, ImageDraw

from services.common.servers import free_port
from services.gateway.app import create_app
from tests.fixtures.tiny_controlnet import write_tiny_controlnet
from tests.fixtures.upscaler import save_compact
from tests.system import System, SystemFactory
from tests.waiting import eventually

webuiapi = pytest.importorskip("webuiapi")

pytestmark = pytest.mark.e2e
T = TypeVar("T")
USER, KEY = "painter", "webui-key-0123456789abcdef"
MODEL = "tiny.safetensors"


@pytest.fixture(scope="module")
async def system(make_system: SystemFactory) -> AsyncIterator[System]:
    models = make_system.models([MODEL])
    write_tiny_controlnet(models / "ControlNet" / "control_tiny_canny.safetensors")
    save_compact(models / "ESRGAN" / "tiny_x2.safetensors")  # a model upscaler (spandrel)
    async with make_system(models=models) as system:
        yield system


@pytest.fixture(scope="module")
async def port(system: System) -> AsyncIterator[int]:
    """A second gateway over the same system, with authentication on."""
    port = free_port()
    settings = msgspec.structs.replace(
        system.settings, port=port, auth=True, api_keys=[f"{USER}:{KEY}"]
    )
    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield port
    await runner.cleanup()


async def _call(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """webuiapi is blocking (requests): off the event loop the gateway runs on."""
    return await asyncio.to_thread(function, *args, **kwargs)


def _drawing() -> Image.Image:
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse((12, 12, 52, 52), outline="black", width=3)
    return image


async def test_an_a1111_client_works_unchanged(port: int) -> None:
    anonymous = await _call(requests.get, f"http://127.0.0.1:{port}/sdapi/v1/sd-models")
    assert 401 == anonymous.status_code
    impostor = await _call(
        requests.get, f"http://127.0.0.1:{port}/sdapi/v1/sd-models", auth=("mallory", KEY)
    )
    assert 401 == impostor.status_code, "the key must be the named user's"
    api = await _call(webuiapi.WebUIApi, host="127.0.0.1", port=port, sampler="Euler", steps=3)
    await _call(api.set_auth, USER, KEY)

    [title] = await _call(api.util_get_model_names)
    assert title.startswith(MODEL)
    await _call(api.util_set_model, MODEL)
    assert title == await _call(api.util_get_current_model)
    assert "Euler a" in await _call(api.util_get_sampler_names)
    assert "sgm_uniform" in await _call(api.util_get_scheduler_names)

    # webuiapi's own defaults (scheduler "automatic", eta 1, s_noise 1 …) are all accepted.
    first = await _call(api.txt2img, prompt="a (cat:1.2)", seed=5, width=64, height=64)
    assert (64, 64) == first.image.size
    assert [5] == first.info["all_seeds"]
    assert "a (cat:1.2)" == first.parameters["prompt"]
    again = await _call(api.txt2img, prompt="a (cat:1.2)", seed=5, width=64, height=64)
    assert first.image.tobytes() == again.image.tobytes()

    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 48, 48), fill=255)
    inpainted = await _call(
        api.img2img,
        images=[first.image],
        mask_image=mask,
        prompt="a dog",
        denoising_strength=0.7,
        seed=5,
        width=64,
        height=64,
    )
    assert (64, 64) == inpainted.image.size

    detected = await _call(api.controlnet_detect, [_drawing()], module="canny")
    assert (512, 512) == detected.image.size, "the map at processor_res 512"
    [controlnet] = await _call(api.controlnet_model_list)
    assert "canny" in await _call(api.controlnet_module_list)
    unit = webuiapi.ControlNetUnit(image=_drawing(), module="canny", model=controlnet)
    controlled = await _call(
        api.txt2img, prompt="a cat", seed=5, width=64, height=64, controlnet_units=[unit]
    )
    assert "ControlNet 0: " in controlled.info["infotexts"][0]
    # webuiapi adds its units to its mutable default `alwayson_scripts`, which later calls
    # would share: pass a fresh one.
    plain = await _call(
        api.txt2img, prompt="a cat", seed=5, width=64, height=64, alwayson_scripts={}
    )
    assert "ControlNet" not in plain.info["infotexts"][0]
    assert controlled.image.tobytes() != plain.image.tobytes()

    info = await _call(api.png_info, first.image)
    assert "Seed: 5" in info.info
    upscaled = await _call(
        api.extra_single_image, image=first.image, upscaler_1="Lanczos", upscaling_resize=2
    )
    assert (128, 128) == upscaled.image.size
    # A registered model upscaler by name, as webui clients send it (registered by the
    # models-folder scan at startup).

    async def listed() -> bool:
        return "tiny_x2" in [u["name"] for u in await _call(api.get_upscalers)]

    await eventually(listed, "tiny_x2 among the upscalers", timeout_s=20, interval_s=0.2)
    by_model = await _call(
        api.extra_single_image, image=first.image, upscaler_1="tiny_x2", upscaling_resize=2
    )
    assert (128, 128) == by_model.image.size
    assert by_model.image.tobytes() != upscaled.image.tobytes()

    progress = await _call(api.get_progress)
    assert 0 == progress["state"]["job_count"]
    assert {} == await _call(api.interrupt), "A1111's answer: nothing of the caller's runs"
    # The client's own idle wait loops until progress 0 and no jobs: it must return.
    await asyncio.wait_for(_call(api.util_wait_for_ready, check_interval=0.2), 30)
