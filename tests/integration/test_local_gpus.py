"""Local backend: each worker process gets one GPU of the configured list in
``CUDA_VISIBLE_DEVICES``, never one that a live worker holds, and no more workers than GPUs.

The workers are real processes (a stand-in that records its environment and sleeps)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from services.scheduler.local import LocalBackend
from services.scheduler.settings import SchedulerSettings
from tests.integration.scheduling import checkpoint
from tests.waiting import until

RECORD = (
    "import os, sys, time; "
    "open(os.path.join(sys.argv[1], str(os.getpid())), 'w')"
    ".write(os.environ.get('CUDA_VISIBLE_DEVICES', '-')); time.sleep(600)"
)


async def _gpus(folder: Path, pids: list[int]) -> dict[int, str]:
    files = {pid: folder / str(pid) for pid in pids}
    await until(lambda: all(f.exists() and f.read_text() for f in files.values()), "started")
    return {pid: f.read_text() for pid, f in files.items()}


def _model(name: str) -> dict[str, object]:
    return checkpoint(name)


async def test_each_worker_gets_its_own_gpu(tmp_path: Path) -> None:
    settings = SchedulerSettings(gpus=["0", "3"], worker_log_dir=str(tmp_path / "logs"))
    backend = LocalBackend(settings, command=[sys.executable, "-c", RECORD, str(tmp_path)])
    a, b = _model("a.safetensors"), _model("b.safetensors")
    try:
        await backend.ensure(a, 1)
        await backend.ensure(b, 2)  # only one GPU left: one worker, not two
        assert {a["model_key"]: 1, b["model_key"]: 1} == backend.replicas()
        pools = backend._pools
        [pa] = pools[str(a["model_key"])].processes
        [pb] = pools[str(b["model_key"])].processes
        assert {"0", "3"} == set((await _gpus(tmp_path, [pa.pid, pb.pid])).values())
        gpu_a = (await _gpus(tmp_path, [pa.pid]))[pa.pid]
        pa.kill()
        await pa.wait()
        await backend.ensure(b, 2)  # a's GPU is free again: b's second worker takes it
        assert {a["model_key"]: 0, b["model_key"]: 2} == backend.replicas()
        pids = [p.pid for p in pools[str(b["model_key"])].processes]
        gpus = await _gpus(tmp_path, pids)
        assert {"0", "3"} == set(gpus.values())
        assert gpu_a == gpus[pids[1]]
    finally:
        await backend.aclose()


async def test_without_a_gpu_list_nothing_is_pinned(tmp_path: Path) -> None:
    settings = SchedulerSettings(worker_log_dir=str(tmp_path / "logs"))
    backend = LocalBackend(settings, command=[sys.executable, "-c", RECORD, str(tmp_path)])
    model = _model("c.safetensors")
    try:
        await backend.ensure(model, 2)
        pids = [p.pid for p in backend._pools[str(model["model_key"])].processes]
        assert 2 == len(pids)
        gpus = await _gpus(tmp_path, pids)
        inherited = os.environ.get("CUDA_VISIBLE_DEVICES", "-")
        assert {inherited} == set(gpus.values())
    finally:
        await backend.aclose()
