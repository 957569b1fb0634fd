"""A1111's variation seeds, seed resize and ENSD on the tiny checkpoint, by their effect."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402

from services.inference.noise import draw, initial_noise, slerp  # noqa: E402
from services.inference.pipeline import DiffusersPipeline, Generation  # noqa: E402
from tests.fixtures.tiny_runner import run_tiny, tiny_runner  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def runner(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> DiffusersPipeline:
    return tiny_runner(tiny_checkpoint, tmp_path_factory.mktemp("cache"))


def _run(runner: DiffusersPipeline, **fields: Any) -> Generation:
    return run_tiny(runner, **({"seed": 11} | fields))


def _pixels(result: Generation, index: int = 0) -> bytes:
    return Image.open(io.BytesIO(result.images[index])).tobytes()


def test_slerp_ends_and_middle() -> None:
    low, high = draw(1, (4, 8, 8)), draw(2, (4, 8, 8))
    assert torch.equal(low, slerp(0.0, low, high))
    assert torch.equal(high, slerp(1.0, low, high))
    middle = slerp(0.5, low, high)
    assert not torch.equal(middle, low)
    assert not torch.equal(middle, high)
    # Spherical, not linear: the halfway noise keeps (about) the norm of its ends.
    assert abs(middle.norm() / low.norm() - 1) < 0.1
    assert (low * 0.5 + high * 0.5).norm() / low.norm() < 0.8


def test_seed_resize_pastes_the_small_noise_in_the_centre() -> None:
    noise = initial_noise([7], [0], 0.0, (4, 8, 8), resize_from=(4, 6))[0]
    small = draw(7, (4, 4, 6))
    assert torch.equal(small, noise[:, 2:6, 1:7])
    assert torch.equal(draw(7, (4, 8, 8))[:, :2], noise[:, :2]), "the rest is the seed's"
    larger = initial_noise([7], [0], 0.0, (4, 8, 8), resize_from=(10, 12))[0]
    assert torch.equal(draw(7, (4, 10, 12))[:, 1:9, 2:10], larger), "a larger one is cropped"


def test_variation_strength_zero_is_the_seed_and_one_is_the_subseed(
    runner: DiffusersPipeline,
) -> None:
    base = _pixels(_run(runner))
    assert base == _pixels(_run(runner, subseed=99, subseed_strength=0.0))
    assert _pixels(_run(runner, seed=99)) == _pixels(_run(runner, subseed=99, subseed_strength=1))
    halfway = _run(runner, subseed=99, subseed_strength=0.5)
    assert _pixels(halfway) not in (base, _pixels(_run(runner, seed=99)))
    text = Image.open(io.BytesIO(halfway.images[0])).text["parameters"]  # type: ignore[attr-defined]
    assert "Variation seed: 99, Variation seed strength: 0.5" in text
    assert 99 == halfway.info["subseed"]


def test_each_image_gets_its_own_subseed(runner: DiffusersPipeline) -> None:
    result = _run(runner, subseed=40, subseed_strength=1, n_iter=2, batch_size=2)
    assert [40, 41, 42, 43] == result.info["all_subseeds"]
    assert [11, 12, 13, 14] == result.info["all_seeds"]
    alone, batched = _pixels(_run(runner, seed=42)), _pixels(result, 2)
    # A batch of two is not bitwise a batch of one (matmul blocking): within one level.
    assert max(abs(a - b) for a, b in zip(alone, batched, strict=True)) <= 1
    assert result.info == json.loads(json.dumps(result.info)), "the infotext is plain JSON"


def test_seed_resize_changes_the_start_and_keeps_the_size(runner: DiffusersPipeline) -> None:
    base = _pixels(_run(runner))
    same = _run(runner, seed_resize_from_w=64, seed_resize_from_h=64)
    assert base == _pixels(same), "resizing from the size itself changes nothing"
    resized = _run(runner, seed_resize_from_w=32, seed_resize_from_h=48)
    assert (64, 64) == Image.open(io.BytesIO(resized.images[0])).size
    assert base != _pixels(resized)


def test_ensd_changes_ancestral_samplers_only(runner: DiffusersPipeline) -> None:
    ensd = {"override_settings": {"eta_noise_seed_delta": 31337}}
    assert _pixels(_run(runner)) == _pixels(_run(runner, **ensd)), "Euler adds no noise"
    ancestral = _run(runner, sampler_name="Euler a", **ensd)
    assert _pixels(_run(runner, sampler_name="Euler a")) != _pixels(ancestral)
    text = Image.open(io.BytesIO(ancestral.images[0])).text["parameters"]  # type: ignore[attr-defined]
    assert "ENSD: 31337" in text


def test_churn_applies_to_euler_and_is_reported_elsewhere(runner: DiffusersPipeline) -> None:
    base = _pixels(_run(runner))
    assert base == _pixels(_run(runner, s_churn=0.0, s_tmin=0.0, s_tmax=0.0, s_noise=1.0))
    churned = _run(runner, s_churn=2.0)
    assert base != _pixels(churned)
    assert [] == churned.info["warnings"]
    other = _run(runner, sampler_name="DDIM", s_churn=2.0, s_min_uncond=1.0, restore_faces=True)
    assert 3 == len(other.info["warnings"]), other.info["warnings"]
    assert [] == _run(runner, sampler_name="DDIM", eta=0.5).info["warnings"], "DDIM takes eta"
    ancestral = _run(runner, sampler_name="Euler a", eta=0.5).info["warnings"]
    assert ["eta 0.5 is not applied: diffusers' Euler a uses 1"] == ancestral
    assert "s_churn applies to Euler only here, not to DDIM" in other.info["warnings"]


def test_scripts_that_do_not_run_are_reported(runner: DiffusersPipeline) -> None:
    result = _run(
        runner,
        script_name="x/y/z plot",
        alwayson_scripts={"ADetailer": {"args": []}, "controlnet": {"args": []}},
    )
    assert [
        "alwayson_scripts.ADetailer is not run: sdswarm runs ControlNet only",
        "script_name 'x/y/z plot' is not run: sdswarm runs no scripts",
    ] == result.info["warnings"]


def test_previews_every_n_steps_when_the_request_says(runner: DiffusersPipeline) -> None:
    def shown(**fields: Any) -> list[int]:
        steps: list[int] = []
        previews: list[bytes] = []
        run_tiny(runner, steps, previews=previews, **({"steps": 6} | fields))
        return [step for step, preview in zip(steps, previews, strict=True) if preview]

    assert [2, 4, 6] == shown(override_settings={"show_progress_every_n_steps": 2})
    assert [] == shown(override_settings={"show_progress_every_n_steps": 0})
    assert [] == shown(), "this runner's time-based previews are off"
