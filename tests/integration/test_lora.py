"""LoRAs on the tiny checkpoint, proven by their effect: weight 0 is the base image,
weight 1 another, two at once a third, and the next task without one is the base again."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from PIL import Image  # noqa: E402

from proto.commands import AdapterRef  # noqa: E402
from services.inference.pipeline import DiffusersPipeline, GenerationError  # noqa: E402
from tests.fixtures.tiny_lora import write_tiny_lora  # noqa: E402
from tests.fixtures.tiny_runner import run_tiny, tiny_runner  # noqa: E402
from tests.fixtures.tiny_vae import write_tiny_embedding, write_tiny_vae  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def runner(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> DiffusersPipeline:
    return tiny_runner(tiny_checkpoint, tmp_path_factory.mktemp("cache"), max_loras=2)


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("Lora")
    return {
        name: write_tiny_lora(folder / f"{name}.safetensors", seed=n)
        for n, name in enumerate(("ink", "fog", "rust"), start=1)
    }


def _pixels(runner: DiffusersPipeline, prompt: str, loras: list[AdapterRef]) -> bytes:
    result = run_tiny(runner, loras=loras, prompt=prompt, seed=11)
    return Image.open(io.BytesIO(result.images[0])).tobytes()


def _ref(loras: dict[str, Path], name: str, weight: float) -> AdapterRef:
    return AdapterRef(name=name, path=str(loras[name]), sha256=name * 8, weight=weight)


def test_weights_take_effect_for_one_task_only(
    runner: DiffusersPipeline, loras: dict[str, Path]
) -> None:
    base = _pixels(runner, "a cat", [])
    # The tag is stripped from what the encoder sees: weight 0 is exactly the base image.
    assert base == _pixels(runner, "a cat <lora:ink:0>", [_ref(loras, "ink", 0.0)])
    ink = _pixels(runner, "a cat <lora:ink:1>", [_ref(loras, "ink", 1.0)])
    assert base != ink
    both = _pixels(
        runner,
        "a cat <lora:ink:1> <lora:fog:0.7>",
        [_ref(loras, "ink", 1.0), _ref(loras, "fog", 0.7)],
    )
    assert both not in (base, ink)
    assert base == _pixels(runner, "a cat", []), "no leakage into the next task"
    # The cache holds 2 adapters: a third evicts the least recently used, and results hold.
    rust = _pixels(runner, "a cat <lora:rust>", [_ref(loras, "rust", 1.0)])
    assert rust not in (base, ink)
    assert ink == _pixels(runner, "a cat <lora:ink:1>", [_ref(loras, "ink", 1.0)])
    assert len(runner.loras.loaded) <= 2


def test_a_lora_for_another_model_fails_the_task_with_the_reason(
    runner: DiffusersPipeline, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    wrong = tmp_path / "wrong.safetensors"
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file(
        {
            f"{key}.lora_down.weight": torch.zeros(4, 999),
            f"{key}.lora_up.weight": torch.zeros(999, 4),
        },
        str(wrong),
    )
    with pytest.raises(GenerationError, match="cannot be applied"):
        _pixels(runner, "x <lora:wrong>", [AdapterRef(name="wrong", path=str(wrong))])
    base = _pixels(runner, "a cat", [])
    assert base == _pixels(runner, "a cat", []), "the worker is healthy afterwards"


def test_a_vae_changes_the_decode_not_the_latents(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    runner = tiny_runner(tiny_checkpoint, tmp_path_factory.mktemp("cache"), preview_interval_s=1e-9)
    vae = AdapterRef(
        name="other.safetensors",
        path=str(write_tiny_vae(tmp_path_factory.mktemp("VAE") / "other.safetensors")),
        sha256="v" * 64,
    )

    def run(with_vae: bool) -> tuple[bytes, bytes]:
        previews: list[bytes] = []
        result = run_tiny(runner, vae=vae if with_vae else None, previews=previews)
        return result.images[0], previews[-1]

    own_image, own_latents = run(False)
    other_image, other_latents = run(True)
    assert own_latents, "a latent preview of the last step"
    assert own_latents == other_latents, "the latent preview (before decoding) is the same"
    assert (
        Image.open(io.BytesIO(own_image)).tobytes() != Image.open(io.BytesIO(other_image)).tobytes()
    )
    assert own_image == run(False)[0], "the checkpoint's own VAE is back for the next task"
    assert runner.pipe.vae is runner._own_vae


def test_an_embedding_name_changes_the_conditioning(
    runner: DiffusersPipeline, tmp_path: Path
) -> None:
    embedding = AdapterRef(
        name="bad-hands",
        path=str(write_tiny_embedding(tmp_path / "bad-hands.safetensors")),
        sha256="e" * 64,
    )
    plain = run_tiny(runner, prompt="a cat, bad-hands").images[0]
    expanded = run_tiny(runner, prompt="a cat, bad-hands", embeddings=[embedding]).images[0]
    assert plain != expanded, "the name's vectors replace the word"
    # With clip skip the prompt goes through our own encoder: the embedding still applies.
    skip = {"CLIP_stop_at_last_layers": 2}
    plain_skip = run_tiny(runner, prompt="a cat, bad-hands", override_settings=skip)
    expanded_skip = run_tiny(
        runner, prompt="a cat, bad-hands", embeddings=[embedding], override_settings=skip
    )
    assert plain_skip.images[0] != expanded_skip.images[0]
    assert 'TI hashes: "bad-hands: eeeeeeeeeeee"' in expanded_skip.info["infotexts"][0]


def test_hr_prompt_loras_switch_for_the_hires_pass(
    runner: DiffusersPipeline, loras: dict[str, Path]
) -> None:
    def run(
        loras_: list[AdapterRef], hr_loras: list[AdapterRef] | None, **fields: Any
    ) -> list[bytes]:
        options = {"enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.6, "seed": 11}
        result = run_tiny(runner, loras=loras_, hr_loras=hr_loras, **(options | fields))
        return [Image.open(io.BytesIO(png)).tobytes() for png in result.images]

    ink = [_ref(loras, "ink", 1.0)]
    plain = run([], None)
    same = run(ink, None, prompt="a cat <lora:ink:1>")
    hr_only = run([], ink, prompt="a cat", hr_prompt="a cat <lora:ink:1>")
    first_only = run(ink, [], prompt="a cat <lora:ink:1>", hr_prompt="a cat", n_iter=2)
    assert len({plain[0], same[0], hr_only[0], first_only[0]}) == 4
    # The second job starts with the prompt's LoRAs again, not the hires pass's.
    alone = run(ink, [], prompt="a cat <lora:ink:1>", hr_prompt="a cat", seed=12)
    assert alone[0] == first_only[1]
    assert plain == run([], None), "nothing leaks into the next task"
