"""``SDSWARM_COMPILE`` on a CUDA device: the compiled UNet's image matches eager's, a second
process reuses the persisted compile cache, and an fp16 decode gives no NaN (skipped where no
GPU is present)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

TOLERANCE = 4
"""Grey levels (of 255): inductor reorders fp16 reductions, so compiled and eager differ
by rounding only; a broken graph differs by far more."""
CACHED_SHARE = 0.1
"""A cache hit's first call takes under this share of the cold compile (the issue's bar)."""


def _image(pipe: object) -> np.ndarray:
    result = pipe(  # type: ignore[operator]
        "a cat",
        num_inference_steps=4,
        width=64,
        height=64,
        generator=torch.Generator("cpu").manual_seed(3),
    )
    return np.asarray(result.images[0], dtype=np.int16)


def test_compiled_unet_matches_eager_within_tolerance(
    tiny_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from proto.workers import CompileState
    from services.inference.compiled import compile_unet
    from services.inference.loader import load_pipeline

    pipe = load_pipeline(tiny_checkpoint, cache_dir=tmp_path, device="cuda")
    pipe.set_progress_bar_config(disable=True)
    eager = _image(pipe)
    with caplog.at_level(logging.WARNING, logger="services.inference.compiled"):
        compiled = compile_unet(
            pipe, device="cuda", base="sd1", max_batch=1, sizes="64x64", cache_dir=tmp_path
        )
        compiled.start()
        assert CompileState.READY == compiled.wait(600), caplog.text
        with torch.inference_mode():
            image = _image(pipe)
    assert compiled.compiled_calls >= 4, f"fell back to eager: {caplog.text}"  # 4 steps
    assert int(np.abs(eager - image).max()) <= TOLERANCE


def test_a_second_process_reuses_the_compile_cache(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from tests.integration.test_compile_cache import compiled_worker

    first = compiled_worker(tiny_checkpoint, tmp_path, "cuda")
    second = compiled_worker(tiny_checkpoint, tmp_path, "cuda")
    assert ("ready", "ready") == (first["status"]["state"], second["status"]["state"])
    assert second["fxgraph_cache_hit"] > 0
    cold, cached = first["status"]["seconds"], second["status"]["seconds"]
    assert cached < CACHED_SHARE * cold, f"cold compile {cold} s, from the cache {cached} s"


def test_fp16_decode_has_no_nan(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from services.inference.loader import load_pipeline
    from services.inference.pipeline import DiffusersPipeline
    from tests.fixtures.tiny_runner import run_tiny

    pipe = load_pipeline(tiny_checkpoint, cache_dir=tmp_path, device="cuda")
    pipe.set_progress_bar_config(disable=True)
    runner = DiffusersPipeline(pipe, model_name="tiny", model_hash="abc", device="cuda")
    assert torch.float16 == pipe.vae.dtype
    assert run_tiny(runner).images[0]
    assert 0 == runner.vae_upcasts, "the tiny VAE does not overflow in fp16"
