"""Restarting nats-server mid-run loses no task: clients reconnect, pulls resume."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from proto.enums import TaskStatus
from tests.e2e.gateways import extra_gateway
from tests.system import System, SystemFactory
from tests.waiting import until_read

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


async def test_a_gateway_back_on_nats_forgets_what_it_remembered(restartable: System) -> None:
    """Registry and options writes announce themselves on core NATS; one made while a
    gateway was away from NATS is never announced to it, so a gateway forgets what it
    remembered when it reconnects. This one remembers for an hour: only that can make
    it see a write its notice never reached."""
    system = restartable
    async with extra_gateway(system, registry_cache_s=3600) as other:

        async def clip_skip() -> Any:
            async with system.http.get(f"{other}/sdapi/v1/options") as response:
                assert 200 == response.status, await response.text()
                return (await response.json()).get("CLIP_stop_at_last_layers")

        assert 4 != await clip_skip()  # now remembered there
        await system.nats_server.stop()
        # A write whose notice nobody hears (NATS is away), as a replica would make it.
        await system.db["options"].update_one(
            {"_id": "default"}, {"$set": {"data.CLIP_stop_at_last_layers": 4}}, upsert=True
        )
        assert 4 != await clip_skip()
        await system.nats_server.start()

        await until_read(clip_skip, 4, "the gateway forgets on reconnecting", timeout_s=30)
