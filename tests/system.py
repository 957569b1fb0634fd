"""The whole system (gateway, sink, scheduler, real worker processes) on real servers,
and the one factory that starts it: ``make_system(**overrides)`` (a fixture of
tests/conftest.py), shared by the e2e and chaos tiers."""

from __future__ import annotations

import contextlib
import functools
import json
import secrets
import shutil
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proto.codec import decode_generate
from proto.commands import GenerateImage
from proto.enums import ModelType, TaskStatus
from services.common import bus
from services.common.servers import NatsServer, free_port
from services.common.settings import from_environ
from services.embedded import running_system
from services.gateway.settings import GatewaySettings
from services.scheduler.settings import SchedulerSettings
from services.storage.models import ModelStore
from services.storage.mongo import Document, database, open_client
from services.storage.objects import ObjectStore, open_object_store
from services.storage.scan import register_models
from tests.servers import S3Info
from tests.waiting import eventually


def terminal(doc: Document) -> bool:
    return TaskStatus(doc["status"]).terminal


@dataclass
class System:
    url: str
    http: aiohttp.ClientSession
    settings: GatewaySettings
    objects: ObjectStore
    db: Any
    nats_url: str
    nats_server: NatsServer

    async def register_models(self, folder: Path, types: tuple[ModelType, ...]) -> None:
        """Register the files under ``folder`` as the storage service does, announcing
        each write to the gateways (they may remember the registry's earlier answers)."""
        nc = await bus.connect(self.nats_url, "test-registrar")
        try:
            store = ModelStore(self.db)
            store.reads.announce = bus.registry_notice(nc)
            await register_models(folder, store, False, types)
            await nc.flush()
        finally:
            await nc.close()

    async def task(self, task_id: str) -> Document | None:
        # A generated id, or one the client chose (stored under an internal id).
        query = {"$or": [{"_id": task_id}, {"client_id": task_id}]}
        doc: Document | None = await self.db["tasks"].find_one(query)
        return doc

    async def command(self, task_id: str) -> GenerateImage:
        """The task's stored command: its one copy of the request."""
        doc = await self.task(task_id)
        assert doc is not None, f"no task {task_id}"
        return decode_generate(doc["command"])

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

        async def holds() -> Document | None:
            doc = await self.task(task_id)
            return doc if doc is not None and check(doc) else None

        return await eventually(holds, f"task {task_id}", timeout_s=timeout_s)

    async def finished(self, task_id: str, timeout_s: float = 180) -> Document:
        """The task document once it is terminal (succeeded, failed or cancelled)."""
        return await self.task_when(task_id, terminal, timeout_s)

    async def succeeded(self, task_id: str, timeout_s: float = 180) -> Document:
        """The task document once terminal, asserting it succeeded (else: its message)."""
        doc = await self.finished(task_id, timeout_s)
        assert "succeeded" == doc["status"], doc["message"]
        return doc

    async def all_finished(self, task_ids: Iterable[str], timeout_s: float = 300) -> list[Document]:
        """The documents of all ``task_ids`` once every one is terminal, in their order."""
        ids = list(task_ids)

        async def done() -> list[Document] | None:
            docs = [await self.task(task_id) for task_id in ids]
            if all(doc is not None and terminal(doc) for doc in docs):
                return [doc for doc in docs if doc is not None]
            return None

        unfinished = f"tasks {ids}"
        return await eventually(done, unfinished, timeout_s=timeout_s, interval_s=0.2)


def s3_store(s3: S3Info) -> dict[str, Any]:
    """Settings of an S3 object store: a fresh bucket on ``s3``."""
    return {
        "s3_endpoint_url": s3.endpoint_url,
        "s3_access_key": s3.access_key,
        "s3_secret_key": s3.secret_key,
        "s3_region": s3.region,
        "s3_bucket": f"e2e-{secrets.token_hex(4)}",
    }


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


@dataclass
class SystemFactory:
    """``make_system(**overrides)``: a whole system with these settings changed (any
    gateway or scheduler setting), as an async context manager that stops it."""

    tmp: pytest.TempPathFactory
    tiny_checkpoint: Path
    mongo_url: str

    @functools.cached_property
    def default_models(self) -> Path:
        """The models folder systems share unless given their own: never change it."""
        return self.models()

    def __call__(
        self, *, models: Path | None = None, store: dict[str, Any] | None = None, **overrides: Any
    ) -> AbstractAsyncContextManager[System]:
        """``models``: its models folder (default: the tiny checkpoint as
        ``tiny.safetensors``); ``store``: an object store's settings (default: a local
        folder of its own)."""
        data = self.tmp.mktemp("system")
        return start_system(data, models or self.default_models, self.mongo_url, store, **overrides)

    def models(self, checkpoints: Iterable[str] = ("tiny.safetensors",)) -> Path:
        """A fresh models folder holding the tiny checkpoint under each name given, for a
        system whose models differ from the shared folder's."""
        root = self.tmp.mktemp("models")
        (root / "Stable-diffusion").mkdir(parents=True)
        for name in checkpoints:
            shutil.copy(self.tiny_checkpoint, root / "Stable-diffusion" / name)
        return root
