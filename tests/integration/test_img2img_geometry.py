"""img2img / inpaint parameters on the tiny checkpoints, proved by their effect on the pixels.

The tiny model draws noise, so what is checked is what A1111 guarantees whatever the
model: the original pasted back outside the mask (in the geometry of ``resize_mode``),
the seam of a blurred mask, the starting latents of each ``inpainting_fill``, and where
*Only masked* puts its result.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import msgspec  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from proto.commands import Img2ImgTask  # noqa: E402
from proto.requests import Img2ImgRequest  # noqa: E402
from services.inference import img2img  # noqa: E402
from services.inference.pipeline import DiffusersPipeline  # noqa: E402
from tests.fixtures.tiny_runner import tiny_runner  # noqa: E402

pytestmark = pytest.mark.integration

RED, GREEN, BLUE = (220, 30, 30), (30, 200, 60), (40, 40, 210)


@pytest.fixture(scope="module")
def runner(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> DiffusersPipeline:
    return tiny_runner(tiny_checkpoint, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def inpaint_runner(tmp_path_factory: pytest.TempPathFactory) -> DiffusersPipeline:
    """The tiny model with a 9-channel (inpainting) UNet, as the loader gives it."""
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    from services.inference.tiny import build_pipeline

    base: Any = build_pipeline()
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**dict(base.unet.config), "in_channels": 9})
    pipe: Any = StableDiffusionInpaintPipeline(**{**base.components, "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    return DiffusersPipeline(
        pipe,
        model_name="inpaint.safetensors",
        model_hash="x",
        device="cpu",
        cache_dir=tmp_path_factory.mktemp("cache9"),
    )


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _scene(size: tuple[int, int]) -> Image.Image:
    """Coloured regions: red left third, green middle, blue right, a white bar on top."""
    width, height = size
    image = Image.new("RGB", size, BLUE)
    image.paste(RED, (0, 0, width // 3, height))
    image.paste(GREEN, (width // 3, 0, 2 * width // 3, height))
    image.paste((250, 250, 250), (0, 0, width, height // 8))
    return image


def _rect_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def _request(**fields: Any) -> Img2ImgRequest:
    body = {
        "stable_diffusion_model": "tiny.safetensors",
        "prompt": "a cat",
        "steps": 4,
        "width": 64,
        "height": 64,
        "seed": 7,
        "sampler_name": "Euler",
        "denoising_strength": 0.75,
        "init_images": ["init"],
        **fields,
    }
    return msgspec.convert(body, Img2ImgRequest)


def _run(
    runner: DiffusersPipeline, init: Image.Image, mask: Image.Image | None = None, **fields: Any
) -> tuple[list[np.ndarray], dict[str, Any]]:
    inputs = {"init": _png(init)}
    if mask is not None:
        inputs["mask"] = _png(mask)
        fields["mask"] = "mask"
    command = Img2ImgTask(
        task_id="t",
        user="u",
        model_name="tiny.safetensors",
        model_key="tiny-000000",
        request=_request(**fields),
    )
    result = runner.generate(command, inputs, lambda *_: None, lambda: False)
    images = [
        np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=int) for png in result.images
    ]
    return images, result.info


def _diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    largest: np.ndarray = np.abs(a - b).max(axis=-1)
    return largest


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_resize_mode_geometry(runner: DiffusersPipeline, mode: int) -> None:
    """A 128×64 scene into 64×64: outside the (equally transformed) mask the output is
    the scene in A1111's geometry for the mode, pixel for pixel."""
    init = _scene((128, 64))
    mask = _rect_mask((128, 64), (56, 24, 72, 40))
    (out,), _ = _run(
        runner, init, mask, resize_mode=mode, mask_blur=0, inpaint_full_res=False, inpainting_fill=1
    )
    assert (64, 64, 3) == out.shape
    pixel_mode = 0 if mode == 3 else mode
    expected = np.asarray(img2img.resize_image(init, pixel_mode, 64, 64), dtype=int)
    keep = np.asarray(img2img.resize_image(mask, pixel_mode, 64, 64)) == 0
    assert (out[keep] == expected[keep]).all()
    assert _diff(out, expected)[~keep].mean() > 10, "the masked part was generated"
    # The geometries really differ. Just resize: the red third spans x < 21; crop and
    # resize keeps the middle (red only up to x = 10, blue from 53); resize and fill
    # keeps everything in y = 16..48 and fills above with the white first row.
    if mode in (0, 3):
        assert (out[40:, 16] == RED).all()
    if mode == 1:
        assert (out[40:, 16] == GREEN).all()
        assert (out[40:, 60] == BLUE).all()
    if mode == 2:
        assert (out[:16] == 250).all(), "top band: the white first row, stretched"
        assert (out[48:, 4] == RED).all(), "bottom band: the last row, stretched"


def test_latent_resize_encodes_the_original_and_resizes_the_latents(
    runner: DiffusersPipeline,
) -> None:
    init = _scene((128, 96))
    request = _request(resize_mode=3)
    inputs = img2img.ImageInputs.load(request, {"init": _png(init)})
    assert (128, 96) == inputs.images[0].source.size, "encoded at its own size"
    latents, masked = img2img.initial_latents(runner.pipe, inputs, [7])
    assert masked is None
    own = img2img.encode(runner.pipe, img2img._to_tensor([init]))
    assert (1, 4, 12, 16) == own.shape
    expected = torch.nn.functional.interpolate(own, size=(8, 8), mode="bilinear")
    assert torch.allclose(latents, expected)
    pixel_resized = img2img.encode(runner.pipe, img2img._to_tensor([init.resize((64, 64))]))
    assert not torch.allclose(latents, pixel_resized, atol=1e-3)
    (latent_out,), _ = _run(runner, init, resize_mode=3)
    (pixel_out,), _ = _run(runner, init, resize_mode=0)
    assert (64, 64, 3) == latent_out.shape
    assert _diff(latent_out, pixel_out).mean() > 1


def test_inpaint_keeps_the_unmasked_pixels_and_blur_softens_the_seam(
    runner: DiffusersPipeline,
) -> None:
    init = _scene((64, 64))
    original = np.asarray(init, dtype=int)
    mask = _rect_mask((64, 64), (24, 24, 40, 40))
    inside = np.asarray(mask) > 0
    common = {"inpaint_full_res": False, "inpainting_fill": 1}
    (hard,), _ = _run(runner, init, mask, mask_blur=0, **common)
    assert (hard[~inside] == original[~inside]).all(), "A1111 pastes the original back"
    assert _diff(hard, original)[inside].mean() > 10
    (soft,), _ = _run(runner, init, mask, mask_blur=4, **common)
    change = _diff(soft, original)
    # Rings outside the mask's left edge (x = 24): a fading change, none far away.
    ring = [change[26:38, 24 - d].mean() for d in (1, 3, 5, 8)]
    assert ring[0] > 0, "the blurred mask reaches past the hard edge"
    assert ring == sorted(ring, reverse=True)
    assert ring[0] > ring[-1]
    far = np.ones_like(inside)
    far[10:54, 10:54] = False
    assert (change[far] == 0).all()
    # The hard seam jumps: its first pixel outside is untouched, the soft one is not.
    assert _diff(hard, original)[26:38, 23].max() == 0


def test_mask_blur_x_and_y_apply_separately(runner: DiffusersPipeline) -> None:
    init = _scene((64, 64))
    original = np.asarray(init, dtype=int)
    mask = _rect_mask((64, 64), (24, 24, 40, 40))
    common = {"inpaint_full_res": False, "inpainting_fill": 1}
    (only_x,), _ = _run(runner, init, mask, mask_blur_x=4, mask_blur_y=0, **common)
    change = _diff(only_x, original)
    assert change[26:38, 21:24].mean() > 0, "spread sideways"
    assert (change[18:24, 24:40] == 0).all(), "not upwards"
    (only_y,), _ = _run(runner, init, mask, mask_blur_x=0, mask_blur_y=4, **common)
    change = _diff(only_y, original)
    assert change[21:24, 26:38].mean() > 0, "spread upwards"
    assert (change[24:40, 18:24] == 0).all(), "not sideways"


def test_inpainting_fill_modes_start_from_different_latents(runner: DiffusersPipeline) -> None:
    init = _scene((64, 64))
    mask = _rect_mask((64, 64), (16, 16, 48, 48))
    latents = {}
    for fill in (0, 1, 2, 3):
        request = _request(mask="mask", mask_blur=0, inpaint_full_res=False, inpainting_fill=fill)
        inputs = img2img.ImageInputs.load(request, {"init": _png(init), "mask": _png(mask)})
        latents[fill], _ = img2img.initial_latents(runner.pipe, inputs, [7])
    under = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    under[..., 2:6, 2:6] = True
    assert (latents[3][under.expand_as(latents[3])] == 0).all(), "latent nothing: zeros"
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(7))
    assert torch.equal(latents[2][:, :, 2:6, 2:6], noise[:, :, 2:6, 2:6]), "latent noise"
    for fill in (2, 3):  # outside the mask: the painted image's latents (as for fill 0)
        assert torch.equal(latents[fill][..., :2, :], latents[0][..., :2, :])
    assert not torch.allclose(latents[0], latents[1]), "fill repaints the masked pixels"

    original = np.asarray(init, dtype=int)
    inside = np.asarray(mask) > 0
    outputs = {}
    for fill in (0, 1, 2, 3):
        (outputs[fill],), _ = _run(
            runner, init, mask, mask_blur=0, inpaint_full_res=False, inpainting_fill=fill
        )
        assert (outputs[fill][~inside] == original[~inside]).all()
    for a, b in ((3, 1), (2, 1), (2, 3), (0, 1)):
        assert _diff(outputs[a], outputs[b])[inside].mean() > 1, (a, b)


def test_only_masked_inpaints_the_crop_and_keeps_the_size(runner: DiffusersPipeline) -> None:
    init = _scene((96, 64))
    original = np.asarray(init, dtype=int)
    mask = _rect_mask((96, 64), (40, 20, 56, 36))
    inside = np.asarray(mask) > 0
    (out,), _ = _run(
        runner,
        init,
        mask,
        mask_blur=0,
        inpaint_full_res=True,
        inpaint_full_res_padding=4,
        inpainting_fill=1,
    )
    assert (64, 96, 3) == out.shape, "the original's size, not width × height"
    assert (out[~inside] == original[~inside]).all()
    assert _diff(out, original)[inside].mean() > 10
    # Whole picture: width × height.
    (whole,), info = _run(runner, init, mask, mask_blur=0, inpaint_full_res=False)
    assert (64, 64, 3) == whole.shape
    text = info["infotexts"][0]
    assert "Mask blur: 0, Masked content: fill" in text
    assert "Inpaint area" not in text
    _, info = _run(runner, init, mask, inpaint_full_res=True, inpaint_full_res_padding=4)
    assert "Inpaint area: Only masked, Masked area padding: 4" in info["infotexts"][0]


def _check_fills_keep_the_outside(runner: DiffusersPipeline) -> None:
    """'original' and 'latent nothing' differ under the mask and keep the rest exactly."""
    init = _scene((64, 64))
    original = np.asarray(init, dtype=int)
    mask = _rect_mask((64, 64), (16, 16, 48, 48))
    inside = np.asarray(mask) > 0
    common = {"mask_blur": 0, "inpaint_full_res": False}
    (kept,), _ = _run(runner, init, mask, inpainting_fill=1, **common)
    (nothing,), _ = _run(runner, init, mask, inpainting_fill=3, **common)
    for out in (kept, nothing):
        assert (out[~inside] == original[~inside]).all()
    assert _diff(kept, nothing)[inside].mean() > 1


def test_inpainting_checkpoint(inpaint_runner: DiffusersPipeline) -> None:
    _check_fills_keep_the_outside(inpaint_runner)
    init = _scene((64, 64))
    # Only masked, and img2img without a mask (A1111's full-mask conditioning).
    (crop,), _ = _run(inpaint_runner, _scene((96, 64)), _rect_mask((96, 64), (40, 20, 56, 36)))
    assert (64, 96, 3) == crop.shape
    (plain,), _ = _run(inpaint_runner, init)
    assert (64, 64, 3) == plain.shape


def test_initial_noise_multiplier(runner: DiffusersPipeline) -> None:
    init = _scene((64, 64))
    (base,), _ = _run(runner, init)
    (quiet,), info = _run(runner, init, initial_noise_multiplier=0.0)
    assert [] == info["warnings"]
    assert _diff(base, quiet).mean() > 1
    (again,), _ = _run(runner, init)
    assert (base == again).all(), "the hook is gone after its call"
    # Inpainting too (the hook sees the inpaint pipeline's prepare_latents).
    mask = _rect_mask((64, 64), (16, 16, 48, 48))
    (a,), _ = _run(runner, init, mask, mask_blur=0)
    (b,), _ = _run(runner, init, mask, mask_blur=0, initial_noise_multiplier=0.5)
    assert _diff(a, b).mean() > 1


def test_sdxl_img2img_and_inpaint(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The SDXL pipelines take the worker's latents the same way."""
    from tests.fixtures.tiny_model import build_tiny_sdxl

    tiny = build_tiny_sdxl(tmp_path_factory.mktemp("sdxl"))
    runner = tiny_runner(tiny.single_file, tmp_path_factory.mktemp("cache_xl"))
    _check_fills_keep_the_outside(runner)
    (latent,), _ = _run(runner, _scene((128, 96)), resize_mode=3)
    (pixel,), _ = _run(runner, _scene((128, 96)), resize_mode=0)
    assert (64, 64, 3) == latent.shape
    assert _diff(latent, pixel).mean() > 1
    (quiet,), info = _run(runner, _scene((128, 96)), initial_noise_multiplier=0.0)
    assert [] == info["warnings"]
    assert _diff(quiet, pixel).mean() > 1


@pytest.mark.parametrize(
    ("nine", "fields"),
    [
        (False, {}),
        (False, {"mask": True}),
        (False, {"mask": True, "denoising_strength": 1.0}),
        (True, {"mask": True}),
    ],
)
def test_noise_multiplier_hook_keeps_the_image_share(
    runner: DiffusersPipeline, inpaint_runner: DiffusersPipeline, nine: bool, fields: Any
) -> None:
    """A multiplier of (almost) 1 goes through the hook and changes nothing: the hook
    splits the start latents into the image's share and the noise's exactly."""
    use = inpaint_runner if nine else runner
    init = _scene((64, 64))
    mask = _rect_mask((64, 64), (16, 16, 48, 48)) if fields.pop("mask", False) else None
    (base,), _ = _run(use, init, mask, **fields)
    (hooked,), _ = _run(use, init, mask, initial_noise_multiplier=1.000001, **fields)
    assert _diff(base, hooked).max() <= 1
    (half,), _ = _run(use, init, mask, initial_noise_multiplier=0.5, **fields)
    assert _diff(base, half).mean() > 1
