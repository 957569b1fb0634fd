"""``SDSWARM_COMPILE`` with the real inductor on the CPU, the tiny checkpoint, one bucket and
one small size (each cold compile takes ~45 s here, so there is exactly one): two worker
processes share a cache dir (tests/fixtures/compiled_worker.py).

The first compiles cold in the background; a task at the planned shape afterwards runs
compiled and compiles nothing (the dummy inputs matched the real calls' guards). The second
finds the graph in the persisted caches. Compiled and eager images agree within
:data:`TOLERANCE`. No timing is asserted (tests/gpu/test_compile.py does, on CUDA)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

TOLERANCE = 2
"""Grey levels (of 255): inductor fuses and reorders float32 arithmetic, so compiled and
eager images differ by rounding only (1 level measured); a wrong graph differs by far more."""


def compiled_worker(checkpoint: Path, cache_dir: Path, device: str = "cpu") -> dict[str, Any]:
    """One worker process's report (tests/fixtures/compiled_worker.py)."""
    environ = {
        name: value
        for name, value in os.environ.items()
        if name not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
    }
    child = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fixtures.compiled_worker",
            str(checkpoint),
            str(cache_dir),
            device,
        ],
        capture_output=True,
        text=True,
        env=environ | {"HF_HUB_OFFLINE": "1"},
        timeout=540,
    )
    assert 0 == child.returncode, child.stderr[-4000:]
    report: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    return report


def test_a_second_process_compiles_from_the_persisted_cache(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    first = compiled_worker(tiny_checkpoint, tmp_path)
    assert {"state": "ready", "ready": ["2@64x64"]} == {
        key: first["status"].get(key) for key in ("state", "ready")
    }
    assert 3 == first["compiled_calls"], "each of the 3 steps ran the compiled graph"
    assert 0 == first["graphs_compiled_by_the_task"], "the background compile's graph served"
    assert first["fxgraph_cache_miss"] > 0, "cold: nothing in the cache yet"
    assert first["max_difference"] <= TOLERANCE
    assert list((tmp_path / "compile").glob("torch-*/inductor/*")), "persisted under cache_dir"

    second = compiled_worker(tiny_checkpoint, tmp_path)
    assert "ready" == second["status"]["state"]
    assert second["fxgraph_cache_hit"] > 0
    assert (0, 0) == (second["fxgraph_cache_miss"], second["autograd_cache_miss"])
    assert 3 == second["compiled_calls"]
    assert 0 == second["graphs_compiled_by_the_task"]
    assert second["max_difference"] <= TOLERANCE
