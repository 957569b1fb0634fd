"""Restarting nats-server mid-run loses no task: clients reconnect, pulls resume."""

from __future__ import annotations

import pytest

from proto.enums import TaskStatus
from tests.system import SystemFactory

pytestmark = pytest.mark.e2e

BODY = {
    "stable_diffusion_model": "tiny.safetensors",
    "prompt": "x",
    "steps": 8,
    "width": 128,
    "height": 128,
}


@pytest.mark.parametrize("hard", [False, True], ids=["sigterm", "sigkill"])
async def test_tasks_survive_a_nats_restart(make_system: SystemFactory, hard: bool) -> None:
    async with make_system(ack_wait_s=5) as system:
        before = [await system.submit(BODY) for _ in range(3)]
        # The premise: work is under way when the server goes (fails if it never starts).
        await system.task_when(before[0], lambda d: d["status"] != "waiting", timeout_s=120)
        server = system.nats_server
        if hard:
            server.stop_grace_s = 0.0  # straight to SIGKILL
        await server.stop()
        open_then = [doc for t in before if (doc := await system.task(t)) is not None]
        assert any(not TaskStatus(doc["status"]).terminal for doc in open_then), (
            "every task had finished before the restart: it tested nothing"
        )
        await server.start()  # same port, same JetStream store
        after = [await system.submit(BODY) for _ in range(2)]

        done = await system.all_finished(before + after, timeout_s=240)
        assert ["succeeded"] * 5 == [d["status"] for d in done], [d["message"] for d in done]
