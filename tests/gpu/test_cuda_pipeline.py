"""The tiny checkpoint on a CUDA device (fp16): skipped where no GPU is present."""

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_tiny_checkpoint_runs_in_fp16_on_cuda(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from services.inference.loader import load_pipeline

    pipe = load_pipeline(tiny_checkpoint, cache_dir=tmp_path, device="cuda")
    assert torch.float16 == pipe.unet.dtype
    pipe.set_progress_bar_config(disable=True)
    images = [
        np.array(
            pipe(
                "a cat",
                num_inference_steps=4,
                width=64,
                height=64,
                generator=torch.Generator("cpu").manual_seed(3),
            ).images[0]
        )
        for _ in range(2)
    ]
    assert (64, 64, 3) == images[0].shape
    assert np.array_equal(images[0], images[1])


def test_task_memory_is_released_after_generate(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from tests.fixtures.tiny_runner import run_tiny, tiny_runner

    runner = tiny_runner(tiny_checkpoint, tmp_path)
    runner.pipe.to("cuda")
    runner.device = "cuda"
    idle = torch.cuda.memory_reserved()
    run_tiny(runner, width=512, height=512, steps=2)
    assert torch.cuda.memory_reserved() <= idle + 64 * 2**20, "activations were released"
