"""A TAESD decoder in the models folder's ``VAE-approx/`` draws the checkpoint's live
previews: registered as ``vaeApprox``, handed to the worker by the scheduler, used at
the first step. Without one, previews are the latent approximation (8×8 blocks)."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from services.inference.tiny import build_taesd_decoder
from tests.system import SystemFactory

pytestmark = pytest.mark.e2e

BODY = {
    "stable_diffusion_model": "tiny.safetensors",
    "prompt": "a lighthouse",
    "steps": 3,
    "width": 64,
    "height": 64,
    "seed": 5,
}


def blocky(image: Image.Image) -> bool:
    """Every 8×8 block one colour: latents (1/8 of the image) shown enlarged."""
    pixels = np.array(image.convert("RGB")).astype(int)
    blocks = pixels.reshape(8, 8, 8, 8, 3)  # rows of blocks, block rows, columns, …
    return bool((blocks == blocks[:, :1, :, :1]).all())


async def test_a_registered_taesd_draws_the_previews(make_system: SystemFactory) -> None:
    models = make_system.models()
    build_taesd_decoder(models / "VAE-approx" / "taesd_decoder.safetensors")
    async with make_system(models=models) as system:
        async with system.http.get(f"{system.url}/models?type=vaeApprox") as response:
            listed = await response.json()
        assert ["taesd_decoder"] == [m["name"] for m in listed], listed
        task_id = await system.submit(BODY)
        events = await asyncio.wait_for(system.events(task_id), 180)
        assert "succeeded" == events[-1][0], events[-1]
        keys = [d["preview_key"] for n, d in events if n == "progress" and d.get("preview_key")]
        assert keys, "the first step has a preview"
        preview = Image.open(io.BytesIO(await system.objects.get(keys[0])))
        assert (64, 64) == preview.size
        assert not blocky(preview), "decoded by TAESD, not the latents enlarged"
