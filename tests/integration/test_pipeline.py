"""The worker's pipeline on the tiny checkpoint: A1111 parameters change the image."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proto.commands import Img2ImgTask

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402

from services.inference.pipeline import DiffusersPipeline  # noqa: E402
from tests.fixtures.tiny_runner import (  # noqa: E402
    BATCH_TOLERANCE,
    max_difference,
    run_tiny,
    tiny_runner,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def runner(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> DiffusersPipeline:
    return tiny_runner(tiny_checkpoint, tmp_path_factory.mktemp("cache"))


def _generate(runner: DiffusersPipeline, **fields: Any) -> tuple[bytes, list[int]]:
    steps: list[int] = []
    result = run_tiny(runner, steps, **fields)
    return result.images[0], steps


def _pixels(png: bytes) -> bytes:
    return Image.open(io.BytesIO(png)).tobytes()


def test_same_request_same_pixels(runner: DiffusersPipeline) -> None:
    first, steps = _generate(runner)
    assert [1, 2, 3] == steps
    assert _pixels(first) == _pixels(_generate(runner)[0])


def test_clip_skip_changes_the_conditioning(runner: DiffusersPipeline) -> None:
    base = _pixels(_generate(runner)[0])
    skipped, _ = _generate(runner, override_settings={"CLIP_stop_at_last_layers": 2})
    assert base != _pixels(skipped)
    image = Image.open(io.BytesIO(skipped))
    assert "Clip skip: 2" in image.text["parameters"]  # type: ignore[attr-defined]


def test_tiling_is_applied_for_one_task_only(runner: DiffusersPipeline) -> None:
    base = _pixels(_generate(runner)[0])
    tiled, _ = _generate(runner, tiling=True)
    assert base != _pixels(tiled)
    modes = {m.padding_mode for m in runner.pipe.unet.modules() if isinstance(m, torch.nn.Conv2d)}
    assert {"zeros"} == modes, "no leakage into the next task"
    assert base == _pixels(_generate(runner)[0])


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M Karras", "DDIM", "UniPC", "Heun"])
def test_samplers_run(runner: DiffusersPipeline, sampler: str) -> None:
    png, steps = _generate(runner, sampler_name=sampler, steps=4)
    assert (64, 64) == Image.open(io.BytesIO(png)).size
    assert steps[-1] == max(steps)


def test_our_encoder_matches_diffusers_without_skip(runner: DiffusersPipeline) -> None:
    from services.inference.pipeline import encode_skipping

    pipe = runner.pipe
    with torch.inference_mode():
        ours = encode_skipping(pipe, ["a photo of a cat"], 0)
        theirs, _ = pipe.encode_prompt("a photo of a cat", "cpu", 1, False)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_emphasis_and_long_prompts(runner: DiffusersPipeline) -> None:
    plain = _pixels(_generate(runner, prompt="a red cat")[0])
    # Weight 1 everywhere is the plain prompt (our encoder agrees with diffusers').
    assert plain == _pixels(_generate(runner, prompt="a (red:1.0) cat")[0])
    assert plain != _pixels(_generate(runner, prompt="a (red:1.6) cat")[0])
    assert plain != _pixels(_generate(runner, prompt="a [red] cat")[0])
    # Past 75 tokens the prompt is not cut: what comes after changes the image.
    long = "a red cat, " + "in a garden, " * 30
    assert _pixels(_generate(runner, prompt=long + "at night")[0]) != _pixels(
        _generate(runner, prompt=long + "at noon")[0]
    )
    assert plain != _pixels(_generate(runner, prompt="a red BREAK cat")[0])


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (bicubic antialiased)", "Lanczos"])
def test_hires_fix(runner: DiffusersPipeline, upscaler: str) -> None:
    steps: list[int] = []
    result = run_tiny(
        runner,
        steps,
        enable_hr=True,
        hr_scale=2,
        hr_upscaler=upscaler,
        hr_second_pass_steps=4,
        denoising_strength=0.5,
    )
    image = Image.open(io.BytesIO(result.images[0]))
    assert (128, 128) == image.size
    # One progress bar over both passes: 3 first-pass steps, then 4 × 0.5 = 2 more.
    assert [1, 2, 3, 4, 5] == steps
    text = result.info["infotexts"][0]
    assert "Size: 64x64" in text
    assert f"Hires upscale: 2, Hires steps: 4, Hires upscaler: {upscaler}" in text
    assert "Denoising strength: 0.5" in text


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_a_cancel_between_the_passes_stops_before_the_second(
    runner: DiffusersPipeline, upscaler: str
) -> None:
    """Issue 15, item 11: a cancel that arrives after the first pass's last step ends the
    task before the upscale and the second pass, not after them."""
    from services.inference.pipeline import TaskCancelledError
    from tests.fixtures.tiny_runner import tiny_command

    command = tiny_command(enable_hr=True, hr_scale=2, hr_upscaler=upscaler, denoising_strength=0.5)
    asked: list[int] = []
    steps: list[int] = []

    def cancelled_after_first_pass() -> bool:
        asked.append(len(steps))
        return len(steps) >= 3  # every first-pass step ran, then the cancel came

    calls: list[int] = []
    hook = runner.pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(TaskCancelledError):
            runner.generate(
                command, {}, lambda j, step, t, p: steps.append(step), cancelled_after_first_pass
            )
    finally:
        hook.remove()
    assert [1, 2, 3] == steps
    assert 3 == len(calls), "the UNet ran for the first pass only"


def test_hires_fix_with_a_model_upscaler(runner: DiffusersPipeline, tmp_path: Path) -> None:
    """``hr_upscaler`` naming a registered model: spandrel's net upscales between passes."""
    from proto.commands import AdapterRef
    from services.inference.pipeline import TaskCancelledError
    from tests.fixtures.upscaler import save_compact

    model = AdapterRef(name="tiny_x2", path=str(save_compact(tmp_path / "tiny_x2.safetensors")))
    common: dict[str, Any] = {
        "enable_hr": True,
        "hr_scale": 2,
        "hr_second_pass_steps": 4,
        "denoising_strength": 0.5,
    }
    steps: list[int] = []
    result = run_tiny(runner, steps, hr_model=model, hr_upscaler="tiny_x2", **common)
    image = Image.open(io.BytesIO(result.images[0]))
    assert (128, 128) == image.size
    assert [1, 2, 3, 4, 5] == steps
    assert "Hires upscaler: tiny_x2" in result.info["infotexts"][0]
    lanczos = run_tiny(runner, hr_upscaler="Lanczos", **common)
    assert _pixels(lanczos.images[0]) != image.tobytes(), "the model, not Lanczos, upscaled"
    again = run_tiny(runner, hr_model=model, hr_upscaler="tiny_x2", **common)
    assert image.tobytes() == _pixels(again.images[0])
    # Cancelled once the first pass is done: the upscaler stops before its first tile.
    with pytest.raises(TaskCancelledError):
        run_tiny(
            runner,
            steps,
            hr_model=model,
            hr_upscaler="tiny_x2",
            should_stop=lambda: len(steps) >= 8,  # the 3 first-pass steps of this run
            **common,
        )
    assert 8 == len(steps)


def test_hires_prompt_and_resize(runner: DiffusersPipeline) -> None:
    common: dict[str, Any] = {"enable_hr": True, "hr_resize_x": 96, "denoising_strength": 0.6}
    base = run_tiny(runner, **common).images[0]
    other = run_tiny(runner, hr_prompt="a dog", **common).images[0]
    assert (96, 96) == Image.open(io.BytesIO(base)).size, "the other side keeps the ratio"
    assert _pixels(base) != _pixels(other), "the second pass uses hr_prompt"


def test_skip_ends_the_current_job_only(runner: DiffusersPipeline) -> None:
    asked = iter([True])  # the first step's check: skip the first job
    result = run_tiny(runner, n_iter=2, seed=20, should_skip=lambda: next(asked, False))
    assert 1 == len(result.images), "job 1 was skipped, job 2 ran"
    second = run_tiny(runner, seed=21)  # what job 2 alone makes (seed + 1)
    assert _pixels(second.images[0]) == _pixels(result.images[0])
    assert "Seed: 21" in result.info["infotexts"][1]


@contextlib.contextmanager
def _vae_batch_px(runner: DiffusersPipeline, limit: int) -> Iterator[None]:
    saved, runner.vae_batch_px = runner.vae_batch_px, limit
    try:
        yield
    finally:
        runner.vae_batch_px = saved


def test_a_small_batch_decodes_at_once_a_large_one_row_by_row(
    runner: DiffusersPipeline,
) -> None:
    """``SDSWARM_VAE_BATCH_PX``: a batch within it is decoded in one forward of the VAE's
    decoder, one over it image by image (the decoder runs once per image), for that call
    only; the images agree either way (within the batching tolerance)."""
    decoded: list[int] = []
    hook = runner.pipe.vae.decoder.register_forward_hook(lambda *_: decoded.append(1))
    try:
        at_once = run_tiny(runner, batch_size=2, seed=30)  # 2 × 64² within the default
        forwards_at_once = len(decoded)
        decoded.clear()
        with _vae_batch_px(runner, 64 * 64):
            by_rows = run_tiny(runner, batch_size=2, seed=30)
    finally:
        hook.remove()
    assert 1 == forwards_at_once
    assert 2 == len(decoded)
    assert not runner.pipe.vae.use_slicing, "the setting holds for that call only"
    assert max_difference(at_once, by_rows) <= BATCH_TOLERANCE


def test_a_cancel_during_the_decode_stops_between_rows(runner: DiffusersPipeline) -> None:
    """Issue 15, item 11: a batch the VAE decodes row by row (over
    ``SDSWARM_VAE_BATCH_PX``) honours a cancel between rows, not only between steps."""
    from services.inference.pipeline import TaskCancelledError
    from tests.fixtures.tiny_runner import tiny_command

    decoded: list[int] = []
    steps: list[int] = []
    hook = runner.pipe.vae.decoder.register_forward_hook(lambda *_: decoded.append(1))
    try:
        with _vae_batch_px(runner, 0), pytest.raises(TaskCancelledError):
            runner.generate(
                tiny_command(batch_size=2),
                {},
                lambda j, step, t, p: steps.append(step),
                lambda: bool(decoded),  # cancelled once the first row is decoded
            )
    finally:
        hook.remove()
    assert [1, 2, 3] == steps
    assert 1 == len(decoded), "the second row was not decoded"
    # Nothing is left behind: the next task decodes every row.
    result = run_tiny(runner, batch_size=2)
    assert 2 == len(result.images)


def test_a_cancel_during_img2img_preparation_stops_before_denoising(
    runner: DiffusersPipeline,
) -> None:
    """Init images encoded row by row (over ``SDSWARM_VAE_BATCH_PX``): a cancel seen
    there ends the task before the first step."""
    import msgspec

    from proto.requests import Img2ImgRequest
    from services.inference.pipeline import TaskCancelledError

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    request = msgspec.convert(
        {
            "stable_diffusion_model": "tiny.safetensors",
            "prompt": "a cat",
            "steps": 3,
            "width": 64,
            "height": 64,
            "batch_size": 2,
            "init_images": ["init"],
        },
        Img2ImgRequest,
    )
    command = Img2ImgTask(
        task_id="t", user="u", model_name="tiny.safetensors", model_key="k", request=request
    )
    encoded: list[int] = []
    denoised: list[int] = []
    hooks = [
        runner.pipe.vae.encoder.register_forward_hook(lambda *_: encoded.append(1)),
        runner.pipe.unet.register_forward_hook(lambda *_: denoised.append(1)),
    ]
    try:
        with _vae_batch_px(runner, 0), pytest.raises(TaskCancelledError):
            runner.generate(
                command, {"init": buffer.getvalue()}, lambda *_: None, lambda: bool(encoded)
            )
    finally:
        for hook in hooks:
            hook.remove()
    assert 1 == len(encoded), "the second row was not encoded"
    assert [] == denoised


def test_large_images_decode_in_tiles_and_a_cancel_stops_between_them(
    runner: DiffusersPipeline,
) -> None:
    """``SDSWARM_VAE_TILE_PX``: an image larger than the tile decodes tile by tile (the
    decoder runs once per tile), for that call only; a cancel is honoured between tiles."""
    from services.inference.pipeline import TaskCancelledError
    from tests.fixtures.tiny_runner import tiny_command

    decoded: list[int] = []
    hook = runner.pipe.vae.decoder.register_forward_hook(lambda *_: decoded.append(1))
    runner.vae_tile_px = 64
    try:
        tiled = run_tiny(runner, width=128, height=64)
        tiles = len(decoded)
        decoded.clear()
        with pytest.raises(TaskCancelledError):
            runner.generate(
                tiny_command(width=128, height=64), {}, lambda *_: None, lambda: bool(decoded)
            )
        cancelled_after = len(decoded)
        runner.vae_tile_px = 0
        decoded.clear()
        whole = run_tiny(runner, width=128, height=64)
    finally:
        runner.vae_tile_px = 0
        hook.remove()
    assert tiles > 1
    assert 1 == cancelled_after, "no tile after the cancel"
    assert 1 == len(decoded), "without the setting the image decodes whole"
    assert not runner.pipe.vae.use_tiling
    sizes = [Image.open(io.BytesIO(r.images[0])).size for r in (tiled, whole)]
    assert [(128, 64), (128, 64)] == sizes
