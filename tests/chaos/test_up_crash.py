"""``sdswarm up`` killed -9 and started again (issue 15, item 6).

The real command, as a user runs it: after a kill -9 its nats-server, its MongoDB-wire
server and its workers must be gone (they used to run on as orphans, and the next ``up``
failed on "address in use" and a locked store); the next ``up`` on the same data dir and
ports starts, and the tasks accepted before the crash all finish. A second ``up`` on a
taken NATS port, or on a data dir in use, fails at once with a clear message instead of
joining the other instance's NATS.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from services.common.servers import free_ports
from tests.procs import processes

pytestmark = pytest.mark.chaos
REPO = Path(__file__).resolve().parents[2]
BODY = {
    "stable_diffusion_model": "tiny.safetensors",
    "prompt": "after a crash",
    "steps": 2,
    "width": 64,
    "height": 64,
}


@dataclass
class Up:
    """One ``sdswarm up`` process."""

    process: asyncio.subprocess.Process
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]


async def start_up(data: Path, models: Path, port: int, nats_port: int, log: Path) -> Up:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SDSWARM_ACK_WAIT_S": "10"}
    with log.open("ab") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli", "up",
            "--data-dir", str(data), "--models-dir", str(models),
            "--port", str(port), "--nats-port", str(nats_port), "--device", "cpu",
            cwd=REPO, env=env, stdout=out, stderr=out, stdin=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
    return Up(process, f"http://127.0.0.1:{port}", log)


async def ready(up: Up, http: aiohttp.ClientSession, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if up.process.returncode is not None:
            raise AssertionError(f"sdswarm up exited {up.process.returncode}:\n{up.output()}")
        try:
            async with http.get(f"{up.url}/healthz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.5)
    raise AssertionError(f"sdswarm up not ready in {timeout_s} s:\n{up.output()}")


def descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid`` (pid → command name)."""
    table = list(processes())
    children: dict[int, list[int]] = {}
    for proc in table:
        children.setdefault(proc.ppid, []).append(proc.pid)
    names = {proc.pid: proc.name for proc in table}
    found: dict[int, str] = {}
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found[child] = names[child]
        todo.extend(children.get(child, []))
    return found


def alive(pids: dict[int, str]) -> dict[int, str]:
    """Those of ``pids`` still running (zombies are dead)."""
    return {p.pid: p.name for p in processes() if p.pid in pids and p.state != "Z"}


async def until_gone(pids: dict[int, str], timeout_s: float = 30) -> dict[int, str]:
    for _ in range(int(timeout_s / 0.2)):
        if not alive(pids):
            break
        await asyncio.sleep(0.2)
    return alive(pids)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def models(tmp_path: Path, tiny_checkpoint: Path) -> Path:
    root = tmp_path / "models"
    (root / "Stable-diffusion").mkdir(parents=True)
    shutil.copy(tiny_checkpoint, root / "Stable-diffusion" / "tiny.safetensors")
    # A malformed LoRA (issue 15, item 7) used to stop `up` at start with an AttributeError.
    header = b'{"__metadata__": "x"}'
    (root / "Lora").mkdir()
    (root / "Lora" / "bad.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    return root


async def test_kill_9_of_up_then_restart_loses_nothing(
    tmp_path: Path, models: Path, http: aiohttp.ClientSession
) -> None:
    data = tmp_path / "data"
    port, nats_port, other_port, other_nats = free_ports(4)
    first = await start_up(data, models, port, nats_port, tmp_path / "up-1.log")
    started: list[Up] = [first]
    try:
        await ready(first, http)
        async with http.get(f"{first.url}/models/bad", params={"type": "lora"}) as response:
            assert "failed" == (await response.json())["status"]

        # A second `up` on the taken NATS port fails clearly, and joins nothing.
        second = await start_up(
            tmp_path / "other", models, other_port, nats_port, tmp_path / "up-2.log"
        )
        started.append(second)
        code = await asyncio.wait_for(second.process.wait(), 120)
        assert 0 != code, second.output()
        assert f"NATS port {nats_port}" in second.output()
        assert "already in use" in second.output()
        # And a second `up` on a data dir in use is refused before it touches the stores.
        third = await start_up(data, models, other_port, other_nats, tmp_path / "up-3.log")
        started.append(third)
        assert 0 != await asyncio.wait_for(third.process.wait(), 120), third.output()
        assert "is in use by another sdswarm up" in third.output()

        task_ids = []
        for _ in range(3):
            async with http.post(
                f"{first.url}/txt2img", json=BODY, headers={"Request-Type": "async"}
            ) as response:
                assert 202 == response.status, await response.text()
                task_ids.append((await response.json())["taskId"])
        children: dict[int, str] = {}
        for _ in range(100):  # until the scheduler has started a worker for the tasks
            children = descendants(first.process.pid)
            if len(children) > 2:
                break
            await asyncio.sleep(0.2)
        print(f"\nchildren of sdswarm up at the kill: {sorted(children.values())}")
        assert {"nats-server", "secantusd-py"} < set(children.values()), children

        first.process.send_signal(signal.SIGKILL)
        await first.process.wait()
        left = await until_gone(children)
        assert {} == left, f"children outlived sdswarm up's kill -9: {left}"

        again = await start_up(data, models, port, nats_port, tmp_path / "up-4.log")
        started.append(again)
        await ready(again, http)
        deadline = time.monotonic() + 300
        statuses: dict[str, str] = {}
        while time.monotonic() < deadline:
            for task_id in task_ids:
                async with http.get(f"{again.url}/tasks/{task_id}/result") as response:
                    assert 200 == response.status, f"task {task_id} lost: {await response.text()}"
                    statuses[task_id] = (await response.json())["status"]
            if all(s in ("succeeded", "failed", "cancelled") for s in statuses.values()):
                break
            await asyncio.sleep(1)
        assert {t: "succeeded" for t in task_ids} == statuses, again.output()

        children = descendants(again.process.pid)
        again.process.send_signal(signal.SIGTERM)
        assert 0 == await asyncio.wait_for(again.process.wait(), 120), again.output()
        assert {} == await until_gone(children), "a clean stop leaves nothing either"
    finally:
        for up in started:
            if up.process.returncode is None:
                up.process.kill()
                await up.process.wait()
