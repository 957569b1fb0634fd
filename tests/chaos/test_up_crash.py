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
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from proto.enums import TaskStatus
from services.common.servers import free_ports
from tests.procs import processes
from tests.waiting import eventually, serving, until

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
    try:
        await serving(http, up.url, up.process, timeout_s)
    except AssertionError as exc:
        raise AssertionError(f"sdswarm up: {exc}\n{up.output()}") from exc


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


async def until_gone(pids: dict[int, str], what: str, timeout_s: float = 30) -> None:
    await until(lambda: not alive(pids), what, timeout_s=timeout_s, interval_s=0.2)


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

        async def with_a_worker() -> dict[int, str] | None:
            children = descendants(first.process.pid)
            return children if len(children) > 2 else None

        children = await eventually(with_a_worker, "a worker started for the tasks", timeout_s=60)
        print(f"\nchildren of sdswarm up at the kill: {sorted(children.values())}")
        assert {"nats-server", "secantusd-py"} < set(children.values()), children

        first.process.send_signal(signal.SIGKILL)
        await first.process.wait()
        await until_gone(children, f"no child of {children} outliving sdswarm up's kill -9")

        again = await start_up(data, models, port, nats_port, tmp_path / "up-4.log")
        started.append(again)
        await ready(again, http)

        async def finished() -> dict[str, str] | None:
            statuses: dict[str, str] = {}
            for task_id in task_ids:
                async with http.get(f"{again.url}/tasks/{task_id}/result") as response:
                    assert 200 == response.status, f"task {task_id} lost: {await response.text()}"
                    statuses[task_id] = (await response.json())["status"]
            done = all(TaskStatus(s).terminal for s in statuses.values())
            return statuses if done else None

        statuses = await eventually(finished, "every task finished", timeout_s=300, interval_s=1)
        assert {t: "succeeded" for t in task_ids} == statuses, again.output()

        children = descendants(again.process.pid)
        again.process.send_signal(signal.SIGTERM)
        assert 0 == await asyncio.wait_for(again.process.wait(), 120), again.output()
        await until_gone(children, "nothing left after a clean stop either")
    finally:
        for up in started:
            if up.process.returncode is None:
                up.process.kill()
                await up.process.wait()
