"""Restarting nats-server mid-run loses no task: clients reconnect, pulls resume."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from proto.enums import TaskStatus
from tests.system import System, SystemFactory

pytestmark = pytest.mark.e2e

BODY = {
    "stable_diffusion_model": "tiny.safetensors",
    "prompt": "x",
    "steps": 8,
    "width": 128,
    "height": 128,
}


@pytest.fixture(scope="module")
async def restartable(make_system: SystemFactory) -> AsyncIterator[System]:
    # One system for both restarts: the second meets a system that survived the first.
    async with make_system(ack_wait_s=5) as system:
        yield system


@pytest.mark.parametrize("hard", [False, True], ids=["sigterm", "sigkill"])
async def test_tasks_survive_a_nats_restart(restartable: System, hard: bool) -> None:
    system = restartable
    before = [await system.submit(BODY) for _ in range(3)]
    # The premise: work is under way when the server goes (fails if it never starts).
    await system.task_when(before[0], lambda d: d["status"] != "waiting", timeout_s=120)
    server = system.nats_server
    server.stop_grace_s = 0.0 if hard else type(server).stop_grace_s  # SIGKILL, or a clean stop
    await server.stop()
    open_then = [doc for t in before if (doc := await system.task(t)) is not None]
    assert any(not TaskStatus(doc["status"]).terminal for doc in open_then), (
        "every task had finished before the restart: it tested nothing"
    )
    await server.start()  # same port, same JetStream store
    after = [await system.submit(BODY) for _ in range(2)]

    done = await system.all_finished(before + after, timeout_s=240)
    assert ["succeeded"] * 5 == [d["status"] for d in done], [d["message"] for d in done]
