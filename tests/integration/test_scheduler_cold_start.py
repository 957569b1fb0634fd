"""The measured cold-load time of a checkpoint reaches its registry record, from the
workers' liveness records (real nats-server of the test's own, real MongoDB)."""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import pytest

from proto import names
from proto.codec import encode
from proto.workers import WorkerState, WorkerStatus
from services.common import bus
from services.scheduler.app import Scheduler
from services.scheduler.local import LocalBackend
from services.scheduler.settings import SchedulerSettings
from services.storage.models import ModelStore
from services.storage.mongo import database, open_client
from services.storage.tasks import TaskStore
from tests.integration.scheduling import checkpoint

pytestmark = pytest.mark.integration


async def test_the_slowest_live_workers_load_time_is_the_cold_start(
    private_nats_url: str, mongo_server: Any, tmp_path: Path
) -> None:
    name = f"cold_{secrets.token_hex(4)}"
    settings = SchedulerSettings(
        nats_url=private_nats_url,
        mongodb_url=mongo_server.url,
        mongodb_db=name,
        worker_log_dir=str(tmp_path / "logs"),
    )
    mongo = open_client(mongo_server.url)
    nc = await bus.connect(private_nats_url, "cold-start-test")
    backend = LocalBackend(settings)
    try:
        db = database(mongo, name)
        models = ModelStore(db)
        model = checkpoint("cold.safetensors")
        await models.upsert(model)
        js = nc.jetstream()
        await bus.ensure_streams(js, settings)
        scheduler = Scheduler(settings, js, models, backend, TaskStore(db))
        bucket = await bus.worker_bucket(js)

        async def worker(
            worker_id: str,
            state: WorkerState,
            load_s: float | None,
            phases: dict[str, float] | None = None,
        ) -> None:
            status = WorkerStatus(
                worker=worker_id,
                model_key=model["model_key"],
                model_name=model["name"],
                state=state,
                load_seconds=load_s,
                load_phases=phases or {},
                updated_at=time.time(),
            )
            await bucket.put(names.worker_kv_key(worker_id), encode(status))

        await scheduler.tick()
        assert None is (await models.get(model["name"]) or {}).get("cold_start_s")
        await worker("w1", WorkerState.READY, 3.25)
        await worker("w2", WorkerState.LOADING, None)  # still loading: not measured yet
        await scheduler.tick()
        record = await models.get(model["name"]) or {}
        assert (3.25, "loaded", 1) == (
            record.get("cold_start_s"),
            record["status"],
            record["loaded_workers"],
        )
        await worker("w2", WorkerState.BUSY, 4.5)
        await scheduler.tick()
        assert 4.5 == (await models.get(model["name"]) or {}).get("cold_start_s")

        # A worker that reports its phases is measured from its process's start.
        phases = {"imports": 2.5, "device": 0.25, "config": 0.5, "weights": 1.5, "warmup": 0.75}
        await worker("w3", WorkerState.READY, 2.75, phases)
        await scheduler.tick()
        record = await models.get(model["name"]) or {}
        assert (5.5, phases) == (record.get("cold_start_s"), record.get("cold_start_phases"))
    finally:
        await backend.aclose()
        await nc.close()
        await mongo.drop_database(name)
        await mongo.close()
