"""A tiny SDXL checkpoint loaded from its single file: A1111 prompt syntax, img2img, hires
fix, ControlNet and textual inversion."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from proto.commands import AdapterRef  # noqa: E402
from proto.controlnet import ControlUnit  # noqa: E402
from services.inference.pipeline import DiffusersPipeline, Generation, GenerationError  # noqa: E402
from services.inference.prompts import encode_weighted_xl  # noqa: E402
from tests.fixtures.tiny_controlnet import tiny_controlnet  # noqa: E402
from tests.fixtures.tiny_model import build_tiny_sdxl  # noqa: E402
from tests.fixtures.tiny_runner import run_tiny, tiny_runner  # noqa: E402
from tests.fixtures.tiny_vae import write_tiny_embedding, write_tiny_sdxl_embedding  # noqa: E402

pytestmark = pytest.mark.integration
KEY = "inputs/u/t_0.png"


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> DiffusersPipeline:
    tiny = build_tiny_sdxl(tmp_path_factory.mktemp("sdxl"))
    return tiny_runner(tiny.single_file, tmp_path_factory.mktemp("cache"))


def _pixels(result: Generation) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0]))).astype(np.int16)


def test_sdxl_controlnet(runner: DiffusersPipeline, tmp_path: Path) -> None:
    folder = tmp_path / "xl_controlnet"
    tiny_controlnet(unet=runner.pipe.unet).save_pretrained(folder, safe_serialization=True)
    drawing = Image.new("RGB", (64, 64), "white")
    drawing.paste((0, 0, 0), (16, 16, 48, 48))
    buffer = io.BytesIO()
    drawing.save(buffer, format="PNG")
    inputs = {KEY: buffer.getvalue()}

    def unit(weight: float) -> ControlUnit:
        model = AdapterRef(name="xl", path=str(folder), sha256="xl")
        return ControlUnit(model=model, image_key=KEY, module="invert", weight=weight)

    base = _pixels(run_tiny(runner, cfg_scale=5))
    steered = _pixels(run_tiny(runner, controlnets=[unit(1.0)], inputs=inputs, cfg_scale=5))
    silent = _pixels(run_tiny(runner, controlnets=[unit(0.0)], inputs=inputs, cfg_scale=5))
    assert np.abs(steered - base).mean() > 0.1
    assert np.abs(silent - base).max() <= 1


def test_sdxl_embedding_changes_the_conditioning(runner: DiffusersPipeline, tmp_path: Path) -> None:
    path = write_tiny_sdxl_embedding(tmp_path / "xl-style.safetensors")
    ref = AdapterRef(name="xl-style", path=str(path), sha256="x1")
    plain = _pixels(run_tiny(runner, prompt="a cat xl-style"))
    embedded = _pixels(run_tiny(runner, prompt="a cat xl-style", embeddings=[ref]))
    assert np.abs(plain - embedded).mean() > 0.1
    wrong = write_tiny_embedding(tmp_path / "sd1-style.safetensors")
    with pytest.raises(GenerationError, match="SDXL checkpoints only"):
        run_tiny(
            runner, prompt="sd1-style", embeddings=[AdapterRef(name="sd1-style", path=str(wrong))]
        )


def test_sdxl_prompt_encoding_matches_diffusers_and_honours_emphasis(
    runner: DiffusersPipeline,
) -> None:
    pipe = runner.pipe
    with torch.inference_mode():
        ours = encode_weighted_xl(pipe, "a cat on a mat", "blurry", 0, 1)
        theirs = pipe.encode_prompt(
            "a cat on a mat", negative_prompt="blurry", do_classifier_free_guidance=True
        )
        names = (
            "prompt_embeds",
            "negative_prompt_embeds",
            "pooled_prompt_embeds",
            "negative_pooled_prompt_embeds",
        )
        for name, tensor in zip(names, theirs, strict=True):
            assert torch.allclose(ours[name], tensor, atol=1e-5), name
        emphasised = encode_weighted_xl(pipe, "a (cat:1.6) on a mat", "blurry", 0, 1)
        assert not torch.allclose(emphasised["prompt_embeds"], ours["prompt_embeds"])
        long = encode_weighted_xl(pipe, " ".join(["cat"] * 150), "", 0, 2)
    assert (2, 154, 96) == tuple(long["prompt_embeds"].shape), "two chunks, not truncated"
    assert (2, 154, 96) == tuple(long["negative_prompt_embeds"].shape)
    base = _pixels(run_tiny(runner, prompt="a cat on a mat"))
    assert np.abs(base - _pixels(run_tiny(runner, prompt="a (cat:1.6) on a mat"))).mean() > 0.1


def test_sdxl_img2img_and_hires_fix(runner: DiffusersPipeline) -> None:
    steps: list[int] = []
    hires = run_tiny(runner, steps, enable_hr=True, hr_scale=1.5, denoising_strength=0.5)
    assert (96, 96) == Image.open(io.BytesIO(hires.images[0])).size
    assert [1, 2, 3, 4] == steps
