"""ControlNet on the worker's pipeline with a tiny ControlNet: proved by its effect."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from proto.commands import AdapterRef, Img2ImgTask  # noqa: E402
from proto.controlnet import ControlUnit  # noqa: E402
from services.inference.controlnet import load_controlnet  # noqa: E402
from services.inference.pipeline import DiffusersPipeline, Generation  # noqa: E402
from services.inference.preprocessors import fit, preprocess, processor_resolution  # noqa: E402
from tests.fixtures.tiny_controlnet import tiny_controlnet, write_tiny_controlnet  # noqa: E402
from tests.fixtures.tiny_runner import run_tiny, tiny_runner  # noqa: E402

pytestmark = pytest.mark.integration

KEY = "inputs/u/t_0.png"


@pytest.fixture(scope="module")
def runner(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> DiffusersPipeline:
    return tiny_runner(tiny_checkpoint, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def controlnet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_controlnet(tmp_path_factory.mktemp("cn") / "tiny_canny.safetensors")


def _shapes(size: tuple[int, int] = (64, 64)) -> Image.Image:
    image = Image.new("RGB", size, (240, 240, 240))
    draw = ImageDraw.Draw(image)
    draw.rectangle((8, 8, size[0] // 2, size[1] // 2), fill=(20, 20, 160))
    draw.ellipse((size[0] // 2, size[1] // 3, size[0] - 4, size[1] - 4), fill=(180, 30, 30))
    return image


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _unit(path: Path, **fields: Any) -> ControlUnit:
    model = AdapterRef(name=path.stem, path=str(path), sha256=f"sha-{path.name}")
    return ControlUnit(model=model, image_key=KEY, **({"module": "canny"} | fields))


def _run(runner: DiffusersPipeline, units: list[ControlUnit], **fields: Any) -> Generation:
    inputs = {KEY: _png(_shapes())}
    return run_tiny(runner, controlnets=units, inputs=inputs, steps=4, cfg_scale=5, **fields)


def _pixels(result: Generation) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0]))).astype(np.int16)


def test_canny_matches_opencv() -> None:
    image = _shapes((96, 64))
    unit = ControlUnit(
        model=AdapterRef(name="x", path="x"),
        image_key=KEY,
        module="canny",
        threshold_a=80,
        threshold_b=160,
        processor_res=64,
        resize_mode="Just Resize",
    )
    ours = np.asarray(preprocess(image, unit, 96, 64))
    edges = cv2.Canny(np.asarray(image), 80, 160)
    assert edges.any()
    assert (ours == edges[:, :, None]).all()


def test_resize_modes_have_the_extensions_geometry() -> None:
    # A 100×50 map, white in its left quarter and a grey middle, onto a 64×64 generation.
    source = np.zeros((50, 100, 3), dtype=np.uint8)
    source[:, :25] = 255
    source[:, 45:55] = 128
    stretched = fit(source, "Just Resize", 64, 64)  # 100×50 → 64×64
    assert (64, 64, 3) == stretched.shape
    assert 250 <= stretched[:, :14].min()
    assert 5 >= stretched[:, 19:26].max()
    cropped = fit(source, "Crop and Resize", 64, 64)  # → 128×64, the centre 64 columns kept
    assert (64, 64, 3) == cropped.shape
    assert 5 >= cropped[:, 2:20].max(), "the white quarter is cropped away (its edge at 0)"
    assert 120 <= cropped[:, 28:36].min(), "the grey middle spans 12.8 columns in the centre"
    filled = fit(source, "Resize and Fill", 64, 64)  # → 64×32, black bands above and below
    assert (64, 64, 3) == filled.shape
    assert 0 == filled[:16].max()
    assert 0 == filled[48:].max()
    assert 250 <= filled[18:46, :14].min()


def test_pixel_perfect_resolution() -> None:
    unit = ControlUnit(model=AdapterRef(name="x", path="x"), image_key=KEY, pixel_perfect=True)
    # A 1024×512 image for a 512×512 generation: cover → ×1 of the short side (512).
    assert 512 == processor_resolution(unit, (1024, 512), 512, 512)
    fill = ControlUnit(
        model=AdapterRef(name="x", path="x"),
        image_key=KEY,
        pixel_perfect=True,
        resize_mode="Resize and Fill",
    )
    assert 256 == processor_resolution(fill, (1024, 512), 512, 512)


def test_single_file_and_folder_load_the_same_weights(
    runner: DiffusersPipeline, controlnet_file: Path, tmp_path: Path
) -> None:
    expected = tiny_controlnet().state_dict()
    folder = write_tiny_controlnet(tmp_path / "folder", layout="diffusers")
    for path in (controlnet_file, folder):
        loaded = load_controlnet(path, runner.pipe.unet, tmp_path / "cache").state_dict()
        assert set(expected) == set(loaded)
        assert all(torch.equal(expected[k], loaded[k]) for k in expected), path


def test_unit_steers_and_a_silent_unit_equals_none(
    runner: DiffusersPipeline, controlnet_file: Path
) -> None:
    base = _pixels(_run(runner, []))
    steered = _run(runner, [_unit(controlnet_file)])
    assert np.abs(_pixels(steered) - base).mean() > 1, "weight 1 changes the image"
    text = Image.open(io.BytesIO(steered.images[0])).text["parameters"]  # type: ignore[attr-defined]
    assert 'ControlNet 0: "Module: canny, Model: tiny_canny' in text
    silent = _pixels(_run(runner, [_unit(controlnet_file, weight=0.0)]))
    assert np.abs(silent - base).max() <= 1, "weight 0 is no unit"
    outside = _pixels(_run(runner, [_unit(controlnet_file, guidance_start=0.0, guidance_end=0.0)]))
    assert np.abs(outside - base).max() <= 1, "a window no step falls in is no unit"
    late = _pixels(_run(runner, [_unit(controlnet_file, guidance_start=0.5)]))
    assert np.abs(late - base).mean() > 0.1, "the last half of the steps is steered"
    assert np.abs(late - _pixels(steered)).mean() > 0.1
    assert (base == _pixels(_run(runner, []))).all(), "the next task has no ControlNet"


def test_control_modes_and_several_units(runner: DiffusersPipeline, controlnet_file: Path) -> None:
    balanced = _pixels(_run(runner, [_unit(controlnet_file)]))
    prompt = _pixels(
        _run(runner, [_unit(controlnet_file, control_mode="My prompt is more important")])
    )
    control = _pixels(
        _run(runner, [_unit(controlnet_file, control_mode="ControlNet is more important")])
    )
    assert np.abs(balanced - prompt).mean() > 0.1
    assert np.abs(prompt - control).mean() > 0.1
    both = _pixels(_run(runner, [_unit(controlnet_file), _unit(controlnet_file, module="invert")]))
    assert np.abs(both - balanced).mean() > 0.1


def test_controlnet_with_hires_fix(runner: DiffusersPipeline, controlnet_file: Path) -> None:
    steps: list[int] = []
    inputs = {KEY: _png(_shapes())}
    result = run_tiny(
        runner,
        steps,
        controlnets=[_unit(controlnet_file)],
        inputs=inputs,
        enable_hr=True,
        hr_scale=2,
        denoising_strength=0.5,
        steps=2,
    )
    assert (128, 128) == Image.open(io.BytesIO(result.images[0])).size
    assert [1, 2, 3] == steps, "2 steps, then half of 2 at the hires size"


def test_hr_option_picks_the_passes(runner: DiffusersPipeline, controlnet_file: Path) -> None:
    inputs = {KEY: _png(_shapes())}

    def run(*units: ControlUnit) -> np.ndarray:
        result = run_tiny(
            runner,
            controlnets=list(units),
            inputs=inputs,
            enable_hr=True,
            hr_scale=2,
            denoising_strength=0.5,
            steps=2,
            cfg_scale=5,
        )
        return np.asarray(Image.open(io.BytesIO(result.images[0]))).astype(np.int16)

    none = run()
    both = run(_unit(controlnet_file))
    low = run(_unit(controlnet_file, hr_option="Low res only"))
    high = run(_unit(controlnet_file, hr_option="High res only"))
    for one, other in ((none, both), (both, low), (both, high), (low, high), (none, low)):
        assert np.abs(one - other).mean() > 0.1


def test_controlnet_on_an_inpainting_checkpoint(controlnet_file: Path, tmp_path: Path) -> None:
    """A 9-channel inpainting UNet takes ordinary (4-channel) ControlNets."""
    import msgspec
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from proto.requests import Img2ImgRequest
    from services.inference.tiny import build_pipeline

    base: Any = build_pipeline()
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**dict(base.unet.config), "in_channels": 9})
    pipe: Any = StableDiffusionPipeline(**{**base.components, "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    runner = DiffusersPipeline(
        pipe, model_name="inpaint.safetensors", model_hash="x", device="cpu", cache_dir=tmp_path
    )
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    inputs = {KEY: _png(_shapes()), "inputs/u/mask.png": _png(mask)}
    request = msgspec.convert(
        {
            "stable_diffusion_model": "inpaint.safetensors",
            "steps": 4,
            "width": 64,
            "height": 64,
            "seed": 3,
            "sampler_name": "Euler",
            "init_images": [KEY],
            "mask": "inputs/u/mask.png",
            "denoising_strength": 0.8,
        },
        Img2ImgRequest,
    )

    def run(units: list[ControlUnit]) -> np.ndarray:
        command = Img2ImgTask(
            task_id="t",
            user="u",
            model_name="inpaint.safetensors",
            model_key="k",
            request=request,
            controlnets=units,
        )
        result = runner.generate(command, inputs, lambda *_: None, lambda: False)
        return _pixels(result)

    plain, steered = run([]), run([_unit(controlnet_file)])
    assert (64, 64, 3) == steered.shape
    assert np.abs(plain - steered).mean() > 0.1
