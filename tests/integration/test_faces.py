"""Face restoration by its effect on the pixels: OpenCV's cascade finds a drawn face, a
GFPGAN-shaped network with random weights (loaded by spandrel) restores it, and only the
pixels of the face's crop change.

The cascade ships in opencv-python-headless 4.x (the project's pin); OpenCV 5 has none.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402

from proto.commands import AdapterRef, Img2ImgTask  # noqa: E402
from proto.requests import ExtrasOptions  # noqa: E402
from services.inference.extras import ExtrasRunner  # noqa: E402
from services.inference.faces import (  # noqa: E402
    FaceDetector,
    FaceRestorer,
    face_region,
    load_face_restorer,
    restore_faces,
)
from services.inference.pipeline import GenerationError, TaskCancelledError  # noqa: E402
from services.inference.upscalers import ModelCache  # noqa: E402
from tests.fixtures.faces import draw_face, save_gfpgan  # noqa: E402
from tests.fixtures.upscaler import save_compact  # noqa: E402

pytestmark = pytest.mark.integration

FACE = (48, 64, 176, 240)
"""Where :func:`draw_face` draws the face on the 480 × 320 test image."""


@pytest.fixture(scope="module")
def gfpgan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_flush_denormal(True)
    return save_gfpgan(tmp_path_factory.mktemp("faces") / "GFPGAN" / "tiny_gfpgan.safetensors")


def _face_image() -> Image.Image:
    return draw_face(size=(480, 320), box=FACE)


def _changed(before: Image.Image, after: Image.Image) -> np.ndarray:
    changed: np.ndarray = np.any(np.asarray(before) != np.asarray(after), axis=2)
    return changed


def test_the_cascade_finds_the_drawn_face_and_nothing_else() -> None:
    detector = FaceDetector()
    two = draw_face(size=(640, 320), box=FACE)
    two.paste(draw_face(size=(160, 200), box=(20, 10, 140, 190)), (440, 60))
    boxes = detector.detect(two)
    assert 2 == len(boxes), boxes
    for (x, y, w, h), (x0, y0, x1, y1) in zip(
        sorted(boxes), [FACE, (460, 70, 580, 250)], strict=True
    ):
        centre = (x + w / 2, y + h / 2)
        assert x0 < centre[0] < x1
        assert y0 < centre[1] < y1
    assert [] == detector.detect(Image.new("RGB", (320, 240), (70, 90, 110)))


def test_spandrel_loads_the_gfpgan_file_as_a_face_restorer(gfpgan: Path) -> None:
    restorer = load_face_restorer("tiny_gfpgan", gfpgan, "cpu")
    assert "tiny_gfpgan" == restorer.name
    upscaler = save_compact(gfpgan.parent / "x2.safetensors")
    with pytest.raises(GenerationError, match="not a face restorer"):
        load_face_restorer("x2", upscaler, "cpu")


def test_restore_faces_changes_only_the_face_region(gfpgan: Path) -> None:
    detector = FaceDetector()
    restorer = load_face_restorer("tiny_gfpgan", gfpgan, "cpu")
    source = _face_image()
    started = time.perf_counter()
    restored, boxes = restore_faces(source, detector, restorer)
    print(f"one face restored (512² GFPGAN forward, CPU): {time.perf_counter() - started:.1f} s")
    assert 1 == len(boxes)
    assert source.size == restored.size
    assert 0 < np.asarray(restored).std(), "GFPGAN's [-1, 1] output mapped back to pixels"
    changed = _changed(source, restored)
    x0, y0, x1, y1 = face_region(boxes[0])
    inside = np.zeros_like(changed)
    inside[max(y0, 0) : y1, max(x0, 0) : x1] = True
    assert not changed[~inside].any(), "a pixel outside the face's crop changed"
    x, y, w, h = boxes[0]
    assert changed[y : y + h, x : x + w].mean() > 0.9, "the face itself was restored"
    assert (~inside).sum() > source.width * source.height / 3, "the test leaves room outside"
    # Reproducible: GFPGAN's stored noise, not fresh noise per call.
    again, _ = restore_faces(source, detector, restorer)
    assert restored.tobytes() == again.tobytes()


def test_cancellation_stops_before_a_face() -> None:
    identity = FaceRestorer(name="identity", fn=lambda x: x, device="cpu")
    with pytest.raises(TaskCancelledError):
        restore_faces(_face_image(), FaceDetector(), identity, should_stop=lambda: True)


def test_extras_restore_then_upscale_with_visibility(gfpgan: Path) -> None:
    """``gfpgan_visibility`` 0.5, ``Nearest`` ×2: the face's crop is half restored, the
    rest is exactly the nearest-neighbour ×2 of the source."""
    runner = ExtrasRunner(device="cpu", tile=0, overlap=0, models=ModelCache("cpu"))
    ref = AdapterRef(name="tiny_gfpgan", path=str(gfpgan))
    options = msgspec.convert(
        {"gfpgan_visibility": 0.5, "upscaler_1": "Nearest", "upscaling_resize": 2},
        ExtrasOptions,
    )
    source = _face_image()
    steps: list[tuple[int, int]] = []
    result = runner.process(
        source, options, {}, 0, lambda _, s, t, __: steps.append((s, t)), restorer=ref
    )
    assert (960, 640) == result.size
    assert [(1, 2), (2, 2)] == steps, "one step for the faces, one for the upscaler"
    plain = source.resize((960, 640), Image.Resampling.NEAREST)
    changed = _changed(plain, result)
    (box,) = FaceDetector().detect(source)
    x0, y0, x1, y1 = (2 * v for v in face_region(box))
    inside = np.zeros_like(changed)
    inside[max(y0, 0) : y1, max(x0, 0) : x1] = True
    assert not changed[~inside].any()
    assert changed[inside].mean() > 0.5


def test_restore_faces_in_img2img_changes_only_the_face(
    gfpgan: Path, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """img2img inpainting a corner far from the face (A1111 pastes the rest back), with
    and without ``restore_faces``: the two results differ only inside the face's crop."""
    import io

    from proto.requests import Img2ImgRequest
    from tests.fixtures.tiny_runner import tiny_runner

    runner = tiny_runner(tiny_checkpoint, tmp_path_factory.mktemp("cache"))
    init = _face_image()
    mask = Image.new("L", init.size, 0)
    mask.paste(255, (400, 240, 480, 320))
    inputs = {"init": _encode(init), "mask": _encode(mask)}
    body = {
        "stable_diffusion_model": "tiny.safetensors",
        "prompt": "a portrait",
        "steps": 2,
        "width": 480,
        "height": 320,
        "seed": 3,
        "denoising_strength": 0.75,
        "init_images": ["init"],
        "mask": "mask",
        "inpaint_full_res": False,
        "restore_faces": True,
    }
    ref = AdapterRef(name="tiny_gfpgan", path=str(gfpgan))

    def run(restorer: AdapterRef | None) -> tuple[Image.Image, dict[str, Any]]:
        command = Img2ImgTask(
            task_id="t",
            user="u",
            model_name="tiny.safetensors",
            model_key="tiny-000000",
            request=msgspec.convert(body, Img2ImgRequest),
            face_restorer=restorer,
        )
        result = runner.generate(command, inputs, lambda *_: None, lambda: False)
        return Image.open(io.BytesIO(result.images[0])).convert("RGB"), result.info

    plain, plain_info = run(None)
    restored, info = run(ref)
    assert ["restore_faces: no face-restoration model is available"] == [
        w for w in plain_info["warnings"] if "restore_faces" in w
    ], "an old command without a restorer still says so"
    assert info["restore_faces"] is True
    assert "Face restoration: tiny_gfpgan" in info["infotexts"][0]
    (box,) = FaceDetector().detect(plain)
    changed = _changed(plain, restored)
    x0, y0, x1, y1 = face_region(box)
    inside = np.zeros_like(changed)
    inside[max(y0, 0) : y1, max(x0, 0) : x1] = True
    assert not changed[~inside].any(), "restoration touched a pixel outside the face"
    x, y, w, h = box
    assert changed[y : y + h, x : x + w].mean() > 0.9


def _encode(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
