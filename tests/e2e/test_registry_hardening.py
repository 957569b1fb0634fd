"""Hostile model files and names never break the registry (issue 15, items 7 and 10).

A LoRA whose header has ``"__metadata__": "x"`` used to stop the system at start with an
AttributeError, abort every later scan (files after it were never registered), and make
``refresh-loras`` and ``PUT /models/...`` answer 500. Now such a file is recorded
``failed`` with its reason and skipped; an upload of one is a 422.
"""

from __future__ import annotations

import io
import unicodedata
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.integration.test_scan import HOSTILE, _hostile
from tests.system import System, SystemFactory

pytestmark = pytest.mark.e2e
_LORA = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


def _good_lora(path: Path) -> None:
    save_file({f"{_LORA}.lora_down.weight": np.zeros((4, 768), dtype=np.float16)}, str(path))


@pytest.fixture(scope="module")
async def system(make_system: SystemFactory) -> AsyncIterator[System]:
    models = make_system.models()
    # Present at start: what `sdswarm up` registers before it serves.
    _hostile(models / "Lora" / "a_bad.safetensors", HOSTILE["a_string_metadata"])
    _good_lora(models / "Lora" / "b_good.safetensors")
    async with make_system(models=models) as system:
        yield system


async def _loras(system: System) -> dict[str, Any]:
    async with system.http.get(f"{system.url}/models", params={"type": "lora"}) as response:
        assert 200 == response.status
        return {m["name"]: m for m in await response.json()}


async def test_the_system_starts_with_a_malformed_file_recorded_failed(system: System) -> None:
    loras = await _loras(system)
    assert "failed" == loras["a_bad"]["status"]
    assert "__metadata__ must be an object" in loras["a_bad"]["error"]
    assert "unloaded" == loras["b_good"]["status"], "the file after the bad one is registered"


async def test_refresh_loras_records_bad_files_and_answers_200(system: System) -> None:
    folder = Path(system.settings.models_dir) / "Lora"
    for stem, header in HOSTILE.items():
        _hostile(folder / f"r_{stem}.safetensors", header)
    _good_lora(folder / "s_after.safetensors")
    async with system.http.post(f"{system.url}/sdapi/v1/refresh-loras") as response:
        assert 200 == response.status, await response.text()
    loras = await _loras(system)
    assert "unloaded" == loras["s_after"]["status"]
    for stem in HOSTILE:
        assert "failed" == loras[f"r_{stem}"]["status"], stem
        assert loras[f"r_{stem}"]["error"]


@pytest.mark.parametrize("stem", sorted(HOSTILE))
async def test_uploading_a_malformed_file_is_a_422_with_the_reason(
    system: System, stem: str
) -> None:
    header = HOSTILE[stem]
    content = len(header).to_bytes(8, "little") + header + b"\0" * 4
    async with system.http.put(
        f"{system.url}/models/up_{stem}",
        params={"type": "lora"},
        data=io.BytesIO(content),
        headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(content))},
    ) as response:
        body = await response.json()
        assert 422 == response.status, body
    assert "invalid_model" == body["code"]
    assert f"up_{stem}" not in await _loras(system), "a refused upload registers nothing"


# Names (issue 15, item 10): one spelling per model.


async def _put(system: System, name: str, data: bytes) -> tuple[int, Any]:
    async with system.http.put(
        f"{system.url}/models/{urllib.parse.quote(name)}",
        data=io.BytesIO(data),
        headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(data))},
    ) as response:
        return response.status, await response.json()


async def _checkpoints(system: System) -> list[str]:
    params = {"type": "stableDiffusion"}
    async with system.http.get(f"{system.url}/models", params=params) as response:
        return sorted(m["name"] for m in await response.json())


async def test_a_trailing_slash_and_nfd_spelling_name_the_same_model(
    system: System, tiny_checkpoint: Path
) -> None:
    data = tiny_checkpoint.read_bytes()  # noqa: ASYNC240
    nfc = unicodedata.normalize("NFC", "café.safetensors")
    nfd = unicodedata.normalize("NFD", "café.safetensors")
    assert 201 == (await _put(system, "x.safetensors", data))[0]
    status, body = await _put(system, "x.safetensors/", data)
    assert (200, "x.safetensors") == (status, body["model"]["name"]), "a replacement, not a new one"
    assert 201 == (await _put(system, nfd, data))[0]
    status, body = await _put(system, nfc, data)
    assert (200, nfc) == (status, body["model"]["name"])
    assert sorted([nfc, "tiny.safetensors", "x.safetensors"]) == await _checkpoints(system)
    for spelling in (nfd, nfc, "x.safetensors/"):
        async with system.http.get(f"{system.url}/models/{urllib.parse.quote(spelling)}") as got:
            assert 200 == got.status, spelling
    folder = Path(system.settings.models_dir) / "Stable-diffusion"
    assert sorted([nfc, "tiny.safetensors", "x.safetensors"]) == sorted(
        p.name for p in folder.iterdir() if p.is_file()
    ), "one file per model, under its NFC name"


async def test_a_look_alike_name_is_refused_naming_the_character(
    system: System, tiny_checkpoint: Path
) -> None:
    data = tiny_checkpoint.read_bytes()  # noqa: ASYNC240
    status, body = await _put(system, "tiny\u200b.safetensors", data)
    assert (422, "name") == (status, body["field"])
    assert "U+200B" in body["message"]
