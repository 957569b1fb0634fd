"""fp16 safety on the tiny checkpoint (CPU): a half-precision VAE decode that comes out
NaN is redone in float32 (A1111's automatic VAE upcast); the image is never black."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402

from services.inference.pipeline import DiffusersPipeline, GenerationError  # noqa: E402
from tests.fixtures.tiny_runner import run_tiny, tiny_runner  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture
def runner(tiny_checkpoint: Path, tmp_path: Path) -> DiffusersPipeline:
    """The tiny checkpoint in bf16, the CPU's half precision (fp16 is far too slow)."""
    runner = tiny_runner(tiny_checkpoint, tmp_path)
    runner.pipe.to(torch.bfloat16)
    return runner


@pytest.fixture
def half_vae_overflows(runner: DiffusersPipeline) -> Iterator[list[Any]]:
    """A VAE decoder that overflows to NaN in any precision below float32, as SD's VAE
    does in fp16 on some latents."""
    decoded: list[Any] = []
    vae = runner.pipe.vae

    def overflow(module: Any, args: Any, output: Any) -> Any:
        decoded.append(output.dtype)
        return output if output.dtype == torch.float32 else output * float("nan")

    hook = vae.decoder.register_forward_hook(overflow)
    yield decoded
    hook.remove()


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_a_nan_decode_is_redone_in_float32(
    runner: DiffusersPipeline, half_vae_overflows: list[Any]
) -> None:
    pixels = _pixels(run_tiny(runner).images[0])
    assert [torch.bfloat16, torch.float32] == half_vae_overflows, "decoded again in float32"
    assert 1 == runner.vae_upcasts
    assert torch.bfloat16 == runner.pipe.vae.dtype, "the VAE is back in its own precision"
    assert pixels.max() > 0, "not black"
    half_vae_overflows.clear()
    runner.pipe.vae.decoder._forward_hooks.clear()
    # The same latents decoded in bf16 without the overflow: the same image, give or take
    # bf16's rounding in the VAE.
    reference = _pixels(run_tiny(runner).images[0])
    assert 0 == runner.vae_upcasts - 1, "no upcast without an overflow"
    assert np.abs(reference.astype(int) - pixels.astype(int)).mean() < 2.0


def test_nan_latents_fail_the_task_instead_of_a_black_image(runner: DiffusersPipeline) -> None:
    hook = runner.pipe.unet.register_forward_hook(lambda m, a, out: (out[0] * float("nan"),))
    try:
        with pytest.raises(GenerationError) as caught:
            run_tiny(runner)
    finally:
        hook.remove()
    assert "non_finite_output" == caught.value.code
    assert 1 == runner.vae_upcasts
