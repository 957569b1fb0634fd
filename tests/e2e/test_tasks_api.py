"""Task API beyond the spine: client task ids, queue position, history, per-user isolation."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from aiohttp import web
from PIL import Image

from proto.enums import TaskStatus
from services.common.servers import free_port
from services.gateway.app import create_app
from tests.system import System
from tests.waiting import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("system", ["local"], indirect=True)]

MODEL = "tiny.safetensors"
ALICE, BOB = "alice-key-0123456789", "bob-key-0123456789ab"


async def _submit(
    system: System, url: str | None = None, headers: dict[str, str] | None = None, **fields: Any
) -> tuple[int, dict[str, Any]]:
    body = {
        "stable_diffusion_model": MODEL,
        "prompt": "x",
        "steps": 2,
        "width": 64,
        "height": 64,
        **fields,
    }
    async with system.http.post(
        f"{url or system.url}/txt2img",
        json=body,
        headers={"Request-Type": "async", **(headers or {})},
    ) as response:
        return response.status, await response.json()


async def _wait_done(
    system: System, task_id: str, url: str | None = None, headers: dict[str, str] | None = None
) -> None:
    """Until ``GET /tasks/{id}/result`` (through ``url``, as its caller) says finished."""

    async def finished() -> bool:
        async with system.http.get(
            f"{url or system.url}/tasks/{task_id}/result", headers=headers
        ) as response:
            return bool(TaskStatus((await response.json())["status"]).terminal)

    await eventually(finished, f"task {task_id} finished", timeout_s=120)


async def test_client_chosen_task_ids(system: System) -> None:
    status, body = await _submit(system, headers={"taskId": "my-task_001"})
    assert (202, "my-task_001") == (status, body["taskId"])
    status, body = await _submit(system, headers={"taskId": "my-task_001"})
    assert (409, "task_exists") == (status, body["code"])
    status, body = await _submit(system, headers={"taskId": "../../etc"})
    assert (422, "taskId") == (status, body["field"])
    await _wait_done(system, "my-task_001")


async def test_queue_position_while_waiting(system: System) -> None:
    _, first = await _submit(system, steps=60, width=256, height=256)
    _, second = await _submit(system)
    _, third = await _submit(system)
    positions = []
    for task in (third, second):  # later first: a task starting in between only lowers
        async with system.http.get(f"{system.url}/tasks/{task['taskId']}/progress") as response:
            positions.append((await response.json()).get("queuePosition"))
    assert positions[0] is not None, "the third task cannot have started yet"
    assert 1 <= positions[0] <= 3
    if positions[1] is not None:
        assert positions[1] < positions[0]
    for task in (first, second, third):
        await _wait_done(system, task["taskId"])
    async with system.http.get(f"{system.url}/tasks/{third['taskId']}/progress") as response:
        assert "queuePosition" not in await response.json()


async def test_history_is_filtered_and_paginated(system: System) -> None:
    ids = [(await _submit(system))[1]["taskId"] for _ in range(3)]
    for task_id in ids:
        await _wait_done(system, task_id)
    seen: list[str] = []
    cursor = None
    while True:
        query = {"limit": "2", "status": "succeeded", **({"cursor": cursor} if cursor else {})}
        async with system.http.get(f"{system.url}/tasks", params=query) as response:
            assert 200 == response.status
            page = await response.json()
        assert len(page["tasks"]) <= 2
        seen += [t["taskId"] for t in page["tasks"]]
        assert all(t["status"] == "succeeded" for t in page["tasks"])
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)), "no task twice across pages"
    assert set(ids) <= set(seen)
    async with system.http.get(f"{system.url}/tasks", params={"limit": "0"}) as response:
        assert 422 == response.status
    async with system.http.get(f"{system.url}/tasks", params={"cursor": "!!"}) as response:
        assert 422 == response.status


@pytest.fixture
async def keyed_url(system: System) -> AsyncIterator[str]:
    """A second gateway on the same system with API keys for two users."""
    port = free_port()
    settings = msgspec.structs.replace(
        system.settings, port=port, api_keys=[f"alice:{ALICE}", f"bob:{BOB}"]
    )
    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_users_cannot_see_each_others_tasks(system: System, keyed_url: str) -> None:
    alice = {"Authorization": f"Bearer {ALICE}"}
    bob = {"token": BOB}  # the seed's header works too
    status, body = await _submit(system, url=keyed_url)
    assert (401, "unauthorized") == (status, body["code"])
    status, body = await _submit(system, url=keyed_url, headers=alice)
    assert 202 == status
    task_id = body["taskId"]
    await _wait_done(system, task_id, keyed_url, alice)

    for method, path in [
        ("GET", f"/tasks/{task_id}/result"),
        ("GET", f"/tasks/{task_id}/progress"),
        ("GET", f"/tasks/{task_id}/events"),
        ("POST", f"/tasks/{task_id}/cancellation"),
    ]:
        async with system.http.request(method, keyed_url + path, headers=bob) as response:
            assert (404, "task_not_found") == (response.status, (await response.json())["code"])
        async with system.http.request(method, keyed_url + path, headers=alice) as response:
            assert response.status in (200, 409), (method, path, response.status)
    async with system.http.get(f"{keyed_url}/tasks", headers=bob) as response:
        assert [] == (await response.json())["tasks"]
    async with system.http.get(f"{keyed_url}/tasks/{task_id}/result", headers=alice) as response:
        result = await response.json()
    assert [f"images/alice/{task_id}_1.png"] == result["images"]


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_another_users_task_id_never_answers_with_that_task(
    system: System, keyed_url: str, mode: str
) -> None:
    """The reported leak: Bob names Alice's task id in `taskId` and sends 20 concurrent
    requests with one Idempotency-Key. Before the fix one answer was 409 and the other 19
    were Alice's images with working links (the key was reserved before the insert failed
    and the waiter read the task without its owner)."""
    alice = {"Authorization": f"Bearer {ALICE}"}
    status, body = await _submit(system, url=keyed_url, headers=alice)
    assert 202 == status
    task_id = body["taskId"]
    await _wait_done(system, task_id, keyed_url, alice)
    request = {"stable_diffusion_model": MODEL, "prompt": "x", "steps": 1, "width": 64}
    headers = {
        "Authorization": f"Bearer {BOB}",
        "taskId": task_id,
        "Idempotency-Key": f"steal-{mode}",
        "Request-Type": mode,
    }

    async def attempt() -> tuple[int, str]:
        async with system.http.post(
            f"{keyed_url}/txt2img", json={**request, "height": 64}, headers=headers
        ) as response:
            return response.status, await response.text()

    answers = await asyncio.gather(*(attempt() for _ in range(20)))
    # Client-chosen ids are scoped per user: Alice's id is just a name Bob gives his own
    # task. Every answer is about Bob's one task (or asks him to retry), never Alice's.
    for status, text in answers:
        assert "images/alice" not in text
        assert status in (200, 202, 409), text
        answer = msgspec.json.decode(text)
        if status == 409:
            assert "idempotency_in_flight" == answer["code"], text
        else:
            assert task_id == answer["taskId"], text
    assert any(status != 409 for status, _ in answers)
    bob = {"Authorization": f"Bearer {BOB}"}
    await _wait_done(system, task_id, keyed_url, bob)
    async with system.http.get(f"{keyed_url}/tasks/{task_id}/result", headers=bob) as response:
        assert all(k.startswith("images/bob/") for k in (await response.json())["images"])
    assert 1 == await system.db["tasks"].count_documents({"user": "bob", "client_id": task_id})


async def test_idempotency_keys(system: System) -> None:
    key = {"Idempotency-Key": "order-42"}
    first = await _submit(system, headers=key, prompt="same")
    again = await _submit(system, headers=key, prompt="same")
    assert 202 == first[0]
    assert first[1]["taskId"] == again[1]["taskId"], "a retry gets the same task"
    status, error = await _submit(system, headers=key, prompt="different")
    assert (409, "idempotency_conflict") == (status, error["code"])
    other = await _submit(system, headers={"Idempotency-Key": "order-43"}, prompt="same")
    assert other[1]["taskId"] != first[1]["taskId"]
    # A request refused before queueing does not burn its key.
    status, _ = await _submit(
        system, headers={"Idempotency-Key": "k3"}, stable_diffusion_model="missing.safetensors"
    )
    assert 404 == status
    status, ok = await _submit(system, headers={"Idempotency-Key": "k3"})
    assert 202 == status
    assert 1 == await system.db["tasks"].count_documents({"_id": first[1]["taskId"]})
    for task_id in (first[1]["taskId"], other[1]["taskId"], ok["taskId"]):
        await _wait_done(system, task_id)


async def test_a_sync_answer_and_the_result_route_agree(system: System) -> None:
    """The sink folds the end of a task into MongoDB after the event: a sync answer still
    never runs ahead of ``GET /tasks/{id}/result``."""
    body = {"stable_diffusion_model": MODEL, "prompt": "x", "steps": 1, "width": 64, "height": 64}
    for _ in range(20):
        async with system.http.post(f"{system.url}/txt2img", json=body) as response:
            assert 200 == response.status, await response.text()
            answer = await response.json()
        async with system.http.get(f"{system.url}/tasks/{answer['taskId']}/result") as response:
            result = await response.json()
        assert ("succeeded", "succeeded") == (answer["status"], result["status"])
        assert answer["images"] == result["images"]


def _png_base64(size: tuple[int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 40, 90)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


_CHECKPOINT = {"override_settings": {"sd_model_checkpoint": MODEL}}
_GENERATE = {"prompt": "x", "steps": 1, "width": 64, "height": 64, **_CHECKPOINT}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/extra_images", {"image": _png_base64((16, 16)), "upscaler_1": "Nearest"}),
        ("/sdapi/v1/extra-single-image", {"image": _png_base64((16, 16)), "upscaler_1": "Nearest"}),
        (
            "/sdapi/v1/extra-batch-images",
            {"imageList": [{"data": _png_base64((16, 16)), "name": "a"}], "upscaler_1": "Nearest"},
        ),
        ("/sdapi/v1/txt2img", _GENERATE),
        (
            "/sdapi/v1/img2img",
            # 2 steps at strength 0.5: one runs (img2img with 0 steps to run fails).
            {
                **_GENERATE,
                "steps": 2,
                "denoising_strength": 0.5,
                "init_images": [_png_base64((8, 8))],
            },
        ),
    ],
)
async def test_idempotency_keys_on_every_submitting_route(
    system: System, path: str, body: dict[str, Any]
) -> None:
    """Same key and body → the same task (async and sync); another body → 409."""
    url = system.url + path
    before = await system.db["tasks"].count_documents({})
    ids: dict[str, list[str]] = {}
    for mode in ("async", "sync"):
        headers = {"Idempotency-Key": f"{path}-{mode}", "Request-Type": mode}
        for _ in range(2):
            async with system.http.post(url, json=body, headers=headers) as response:
                assert response.status == (202 if mode == "async" else 200), await response.text()
                ids.setdefault(mode, []).append(response.headers["taskId"])
        other = {**body, "upscaling_resize": 3} if "extra" in path else {**body, "prompt": "y"}
        async with system.http.post(url, json=other, headers=headers) as response:
            error = await response.json()
            assert (409, "idempotency_conflict") == (response.status, error["code"])
            assert "Idempotency-Key" == error["field"]
    assert ids["async"][0] == ids["async"][1], "a retry gets the same task"
    assert ids["sync"][0] == ids["sync"][1], "a retry gets the same task"
    assert ids["async"][0] != ids["sync"][0]
    assert before + 2 == await system.db["tasks"].count_documents({})
    await _wait_done(system, ids["async"][0])


async def _sse_task_ids(
    system: System, url: str, task_id: str, headers: dict[str, str]
) -> set[str]:
    seen: set[str] = set()
    async with system.http.get(f"{url}/tasks/{task_id}/events", headers=headers) as response:
        assert 200 == response.status
        async for raw in response.content:
            line = raw.decode()
            if line.startswith("data: "):
                data = msgspec.json.decode(line[6:])
                seen.add(data["task_id"])
                if data["kind"] in ("succeeded", "failed", "cancelled"):
                    break
    return seen


async def test_client_chosen_ids_are_scoped_per_user(system: System, keyed_url: str) -> None:
    """Issue 15 item 8: a chosen id taken by another user was a 409 `task_exists` (an
    oracle, and ids could be squatted). Now each user's chosen ids are their own: the
    same id works for both, each sees only their own task under it, everywhere."""
    alice = {"Authorization": f"Bearer {ALICE}"}
    bob = {"Authorization": f"Bearer {BOB}"}
    status, body = await _submit(system, url=keyed_url, headers=alice)
    assert 202 == status
    generated = body["taskId"]
    for who in (alice, bob):
        status, body = await _submit(system, url=keyed_url, headers={**who, "taskId": "shared"})
        assert (202, "shared") == (status, body["taskId"]), body
    # Bob names Alice's generated id: his own task, no collision, nothing revealed.
    status, body = await _submit(system, url=keyed_url, headers={**bob, "taskId": generated})
    assert (202, generated) == (status, body["taskId"]), body
    # The owner's reuse of an id stays the seed's 409, for a chosen or a generated one.
    for taken in ("shared", generated):
        status, body = await _submit(system, url=keyed_url, headers={**alice, "taskId": taken})
        assert (409, "task_exists", "taskId") == (status, body["code"], body["field"])
    # A1111's force_task_id is scoped the same way.
    async with system.http.post(
        f"{keyed_url}/sdapi/v1/txt2img",
        json={**_GENERATE, "force_task_id": "shared"},
        headers={**bob, "Request-Type": "async"},
    ) as response:
        assert (409, "task_exists") == (response.status, (await response.json())["code"])
    async with system.http.post(
        f"{keyed_url}/sdapi/v1/txt2img",
        json={**_GENERATE, "force_task_id": generated + "-a1111"},
        headers={**alice, "Request-Type": "async"},
    ) as response:
        assert 202 == response.status
        assert generated + "-a1111" == response.headers["taskId"]

    for who, user in ((alice, "alice"), (bob, "bob")):
        for task_id in ("shared", generated):
            await _wait_done(system, task_id, keyed_url, who)
            async with system.http.get(
                f"{keyed_url}/tasks/{task_id}/result", headers=who
            ) as response:
                result = await response.json()
            assert (200, task_id, "succeeded") == (
                response.status,
                result["taskId"],
                result["status"],
            )
            assert [f"images/{user}/"] == [k[: len(user) + 8] for k in result["images"]]
            async with system.http.get(
                f"{keyed_url}/tasks/{task_id}/progress", headers=who
            ) as response:
                assert task_id == (await response.json())["taskId"]
            assert {task_id} == await _sse_task_ids(system, keyed_url, task_id, who)
            async with system.http.post(
                f"{keyed_url}/tasks/{task_id}/cancellation", headers=who
            ) as response:
                assert (409, "task_finished") == (response.status, (await response.json())["code"])
        async with system.http.get(f"{keyed_url}/tasks", headers=who) as response:
            listed = [t["taskId"] for t in (await response.json())["tasks"]]
        assert {"shared", generated} <= set(listed)
        assert len(listed) == len(set(listed))
    await _wait_done(system, generated + "-a1111", keyed_url, alice)
    # Stored apart: two documents named "shared", one per owner, neither with that _id.
    shared = await system.db["tasks"].find({"client_id": "shared"}).to_list()
    assert ["alice", "bob"] == sorted(d["user"] for d in shared)
    assert "shared" not in {d["_id"] for d in shared}
