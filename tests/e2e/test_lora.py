"""LoRAs end to end: a registered LoRA named in the prompt changes the image and is
recorded in the infotext; an unknown one is a 422 naming it, with nothing queued."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proto.codec import decode_generate
from proto.commands import Txt2ImgTask
from tests.fixtures.tiny_lora import write_tiny_lora
from tests.fixtures.tiny_vae import (
    write_tiny_embedding,
    write_tiny_sdxl_embedding,
    write_tiny_vae,
)
from tests.system import System, SystemFactory

pytestmark = pytest.mark.e2e
BODY = {
    "stable_diffusion_model": "tiny.safetensors",
    "steps": 2,
    "width": 64,
    "height": 64,
    "seed": 3,
}


@pytest.fixture(scope="module")
async def system(make_system: SystemFactory) -> AsyncIterator[System]:
    models = make_system.models()
    write_tiny_lora(models / "Lora" / "ink style.safetensors")
    write_tiny_vae(models / "VAE" / "other vae.safetensors")
    write_tiny_embedding(models / "embeddings" / "bad-hands.safetensors")
    write_tiny_sdxl_embedding(models / "embeddings" / "xl-hands.safetensors")
    async with make_system(models=models) as system:
        yield system


async def _run(system: System, prompt: str, **options: str) -> dict[str, Any]:
    settings = {"sd_model_checkpoint": "tiny.safetensors", **options}
    async with system.http.post(
        f"{system.url}/sdapi/v1/txt2img",
        json={**BODY, "prompt": prompt, "override_settings": settings},
    ) as response:
        body: dict[str, Any] = await response.json()
        assert 200 == response.status, body
    return body


async def test_a_registered_lora_changes_the_image(system: System) -> None:
    async with system.http.get(f"{system.url}/sdapi/v1/loras") as response:
        assert ["ink style"] == [m["name"] for m in await response.json()]
    base = await _run(system, "a cat")
    styled = await _run(system, "a cat <lora:ink style:0.9>")
    again = await _run(system, "a cat")
    assert base["images"] != styled["images"]
    assert base["images"] == again["images"], "the next task sees the base weights"
    infotext = json.loads(styled["info"])["infotexts"][0]
    assert "a cat <lora:ink style:0.9>" in infotext, "the prompt keeps its tag, as in A1111"
    assert 'Lora hashes: "ink style: ' in infotext


async def test_an_unknown_lora_is_refused_before_anything_is_queued(system: System) -> None:
    async with system.http.post(
        f"{system.url}/txt2img",
        json={**BODY, "prompt": "x <lora:missing:1>"},
        headers={"Request-Type": "async", "taskId": "unknown-lora"},
    ) as response:
        body = await response.json()
        assert (422, "lora_not_found", "prompt") == (response.status, body["code"], body["field"])
    assert "'missing'" in body["message"]
    assert await system.task("unknown-lora") is None


async def test_sd_vae_picks_a_registered_vae_for_one_task(system: System) -> None:
    async with system.http.get(f"{system.url}/sdapi/v1/sd-vae") as response:
        assert ["other vae.safetensors"] == [m["model_name"] for m in await response.json()]
    base = await _run(system, "a dog")
    other = await _run(system, "a dog", sd_vae="other vae.safetensors")
    automatic = await _run(system, "a dog", sd_vae="Automatic")
    assert base["images"] != other["images"]
    assert base["images"] == automatic["images"]
    assert "VAE: other vae.safetensors" in json.loads(other["info"])["infotexts"][0]

    # The seed's own field, and the stem alone (what some A1111 clients send).
    async with system.http.post(
        f"{system.url}/txt2img", json={**BODY, "prompt": "a dog", "sd_vae": "other vae"}
    ) as response:
        assert 200 == response.status, await response.text()
    async with system.http.post(
        f"{system.url}/txt2img",
        json={**BODY, "prompt": "a dog", "sd_vae": "nope.safetensors"},
        headers={"Request-Type": "async", "taskId": "unknown-vae"},
    ) as response:
        body = await response.json()
        assert (422, "vae_not_found", "sd_vae") == (response.status, body["code"], body["field"])
    assert await system.task("unknown-vae") is None


async def test_embeddings_are_listed_and_used_where_named(system: System) -> None:
    async with system.http.get(f"{system.url}/sdapi/v1/embeddings") as response:
        listed = await response.json()
    assert {"bad-hands": 2} == {k: v["vectors"] for k, v in listed["loaded"].items()}
    assert {"xl-hands": (2, 96)} == {
        k: (v["vectors"], v["shape"]) for k, v in listed["skipped"].items()
    }, "an SDXL embedding is skipped for the SD1 checkpoint, as A1111 lists it"
    other_family = await _run(system, "a bird, xl-hands")
    assert "TI hashes" not in json.loads(other_family["info"])["infotexts"][0]
    plain = await _run(system, "a bird, bad hands")
    named = await _run(system, "a bird, bad-hands")
    assert 'TI hashes: "bad-hands: ' in json.loads(named["info"])["infotexts"][0]
    assert "TI hashes" not in json.loads(plain["info"])["infotexts"][0]


async def test_hr_prompt_loras_are_resolved_too(system: System) -> None:
    body = {**BODY, "prompt": "a cat", "enable_hr": True, "denoising_strength": 0.5}
    async with system.http.post(
        f"{system.url}/txt2img",
        json={**body, "hr_prompt": "a cat <lora:nowhere:1>"},
        headers={"Request-Type": "async", "taskId": "unknown-hr-lora"},
    ) as response:
        error = await response.json()
    assert (422, "hr_prompt") == (response.status, error["field"])
    assert await system.task("unknown-hr-lora") is None
    async with system.http.post(
        f"{system.url}/txt2img", json={**body, "hr_prompt": "a cat <lora:ink style:0.8>"}
    ) as response:
        result = await response.json()
        assert (200, "succeeded") == (response.status, result["status"]), result
    document = await system.task(result["taskId"])
    assert document is not None
    command = decode_generate(bytes(document["command"]))
    assert isinstance(command, Txt2ImgTask)
    assert ["ink style"] == [ref.name for ref in command.hr_loras or []]
    assert [] == command.loras
