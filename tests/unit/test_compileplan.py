"""What a compiled UNet compiles (services/inference/compileplan.py): static batch buckets,
sizes from ``SDSWARM_COMPILE_SIZES`` or the family, where the caches go, and how its status
travels in the worker's liveness record."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from proto.codec import encode
from proto.workers import (
    CompileState,
    CompileStatus,
    WorkerState,
    WorkerStatus,
    decode_worker_status,
)
from services.inference.compileplan import (
    Shape,
    native_size,
    parse_sizes,
    persist_caches,
    plan,
    unet_batches,
)
from services.statuscli import compile_text


@pytest.mark.parametrize(
    ("max_batch", "expected"),
    [(1, [2]), (2, [2, 4]), (3, [2, 4, 6]), (6, [2, 4, 8, 12]), (8, [2, 4, 8, 16]), (0, [2])],
)
def test_buckets_are_powers_of_two_rows_and_max_batch_with_guidance(
    max_batch: int, expected: list[int]
) -> None:
    assert expected == unet_batches(max_batch)


def test_sizes_are_width_by_height_in_pixels() -> None:
    assert [(512, 512), (768, 512)] == parse_sizes(" 512x512, 768X512,,512x512")
    assert [] == parse_sizes("")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("512", "is not WIDTHxHEIGHT"),
        ("512x", "is not WIDTHxHEIGHT"),
        ("500x512", "divisible by 8 and at least 8 but are 500 and 512"),
        ("0x512", "at least 8"),
    ],
)
def test_a_wrong_size_says_what_is_expected(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_sizes(text)


@pytest.mark.parametrize(
    ("base", "prediction_type", "side"),
    [
        ("sd1", "epsilon", 512),
        ("sd2", "epsilon", 512),
        ("sd2", "v_prediction", 768),
        ("sdxl", "epsilon", 1024),
    ],
)
def test_the_default_size_is_the_familys_native_one(
    base: str, prediction_type: str, side: int
) -> None:
    assert (side, side) == native_size(base, prediction_type)
    assert [Shape(2, side, side)] == plan(1, "", base, prediction_type)


def test_the_plan_puts_a_single_task_at_the_first_size_first() -> None:
    shapes = plan(2, "512x768,640x640", "sd1")
    assert ["2@512x768", "4@512x768", "2@640x640", "4@640x640"] == [s.label for s in shapes]


def test_caches_go_under_the_cache_dir_per_torch_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "restored after the test")
    monkeypatch.setenv("TRITON_CACHE_DIR", "restored after the test")
    root = persist_caches(tmp_path, "2.14.1+cu130")
    assert tmp_path.resolve() / "compile" / "torch-2.14.1+cu130" == root
    assert str(root / "inductor") == os.environ["TORCHINDUCTOR_CACHE_DIR"]
    assert str(root / "triton") == os.environ["TRITON_CACHE_DIR"]


def _record(compile: CompileStatus | None = None) -> WorkerStatus:
    return WorkerStatus(
        worker="w1", model_key="k", model_name="m", state=WorkerState.READY, compile=compile
    )


def test_the_compile_status_travels_in_the_liveness_record() -> None:
    status = CompileStatus(
        state=CompileState.COMPILING, ready=["2@512x512"], pending=1, seconds=41.5
    )
    assert status == decode_worker_status(encode(_record(compile=status))).compile
    assert b'"compile"' not in encode(_record()), "omitted when off"
    older = {"worker": "w", "model_key": "k", "model_name": "m", "state": "ready"}
    assert None is decode_worker_status(msgspec.json.encode(older)).compile


def test_status_shows_each_workers_compile() -> None:
    compiling = CompileStatus(
        state=CompileState.COMPILING, ready=["2@512x512"], pending=3, seconds=41.54
    )
    failed = CompileStatus(state=CompileState.FAILED, seconds=2, error="no C++ compiler")
    assert "w1 compiling 1/4 shapes ready (2@512x512), 41.5 s" == compile_text(
        _record(compile=compiling)
    )
    assert "w1 failed 0 shapes ready, 2.0 s: no C++ compiler" == compile_text(
        _record(compile=failed)
    )
    assert None is compile_text(_record())
