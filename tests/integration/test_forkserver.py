"""The local backend's fork server: workers forked with their imports done, reported like
subprocesses, and gone with the server (a real ``services.inference.zygote``); a script
run in a fork instead (bench/cold_start.py times forked starts so)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from services.common.servers import free_port
from services.scheduler.forkserver import ForkedWorker, ForkServer
from services.scheduler.local import LocalBackend
from services.scheduler.settings import SchedulerSettings
from tests.integration.scheduling import checkpoint
from tests.waiting import until

pytestmark = pytest.mark.integration


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for init to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def _waiting_worker_env(tmp_path: Path) -> dict[str, str]:
    """A worker that starts and keeps trying to reach a NATS server nobody runs."""
    return dict(os.environ) | {
        "SDSWARM_NATS_URL": f"nats://127.0.0.1:{free_port()}",
        "SDSWARM_MODEL_NAME": "tiny.safetensors",
        "SDSWARM_MODEL_KEY": "tiny-000000",
        "SDSWARM_CHECKPOINT_PATH": str(tmp_path / "tiny.safetensors"),
        "SDSWARM_CACHE_DIR": str(tmp_path / "cache"),
        "SDSWARM_DEVICE": "cpu",
    }


async def test_forked_workers_exit_like_subprocesses_and_die_with_the_server(
    tmp_path: Path,
) -> None:
    server = ForkServer()
    log = tmp_path / "worker.log"
    try:
        broken = await server.fork(dict(os.environ), str(log))
        assert 1 == await asyncio.wait_for(broken.wait(), 60)
        assert "invalid setting" in log.read_text()

        waiting = await server.fork(_waiting_worker_env(tmp_path), str(log))
        await asyncio.sleep(0.5)
        assert waiting.returncode is None
        # A fork, not a fresh interpreter: the server's own command line, and its child.
        assert "services.inference.zygote" in _cmdline(waiting.pid)
        assert "services.inference.zygote" in _cmdline(_parent(waiting.pid))
        waiting.kill()
        assert -9 == await asyncio.wait_for(waiting.wait(), 30)

        script = tmp_path / "script.py"
        script.write_text("import sys, torch\nprint('ran', sys.argv[1:])\nsys.exit(3)\n")
        ran = await server.fork(dict(os.environ), str(log), [str(script), "a", "b"])
        assert 3 == await asyncio.wait_for(ran.wait(), 30)
        assert "ran ['a', 'b']" in log.read_text()

        orphan = await server.fork(_waiting_worker_env(tmp_path), str(log))
    finally:
        await server.aclose()
    # The server is gone: the kernel kills what it forked (as for a dead scheduler).
    assert -9 == await asyncio.wait_for(orphan.wait(), 30)
    await until(lambda: not _running(orphan.pid), "the orphan killed", timeout_s=10)


SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


async def test_a_failing_fork_server_leaves_workers_to_fresh_processes(tmp_path: Path) -> None:
    settings = SchedulerSettings(worker_log_dir=str(tmp_path / "logs"))
    backend = LocalBackend(settings, command=SLEEPER)
    backend.forks = ForkServer([sys.executable, "-c", "import sys; sys.exit(3)"])
    model = checkpoint("a.safetensors")
    try:
        await backend.ensure(model, 1)
        assert {model["model_key"]: 1} == backend.replicas()
        assert backend.forks is None
        [process] = backend._pools[str(model["model_key"])].processes
        assert not isinstance(process, ForkedWorker)
    finally:
        await backend.aclose()


async def test_a_stray_line_on_the_protocol_is_skipped() -> None:
    """An import printing to stdout cannot break it (the zygote also sends such output
    to stderr); here a server whose first line is not a message still becomes ready."""
    chatty = "print('hello'); print('{\"ready\": true}', flush=True); input()"
    server = ForkServer([sys.executable, "-c", chatty])
    try:
        await asyncio.wait_for(server.ready(), 30)
    finally:
        await server.aclose()
