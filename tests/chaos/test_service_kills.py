"""The gateway and the storage service killed (-9) and restarted mid-run, as separate
processes, with SSE clients attached that reconnect with ``Last-Event-ID``: no task is
lost, stuck or finished twice, and no SSE client misses an event."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from proto import names
from services.common import bus
from services.common.servers import NatsServer, free_port
from services.common.settings import from_environ
from services.scheduler.app import Scheduler
from services.scheduler.local import LocalBackend
from services.scheduler.settings import SchedulerSettings
from services.storage.models import ModelStore
from services.storage.mongo import database, open_client
from services.storage.scan import register_models
from services.storage.tasks import TaskStore
from tests.chaos.conftest import REPORTS
from tests.chaos.harness import TERMINAL, run_scenario
from tests.system import System
from tests.waiting import serving

pytestmark = pytest.mark.chaos
SSE_CLIENTS = 10


class Service:
    """One ``sdswarm <command>`` process that can be killed and started again."""

    def __init__(self, command: str, env: dict[str, str], log: Path) -> None:
        self.command, self.env, self.log = command, env, log
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "services.cli",
                self.command,
                env=self.env,
                stdout=out,
                stderr=out,
            )

    async def kill(self) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                await self.kill()


@pytest.fixture
async def split_system(
    tmp_path: Path, tiny_checkpoint: Path, mongo_server: Any
) -> AsyncIterator[tuple[System, dict[str, Service]]]:
    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    shutil.copy(tiny_checkpoint, models / "Stable-diffusion" / "tiny.safetensors")
    nats_server = NatsServer(tmp_path / "nats")
    await nats_server.start()
    port = free_port()
    settings = {
        "NATS_URL": nats_server.url,
        "MONGODB_URL": mongo_server.url,
        "MONGODB_DB": f"chaos_{secrets.token_hex(4)}",
        "STORE_DIR": str(tmp_path / "objects"),
        "MODELS_DIR": str(models),
        "PUBLIC_URL": f"http://127.0.0.1:{port}",
        "URL_SECRET": secrets.token_hex(16),
        "ACK_WAIT_S": "3",
        "MAX_DELIVER": "5",
        "RECONCILE_INTERVAL_S": "2",
        "RECONCILE_GRACE_S": "5",
        "PORT": str(port),
    }
    env = {**os.environ, **{f"SDSWARM_{k}": v for k, v in settings.items()}}
    services = {
        name: Service(name, env, tmp_path / f"{name}.log") for name in ("gateway", "storage")
    }
    scheduler_settings = from_environ(
        SchedulerSettings,
        {k: v for k, v in env.items() if k.startswith("SDSWARM_")},
        gpu_slots=2,
        device="cpu",
        poll_interval_s=0.2,
        cache_dir=str(tmp_path / "cache"),
        worker_log_dir=str(tmp_path / "logs"),
    )
    mongo = open_client(mongo_server.url)
    db = database(mongo, settings["MONGODB_DB"])
    model_store = ModelStore(db)
    await model_store.ensure_indexes()
    await register_models(models, model_store)
    nc = await bus.connect(nats_server.url, "chaos-scheduler")
    model_store.reads.announce = bus.registry_notice(nc)  # as the scheduler's own process
    js = nc.jetstream()
    await bus.ensure_streams(js, scheduler_settings)
    backend = LocalBackend(scheduler_settings)
    scheduler = Scheduler(scheduler_settings, js, model_store, backend, TaskStore(db))
    stop = asyncio.Event()
    scheduling = asyncio.create_task(scheduler.run(stop))
    for service in services.values():
        await service.start()
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        await serving(http, url)
        try:
            yield (
                System(
                    url=url,
                    http=http,
                    settings=None,  # type: ignore[arg-type]
                    objects=None,  # type: ignore[arg-type]
                    db=db,
                    nats_url=nats_server.url,
                    nats_server=nats_server,
                ),
                services,
            )
        finally:
            for service in services.values():
                await service.stop()
            stop.set()
            await scheduling
            await backend.aclose()
            await nc.close()
            await mongo.close()
            await nats_server.stop()
            for log in sorted(tmp_path.glob("**/*.log")):  # noqa: ASYNC240
                print(f"--- {log.name} ---\n{log.read_text()[-3000:]}")


async def follow_sse(url: str, task_id: str, http: aiohttp.ClientSession) -> tuple[list[int], int]:
    """Event ids an SSE client receives for a task, reconnecting with ``Last-Event-ID``,
    and how many connections that took."""
    received: list[int] = []
    connections = 0
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        connections += 1
        headers = {"Last-Event-ID": str(received[-1])} if received else {}
        kind = ""
        try:
            async with http.get(f"{url}/tasks/{task_id}/events", headers=headers) as response:
                if response.status != 200:
                    raise aiohttp.ClientError(response.status)
                async for raw in response.content:
                    line = raw.decode().rstrip("\n")
                    if line.startswith("event: "):
                        kind = line.removeprefix("event: ")
                    elif line.startswith("id: "):
                        received.append(int(line.removeprefix("id: ")))
                    elif line.startswith("data: ") and kind in TERMINAL:
                        return received, connections
        except (TimeoutError, aiohttp.ClientError, ConnectionError):
            pass
        await asyncio.sleep(0.3)
    return received, connections


async def stream_sequences(nats_url: str, task_id: str) -> list[int]:
    nc = await bus.connect(nats_url, "chaos-sse-check")
    try:
        subscription = await nc.jetstream().pull_subscribe(
            names.task_events_filter(task_id),
            stream=names.EVENT_STREAM,
            config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL),
        )
        sequences: list[int] = []
        with contextlib.suppress(TimeoutError):
            while True:
                for message in await subscription.fetch(100, timeout=1):
                    sequences.append(message.metadata.sequence.stream)
        await subscription.unsubscribe()
        return sequences
    finally:
        await nc.close()


async def test_gateway_and_storage_killed_mid_run(
    split_system: tuple[System, dict[str, Service]],
) -> None:
    system, services = split_system
    followers: dict[str, asyncio.Task[tuple[list[int], int]]] = {}

    async def kill_services(stop: asyncio.Event) -> int:
        kills = 0
        order = ["gateway", "storage"]
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 3.0)
            if stop.is_set():
                break
            # Attach SSE clients to the first tasks as they appear.
            async for doc in system.db["tasks"].find({}, {"_id": 1}).limit(SSE_CLIENTS):
                if doc["_id"] not in followers:
                    followers[doc["_id"]] = asyncio.create_task(
                        follow_sse(system.url, doc["_id"], system.http)
                    )
            service = services[order[kills % 2]]
            await service.kill()
            await asyncio.sleep(0.5)
            await service.start()
            kills += 1
        return kills

    report = await run_scenario(system, "gateway and storage kill -9 every 3 s", kill_services)
    sse_missed = reconnects = 0
    for task_id, follower in followers.items():
        received, connections = await asyncio.wait_for(follower, 120)
        expected = await stream_sequences(system.nats_url, task_id)
        sse_missed += len(set(expected) - set(received))
        reconnects += connections - 1
    REPORTS.append(
        f"{report.line()}; {len(followers)} SSE clients reconnected {reconnects} times and"
        f" missed {sse_missed} events"
    )
    assert report.faults >= 2
    assert report.passed, report.line()
    assert followers, "no SSE client was attached"
    assert 0 == sse_missed
