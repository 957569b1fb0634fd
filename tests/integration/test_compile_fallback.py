"""``SDSWARM_COMPILE``: a compilation that fails falls back to eager with a logged reason
and never fails a task (the worker's own factory, the tiny checkpoint on the CPU, a fake
``torch.compile``; tests/integration/test_compile_cache.py runs the real one)."""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402

from proto.workers import CompileState  # noqa: E402
from services.inference.__main__ import make_pipeline_factory  # noqa: E402
from services.inference.coldstart import PHASES, Phases  # noqa: E402
from services.inference.pipeline import DiffusersPipeline  # noqa: E402
from services.inference.settings import WorkerSettings  # noqa: E402
from tests.fixtures.tiny_runner import run_tiny  # noqa: E402

pytestmark = pytest.mark.integration


def _runner(checkpoint: Path, cache: Path, phases: Phases | None = None, **options: Any) -> Any:
    settings = WorkerSettings(
        model_name="tiny.safetensors",
        model_key="tiny-000000",
        checkpoint_path=str(checkpoint),
        cache_dir=str(cache),
        device="cpu",
        cpu_threads=torch.get_num_threads(),  # as it was: this is the test's own process
        **options,
    )
    runner = make_pipeline_factory(settings, phases)()
    assert isinstance(runner, DiffusersPipeline)
    return runner


def _pixels(runner: DiffusersPipeline) -> bytes:
    return Image.open(io.BytesIO(run_tiny(runner).images[0])).tobytes()


class CompileFailed(RuntimeError):
    pass


def test_a_compile_failing_in_the_background_leaves_the_worker_eager(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    eager = _pixels(_runner(tiny_checkpoint, tmp_path, warmup_px=0))
    calls: list[str] = []

    def lazy_failure(fn: Any, **options: Any) -> Any:
        calls.append(options.get("backend", ""))

        def compiled(*args: Any, **kwargs: Any) -> Any:
            raise CompileFailed("inductor: no C++ compiler here")

        return compiled

    monkeypatch.setattr(torch, "compile", lazy_failure)
    with caplog.at_level(logging.WARNING, logger="services.inference.compiled"):
        runner = _runner(
            tiny_checkpoint, tmp_path, compile=True, compile_sizes="64x64", warmup_px=0
        )
        assert runner.compiled is not None
        assert CompileState.FAILED == runner.compiled.wait(60)
    assert ["inductor"] == calls
    status = runner.compile_status()
    assert status is not None
    assert "CompileFailed: inductor: no C++ compiler here" in status.error
    assert "compiling the UNet for 2@64x64 failed" in caplog.text
    assert eager == _pixels(runner), "the task ran eagerly: the same image"
    assert 0 == runner.compiled.compiled_calls


def test_a_compile_failing_at_once_serves_eagerly(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    def refuse(fn: Any, **options: Any) -> Any:
        raise CompileFailed("dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", refuse)
    phases = Phases(time.time())
    with caplog.at_level(logging.WARNING, logger="services.inference.compiled"):
        runner = _runner(tiny_checkpoint, tmp_path, phases, compile=True)
    assert "dynamo is not supported" in caplog.text
    assert not hasattr(runner.pipe.unet, "sdswarm_compiled"), "the UNet as loaded"
    status = runner.compile_status()
    assert status is not None
    assert CompileState.FAILED == status.state
    assert 64 * 64 * 3 == len(_pixels(runner))
    assert list(PHASES) == list(phases.seconds()), "every phase measured, warm-up included"
