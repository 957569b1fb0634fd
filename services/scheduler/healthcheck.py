"""Healthcheck of a worker container (Swarm): unhealthy once the worker hangs.

``python -m services.scheduler.healthcheck`` runs inside the worker's container, which
the Swarm backend gives this command as its ``HealthCheck``; Swarm replaces a task whose
container turns unhealthy, on whatever node it runs (the scheduler can kill containers
only on its own node). It reads the worker's liveness record from KV bucket
``sd_workers`` and remembers, in a small file between runs, since when (this container's
clock) the worker has held the same task without a new step. Unhealthy (exit 1) when
that has lasted ``SDSWARM_HUNG_AFTER_S``; healthy otherwise, and also when NATS cannot
be reached, so that a NATS outage never takes every worker down with it.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import msgspec
import nats

from proto import names
from proto.workers import WorkerState, WorkerStatus, decode_worker_status
from services.common import bus
from services.common.settings import from_environ

TIMEOUT_S = 5.0
"""The whole lookup, well inside Swarm's healthcheck timeout: a check that times out
there counts as failed, and NATS being slow must not make workers unhealthy."""


class HealthSettings(msgspec.Struct, kw_only=True, frozen=True):
    nats_url: str = "nats://127.0.0.1:4222"
    worker_id: str = ""
    hung_after_s: float = 600.0
    health_state: str = "/tmp/sdswarm-health.json"
    """Where the check remembers what it saw last (a container-local file)."""


async def _quiet(_: Exception) -> None:
    """Connection errors end in the one line main() prints, not a traceback per attempt."""


async def _record(settings: HealthSettings) -> WorkerStatus | None:
    # One attempt, no reconnects: a check that cannot reach NATS ends at once (healthy).
    nc = await nats.connect(
        bus.server_urls(settings.nats_url),
        name="healthcheck",
        allow_reconnect=False,
        max_reconnect_attempts=1,
        reconnect_time_wait=0.1,
        connect_timeout=2,
        error_cb=_quiet,
    )
    try:
        bucket = await nc.jetstream().key_value(names.WORKER_BUCKET)
        entry = await bucket.get(names.worker_kv_key(settings.worker_id))
        return decode_worker_status(entry.value) if entry.value else None
    finally:
        await nc.close()


def verdict(record: WorkerStatus | None, state_file: Path, now: float, limit_s: float) -> str:
    """Why the worker is hung, or "" while it is healthy; updates ``state_file``."""
    if record is None or record.state is not WorkerState.BUSY or record.task_id is None:
        state_file.write_text("{}")
        return ""
    mark = [record.task_id, record.last_step_at]
    try:
        seen = json.loads(state_file.read_text())
    except (OSError, ValueError):
        seen = {}
    if seen.get("mark") != mark:
        state_file.write_text(json.dumps({"mark": mark, "since": now}))
        return ""
    stalled = now - float(seen["since"])
    if limit_s and stalled >= limit_s:
        return f"no step of task {record.task_id} for {stalled:.0f} s"
    return ""


def main() -> int:
    settings = from_environ(HealthSettings)
    try:
        record = asyncio.run(asyncio.wait_for(_record(settings), TIMEOUT_S))
    except Exception as exc:  # no NATS, no bucket, no record yet: not the worker's fault
        print(f"healthy (liveness record unavailable: {exc!r})")
        return 0
    reason = verdict(record, Path(settings.health_state), time.time(), settings.hung_after_s)
    print(f"unhealthy: {reason}" if reason else "healthy")
    return 1 if reason else 0


if __name__ == "__main__":
    sys.exit(main())
