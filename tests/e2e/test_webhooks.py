"""Webhooks end to end: signed deliveries of the events asked for, retried with the same
delivery id, failures listed for their owner, and refused URLs cost nothing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from standardwebhooks import Webhook, WebhookVerificationError

from services.common.servers import free_port
from tests.system import System, SystemFactory
from tests.waiting import eventually, until

pytestmark = pytest.mark.e2e
BODY = {
    "stable_diffusion_model": "tiny.safetensors",
    "prompt": "x",
    "steps": 2,
    "width": 64,
    "height": 64,
}


@dataclass
class Receiver:
    url: str
    deliveries: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    fail_first: dict[str, int] = field(default_factory=dict)
    """Answer 500 to the first n deliveries of an event type."""


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    port = free_port()
    state = Receiver(url=f"http://127.0.0.1:{port}")

    async def hook(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        state.deliveries.append((dict(request.headers), body))
        kind = json.loads(body)["type"]
        if request.path == "/broken" or state.fail_first.get(kind, 0) > 0:
            state.fail_first[kind] = state.fail_first.get(kind, 0) - 1
            return web.Response(status=500)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/{tail:.*}", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield state
    await runner.cleanup()


@pytest.fixture(scope="module")
async def system(make_system: SystemFactory) -> AsyncIterator[System]:
    # One system for the module: each test has its own receiver and its own tasks.
    async with make_system(
        webhook_allow_hosts=["127.0.0.1:*"],
        webhook_allow_http=True,  # a loopback receiver: the operator's explicit opt-ins
        webhook_allow_private=True,
        webhook_backoff_s=[0.2],
        webhook_max_attempts=3,
    ) as system:
        yield system


def _verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """Checked by the Standard Webhooks reference library, not a second copy of ours."""
    try:
        Webhook(secret).verify(body, headers)
    except WebhookVerificationError:
        return False
    return True


async def test_signed_deliveries_with_retries(system: System, receiver: Receiver) -> None:
    receiver.fail_first["task.succeeded"] = 1
    hook = {"url": f"{receiver.url}/hooks/sd", "events": ["started", "completed"]}
    task_id = await system.submit({**BODY, "webhook": hook})
    await until(
        lambda: sum(1 for _, b in receiver.deliveries if b"task.succeeded" in b) == 2,
        "a delivery and its retry",
    )
    async with system.http.get(f"{system.url}/webhooks/secret") as response:
        secret = (await response.json())["secret"]
    kinds = [json.loads(body)["type"] for _, body in receiver.deliveries]
    assert ["task.started", "task.succeeded", "task.succeeded"] == kinds, "no progress asked"
    assert all(_verify(secret, headers, body) for headers, body in receiver.deliveries)
    first, retry = [h for h, b in receiver.deliveries if b"task.succeeded" in b]
    assert first["webhook-id"] == retry["webhook-id"], "a retry is the same delivery"
    data = json.loads(receiver.deliveries[-1][1])["data"]
    assert (task_id, [f"images/default/{task_id}_1.png"]) == (data["taskId"], data["images"])


async def test_a_chosen_task_id_is_the_one_delivered(system: System, receiver: Receiver) -> None:
    """Ids clients choose are stored under an internal id; the hook names the chosen one."""
    hook = {"url": f"{receiver.url}/hooks/chosen", "events": ["completed"]}
    chosen = await system.submit({**BODY, "webhook": hook}, headers={"taskId": "my-order-7"})
    assert "my-order-7" == chosen
    await until(lambda: any(b"my-order-7" in b for _, b in receiver.deliveries), "delivery")
    data = next(json.loads(b)["data"] for _, b in receiver.deliveries if b"my-order-7" in b)
    assert "my-order-7" == data["taskId"]


async def test_a_receiver_that_keeps_failing_is_listed(system: System, receiver: Receiver) -> None:
    task_id = await system.submit({**BODY, "webhook": {"url": f"{receiver.url}/broken"}})

    async def listed() -> list[dict[str, Any]]:
        async with system.http.get(f"{system.url}/webhooks/failures") as response:
            return [f for f in await response.json() if f["taskId"] == task_id]

    failures = await eventually(listed, "the failed delivery recorded")
    assert ("succeeded", 3) == (failures[0]["event"], failures[0]["attempts"])
    assert "500" in failures[0]["error"]
    assert 3 == sum(
        1 for h, _ in receiver.deliveries if h.get("webhook-id") == failures[0]["deliveryId"]
    )


@pytest.mark.parametrize(
    "url", ["https://hooks.elsewhere.test/x", "http://127.0.0.1:1/../x?" + "a" * 3000, "nope"]
)
async def test_refused_callback_urls_create_nothing(system: System, url: str) -> None:
    async with system.http.post(
        f"{system.url}/txt2img",
        json={**BODY, "webhook": {"url": url}},
        headers={"Request-Type": "async", "taskId": "refused-hook"},
    ) as response:
        body = await response.json()
        assert 422 == response.status, body
    assert "webhook.url" in body.get("field", "") or "webhook" in body["message"]
    assert await system.task("refused-hook") is None
