"""A local worker never outlives the process that started it (no orphans)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.waiting import until

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it has exited for our purpose.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


async def test_worker_exits_when_its_parent_dies(nats_server: Any, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "SDSWARM_NATS_URL": nats_server.url,
        "SDSWARM_MODEL_NAME": "absent.safetensors",
        "SDSWARM_MODEL_KEY": "absent-000000",
        "SDSWARM_CHECKPOINT_PATH": str(tmp_path / "absent.safetensors"),
        "SDSWARM_STORE_DIR": str(tmp_path / "objects"),
        "SDSWARM_CACHE_DIR": str(tmp_path / "cache"),
        "SDSWARM_FETCH_TIMEOUT_S": "0.5",
    }
    # A parent shell that starts the worker, reports its pid and waits for it.
    parent = await asyncio.create_subprocess_exec(
        "sh",
        "-c",
        f'SDSWARM_PARENT_PID=$$ "{sys.executable}" -m services.inference'
        f" >>{tmp_path}/worker.log 2>&1 & echo $!; wait",
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    assert parent.stdout is not None
    worker = int((await parent.stdout.readline()).decode())
    assert _alive(worker)
    # Killed at once, even before the worker has imported torch: it must still notice.
    parent.send_signal(signal.SIGKILL)
    await parent.wait()
    try:
        await until(lambda: not _alive(worker), "the worker gone with its parent", interval_s=0.2)
    finally:
        if _alive(worker):
            os.kill(worker, signal.SIGKILL)
