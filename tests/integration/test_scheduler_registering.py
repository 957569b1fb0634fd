"""No worker is started from the record of a checkpoint still being registered for the
first time: it describes no file yet, and a worker started from it would report no model
hash for as long as it lives. A scheduler's tick may list the models just before an upload
ends and see the task that came after it; the next tick starts the worker from the
finished record. Real nats-server and MongoDB; the local backend starts a stand-in worker
that writes down the hash it was given."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest

from proto import ModelStatus, ModelType
from tests.integration.scheduling import (
    checkpoint,
    scheduler_settings,
    scheduling_a_task,
    stand_in_worker,
)

pytestmark = pytest.mark.integration

RECORDING_WORKER = """
import json, os, sys, time
out = os.path.join(os.environ["RECORDS"], str(os.getpid()))
with open(out, "w") as f:
    json.dump({k: os.environ.get(k, "") for k in ("SDSWARM_MODEL_HASH", "SDSWARM_MODEL_MTIME")}, f)
time.sleep(60)
"""


async def test_a_checkpoint_being_registered_gets_its_worker_from_the_finished_record(
    private_nats_url: str,
    mongo_server: Any,
    fresh_db: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    records = tmp_path / "records"
    records.mkdir()
    monkeypatch.setenv("RECORDS", str(records))
    command = stand_in_worker(tmp_path, "recording_worker", RECORDING_WORKER)
    settings = scheduler_settings(private_nats_url, mongo_server.url, fresh_db, tmp_path)
    async with contextlib.AsyncExitStack() as stack:
        model = checkpoint("new.safetensors")
        model |= {"status": ModelStatus.REGISTERING.value, "sha256": None}
        key = model["model_key"]
        # A task that wants a worker.
        on = await scheduling_a_task(stack, settings, fresh_db, model, command)
        scheduler, backend, models = on.scheduler, on.backend, on.models

        plan = await scheduler.tick()
        assert 1 == plan.workers[key], "the plan wants one"
        assert (0, 0) == (backend.started, backend.replicas()[key]), "none from this record"

        sha256 = "ab" * 32
        await models.update(
            model["name"],
            ModelType.STABLE_DIFFUSION,
            {"status": ModelStatus.UNLOADED.value, "sha256": sha256, "mtime": 1.25},
        )
        await scheduler.tick()
        assert 1 == backend.started
        for _ in range(200):
            written = [p for p in records.iterdir() if p.stat().st_size]
            if written:
                break
            await asyncio.sleep(0.05)
        [record] = written
        environment = json.loads(record.read_text())
        assert {"SDSWARM_MODEL_HASH": sha256[:10], "SDSWARM_MODEL_MTIME": "1.25"} == environment
