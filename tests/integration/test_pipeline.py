"""The worker's pipeline on the tiny checkpoint: A1111 parameters change the image."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402

from services.inference.pipeline import DiffusersPipeline  # noqa: E402
from tests.fixtures.tiny_runner import run_tiny, tiny_runner  # noqa: E402

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

    command = tiny_command(
        enable_hr=True, hr_scale=2, hr_upscaler=upscaler, denoising_strength=0.5
    )
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
