"""Face restoration through the whole system: refused until a restorer is registered,
then run by the extras pool on a drawn face that OpenCV's cascade finds."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from proto import ModelType
from tests.fixtures.faces import draw_face, save_gfpgan
from tests.system import System

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("system", ["local"], indirect=True)]

TXT2IMG = {
    "stable_diffusion_model": "tiny.safetensors",
    "prompt": "a portrait",
    "steps": 2,
    "width": 64,
    "height": 64,
}


async def _post(system: System, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with system.http.post(f"{system.url}{path}", json=body) as response:
        return response.status, await response.json()


async def _restorers(system: System) -> list[dict[str, Any]]:
    async with system.http.get(f"{system.url}/sdapi/v1/face-restorers") as response:
        assert 200 == response.status
        listed: list[dict[str, Any]] = await response.json()
    return listed


def _b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


async def test_face_restoration_end_to_end(system: System, tmp_path: Path) -> None:
    face = draw_face(size=(480, 320), box=(48, 64, 176, 240))
    extras = {"image": _b64(face), "gfpgan_visibility": 1}
    before = await system.db["tasks"].count_documents({})
    # Nothing registered: a 422 naming what to register, nothing queued.
    assert [] == await _restorers(system)
    for path, body, field in [
        ("/extra_images", extras, "gfpgan_visibility"),
        ("/txt2img", TXT2IMG | {"restore_faces": True}, "restore_faces"),
    ]:
        status, result = await _post(system, path, body)
        assert (422, field) == (status, result.get("field")), result
        assert "`faceRestorer`" in result["message"]
        assert "GFPGAN/" in result["message"]
    status, result = await _post(system, "/extra_images", extras | {"codeformer_visibility": 0.5})
    assert (422, "codeformer_visibility") == (status, result["field"])
    assert "licence" in result["message"]
    assert before == await system.db["tasks"].count_documents({})

    save_gfpgan(tmp_path / "GFPGAN" / "tiny_gfpgan.safetensors")
    await system.register_models(tmp_path, (ModelType.FACE_RESTORER,))
    assert [{"name": "tiny_gfpgan", "cmd_dir": str((tmp_path / "GFPGAN").resolve())}] == (
        await _restorers(system)
    )
    option = "face_restoration_model"
    for value, code in [("CodeFormer", "unsupported"), ("nope", "face_restorer_not_found")]:
        body = TXT2IMG | {"restore_faces": True, "override_settings": {option: value}}
        status, result = await _post(system, "/txt2img", body)
        assert (422, code) == (status, result["code"]), result
        assert f"override_settings.{option}" == result["field"]

    # txt2img: the gateway hands the worker the restorer; the tiny model draws no face,
    # so the image stays as generated and the infotext names the restorer.
    body = TXT2IMG | {"restore_faces": True, "override_settings": {option: "GFPGAN"}}
    status, result = await _post(system, "/sdapi/v1/txt2img", body)
    assert 200 == status, result
    info = json.loads(result["info"])
    assert info["restore_faces"] is True
    assert "Face restoration: tiny_gfpgan" in info["infotexts"][0]

    status, result = await _post(system, "/sdapi/v1/extra-single-image", extras)
    assert 200 == status, result
    assert "GFPGAN visibility: 1" in result["html_info"]
    restored = Image.open(io.BytesIO(base64.b64decode(result["image"]))).convert("RGB")
    assert face.size == restored.size
    changed = np.any(np.asarray(face) != np.asarray(restored), axis=2)
    assert changed[100:200, 80:150].all(), "the face was restored"
    # The face's crop reaches at most ~1.6 × the face's box around its centre.
    assert not changed[:, 300:].any(), "the right part of the picture is untouched"
