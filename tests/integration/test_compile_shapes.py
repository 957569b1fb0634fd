"""The compiled UNet's dummy inputs against diffusers' real calls, on the tiny checkpoints:
SD1 batches padded to their bucket, SDXL's added conditions, a 9-channel inpainting UNet.
Dynamo traces for real with its ``eager`` backend (seconds, not inductor's minute), so its
guards decide: after the background compile, a real generation at a planned shape runs the
compiled path and compiles nothing (tests/integration/test_compile_cache.py runs inductor)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch._dynamo.utils import counters

from proto.workers import CompileState
from services.inference.compiled import CompiledUnet, compile_unet, eager_unet
from services.inference.pipeline import DiffusersPipeline
from tests.fixtures.tiny_runner import run_tiny, tiny_runner

pytestmark = pytest.mark.integration


def traced(fn: Any) -> Any:
    """Dynamo's tracing and guards without a compiler behind them."""
    return torch.compile(fn, backend="eager", dynamic=False)


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()  # guards and recompile counts of other tests' UNets
    yield
    torch._dynamo.reset()


def _compiled(pipe: Any, base: str, max_batch: int, cache: Path) -> CompiledUnet:
    compiled = compile_unet(
        pipe,
        device="cpu",
        base=base,
        max_batch=max_batch,
        sizes="64x64",
        cache_dir=cache,
        compiler=traced,
    )
    compiled.start()
    assert CompileState.READY == compiled.wait(300), compiled.status()
    return compiled


def _pixels(runner: DiffusersPipeline, **fields: Any) -> list[np.ndarray]:
    return [
        np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)
        for png in run_tiny(runner, **fields).images
    ]


def test_sd1_batches_run_compiled_in_their_buckets(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "unused"))  # restored after
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "unused"))
    runner = tiny_runner(tiny_checkpoint, tmp_path)
    compiled = _compiled(runner.pipe, "sd1", 4, tmp_path)
    assert ["2@64x64", "4@64x64", "8@64x64"] == compiled.status().ready
    graphs = counters["stats"]["unique_graphs"]
    single = _pixels(runner)
    three = _pixels(runner, batch_size=3)  # 6 UNet rows, padded to 8
    assert 6 == compiled.compiled_calls, "3 steps each"
    assert graphs == counters["stats"]["unique_graphs"], "nothing compiled on a task's time"
    with eager_unet(runner.pipe.unet):
        assert int(np.abs(_pixels(runner)[0] - single[0]).max()) <= 1
        eager_three = _pixels(runner, batch_size=3)
    for image, eager in zip(three, eager_three, strict=True):
        assert int(np.abs(image - eager).max()) <= 1, "padding changed the real rows"


def test_sdxl_runs_compiled_with_its_added_conditions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.fixtures.tiny_model import build_tiny_sdxl

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "unused"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "unused"))
    runner = tiny_runner(build_tiny_sdxl(tmp_path / "sdxl").single_file, tmp_path / "cache")
    compiled = _compiled(runner.pipe, "sdxl", 1, tmp_path)
    graphs = counters["stats"]["unique_graphs"]
    image = _pixels(runner)[0]
    assert 3 == compiled.compiled_calls
    assert graphs == counters["stats"]["unique_graphs"]
    with eager_unet(runner.pipe.unet):
        assert int(np.abs(_pixels(runner)[0] - image).max()) <= 1


def test_an_inpainting_unet_runs_compiled_with_nine_channels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    from services.inference.tiny import build_pipeline

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "unused"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "unused"))
    base: Any = build_pipeline()
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**dict(base.unet.config), "in_channels": 9})
    pipe: Any = StableDiffusionInpaintPipeline(**{**base.components, "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    compiled = _compiled(pipe, "sd1", 1, tmp_path)
    graphs = counters["stats"]["unique_graphs"]
    image = Image.new("RGB", (64, 64), "gray")
    mask = Image.new("L", (64, 64), 255)
    with torch.inference_mode():
        pipe("a cat", image=image, mask_image=mask, height=64, width=64, num_inference_steps=2)
    assert compiled.compiled_calls >= 2
    assert graphs == counters["stats"]["unique_graphs"]
