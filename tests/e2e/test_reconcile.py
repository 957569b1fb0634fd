"""A gateway that dies between storing a task and publishing it strands nothing: the
reconciler publishes the stored command and the task runs to the end."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest

from proto.codec import encode
from proto.commands import Txt2ImgTask
from proto.requests import Txt2ImgRequest, to_builtins
from services.storage.models import ModelStore
from tests.documents import task_document
from tests.system import System, SystemFactory

pytestmark = pytest.mark.e2e


@pytest.fixture
async def system(make_system: SystemFactory) -> AsyncIterator[System]:
    async with make_system(reconcile_interval_s=0.5, reconcile_grace_s=1.0) as system:
        yield system


async def test_a_task_stored_but_never_published_still_runs(system: System) -> None:
    model = await ModelStore(system.db).get("tiny.safetensors")
    assert model is not None
    task_id = secrets.token_hex(12)
    request = Txt2ImgRequest(
        prompt="x", steps=2, width=64, height=64, stable_diffusion_model=model["name"]
    )
    command = Txt2ImgTask(
        task_id=task_id,
        user="default",
        model_name=model["name"],
        model_key=model["model_key"],
        request=request,
    )
    # What the gateway had written when it died: the document, no publish.
    await system.db["tasks"].insert_one(
        task_document(
            task_id,
            user="default",
            model_name=model["name"],
            model_key=model["model_key"],
            total_steps=2,
            command=encode(command),
        )
    )
    done = await system.succeeded(task_id)
    assert done["stream_seq"] is not None
    async with system.http.get(f"{system.url}/tasks/{task_id}/result") as response:
        result = await response.json()
    assert 1 == len(result["images"])
    assert to_builtins(request) == result["parameters"], "echoed from the stored command"
