"""The whole system (gateway, sink, scheduler, real worker processes) on real servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.common.servers import NatsServer, free_port
from services.common.settings import from_environ
from services.embedded import running_system
from services.gateway.settings import GatewaySettings
from services.scheduler.settings import SchedulerSettings
from services.storage.mongo import Document, database, open_client
from services.storage.objects import ObjectStore, open_object_store


@dataclass
class System:
    url: str
    http: aiohttp.ClientSession
    settings: GatewaySettings
    objects: ObjectStore
    db: Any
    nats_url: str
    nats_server: NatsServer

    async def task(self, task_id: str) -> Document | None:
        # A generated id, or one the client chose (stored under an internal id).
        query = {"$or": [{"_id": task_id}, {"client_id": task_id}]}
        doc: Document | None = await self.db["tasks"].find_one(query)
        return doc

    async def submit(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> str:
        """Queue a txt2img task asynchronously; its id."""
        async with self.http.post(
            f"{self.url}/txt2img", json=body, headers={"Request-Type": "async", **(headers or {})}
        ) as response:
            assert 202 == response.status, await response.text()
            task_id: str = (await response.json())["taskId"]
        return task_id

    async def events(self, task_id: str) -> list[tuple[str, dict[str, Any]]]:
        """A task's SSE stream (``GET /tasks/{id}/events``) read to its end, as (event
        name, data) pairs."""
        events: list[tuple[str, dict[str, Any]]] = []
        async with self.http.get(f"{self.url}/tasks/{task_id}/events") as response:
            assert 200 == response.status
            assert response.headers["Content-Type"].startswith("text/event-stream")
            name = ""
            async for raw in response.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    events.append((name, json.loads(line[6:])))
        return events

    async def task_when(
        self, task_id: str, check: Callable[[Document], bool], timeout_s: float = 180
    ) -> Document:
        """The task document once ``check`` holds (polled; fails after ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            doc = await self.task(task_id)
            if doc is not None and check(doc):
                return doc
            await asyncio.sleep(0.05)
        raise AssertionError(f"task {task_id}: condition not met in {timeout_s} s")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    root = tmp_path_factory.mktemp("models")
    target = root / "Stable-diffusion" / "tiny.safetensors"
    target.parent.mkdir(parents=True)
    shutil.copy(tiny_checkpoint, target)
    return root


@contextlib.asynccontextmanager
async def start_system(
    data: Path,
    models_dir: Path,
    mongo_url: str,
    store: dict[str, Any] | None = None,
    **overrides: Any,
) -> AsyncIterator[System]:
    """The whole system on its own NATS server, a fresh database and the given store
    (settings of an S3 store; default: a local folder under ``data``)."""
    store = store if store is not None else {"store_dir": str(data / "objects")}
    port = free_port()
    # A NATS server per system: systems must not share streams or consumers.
    nats_server = NatsServer(data / "nats")
    await nats_server.start()
    common: dict[str, Any] = {
        "nats_url": nats_server.url,
        "mongodb_url": mongo_url,
        "mongodb_db": f"e2e_{secrets.token_hex(4)}",
        "public_url": f"http://127.0.0.1:{port}",
        "ack_wait_s": 30,
        "models_dir": str(models_dir),
        **store,
        **overrides,
    }
    environ: dict[str, str] = {}
    gateway = from_environ(GatewaySettings, environ, port=port, sync_timeout_s=120, **common)
    scheduler = from_environ(
        SchedulerSettings,
        environ,
        cache_dir=str(data / "cache"),
        worker_log_dir=str(data / "logs"),
        device="cpu",
        poll_interval_s=0.2,
        **common,
    )
    mongo = open_client(mongo_url)
    objects = await open_object_store(gateway)
    try:
        async with running_system(gateway, scheduler, models_dir), aiohttp.ClientSession() as http:
            yield System(
                url=f"http://127.0.0.1:{port}",
                http=http,
                settings=gateway,
                objects=objects,
                db=database(mongo, gateway.mongodb_db),
                nats_url=nats_server.url,
                nats_server=nats_server,
            )
    finally:
        for log in sorted((data / "logs").glob("*.log")):
            print(f"--- {log.name} ---\n{log.read_text()[-4000:]}")
        await objects.aclose()
        await mongo.close()
        await nats_server.stop()


@pytest.fixture(scope="module", params=["local", "s3"])
async def system(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    models_dir: Path,
    mongo_server: Any,
    s3_server: Any,
) -> AsyncIterator[System]:
    data = tmp_path_factory.mktemp(f"system-{request.param}")
    store: dict[str, Any] = {"store_dir": str(data / "objects")}
    if request.param == "s3":
        store = {
            "s3_endpoint_url": s3_server.endpoint_url,
            "s3_access_key": s3_server.access_key,
            "s3_secret_key": s3_server.secret_key,
            "s3_region": s3_server.region,
            "s3_bucket": f"e2e-{secrets.token_hex(4)}",
        }
    async with start_system(data, models_dir, mongo_server.url, store) as system:
        yield system
