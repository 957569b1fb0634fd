"""The whole system for the benchmarks: real nats-server and MongoDB-wire server in a temp
folder, then the gateway, scheduler, storage service and local workers (``sdswarm up``'s
``running_system``), serving the checkpoints under ``models``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.servers import MongoServer, NatsServer, free_port
from services.common.settings import from_environ
from services.embedded import running_system
from services.gateway.settings import GatewaySettings
from services.scheduler.settings import SchedulerSettings


@dataclass(frozen=True)
class Running:
    url: str
    """The gateway's base URL."""
    nats_url: str


@contextlib.asynccontextmanager
async def started_system(
    root: Path,
    models: Path,
    *,
    device: str = "cpu",
    gateway: dict[str, Any] | None = None,
    scheduler: dict[str, Any] | None = None,
) -> AsyncIterator[Running]:
    """Where the running system answers; ``gateway`` and ``scheduler`` are settings over
    the defaults."""
    async with NatsServer(root / "nats") as nats, MongoServer(root / "mongo") as mongo:
        port = free_port()
        common = {
            "nats_url": nats.url,
            "mongodb_url": mongo.url,
            "store_dir": str(root / "objects"),
            "public_url": f"http://127.0.0.1:{port}",
        }
        gateway_settings = from_environ(GatewaySettings, {}, port=port, **common, **(gateway or {}))
        scheduler_settings = from_environ(
            SchedulerSettings,
            {},
            cache_dir=str(root / "cache"),
            device=device,
            worker_log_dir=str(root / "logs"),
            **common,
            **(scheduler or {}),
        )
        async with running_system(gateway_settings, scheduler_settings, models):
            yield Running(url=f"http://127.0.0.1:{port}", nats_url=nats.url)
