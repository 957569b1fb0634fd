"""``sdswarm status``: per checkpoint, the queue, the share of the budget and the workers.

Reads the same places the scheduler does — the consumers on ``SD_TASKS``, the worker
records in ``sd_workers`` and the registry — so it shows what is, not what was asked.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

from nats.js.errors import NotFoundError

from proto import ModelType, names
from proto.workers import WorkerStatus
from services.common import bus
from services.common.bus import worker_records
from services.common.settings import from_environ
from services.scheduler.app import current_share, running_slots, slots_of
from services.scheduler.settings import SchedulerSettings, max_batch
from services.storage.models import ModelStore
from services.storage.mongo import Document, database, open_client
from services.usercli import ENDPOINTS_FILE


def _settings(data_dir: Path) -> tuple[SchedulerSettings, int | None]:
    overrides: dict[str, str] = {}
    saved: dict[str, object] = {}
    endpoints = data_dir / ENDPOINTS_FILE
    if endpoints.is_file():
        saved = json.loads(endpoints.read_text())
        for field in ("nats_url", "mongodb_url", "mongodb_db"):
            if f"SDSWARM_{field.upper()}" not in os.environ and field in saved:
                overrides[field] = str(saved[field])
    slots = saved.get("gpu_slots")
    settings = from_environ(SchedulerSettings, None, **overrides)
    return settings, slots if isinstance(slots, int) else None


def cold_start_text(model: Document) -> str:
    """``4.1 s = imports 2.0 + device 0.1 + config 0.2 + weights 1.5 + warmup 0.3``."""
    phases = model.get("cold_start_phases") or {}
    parts = " + ".join(f"{name} {seconds:.1f}" for name, seconds in phases.items())
    return f"{float(model['cold_start_s']):.1f} s" + (f" = {parts}" if parts else "")


def compile_text(record: WorkerStatus) -> str | None:
    """``w1 compiling 1/4 shapes ready (2@512x512), 41.5 s`` (None: compile is off)."""
    status = record.compile
    if status is None:
        return None
    count = len(status.ready)
    shapes = f"{count}/{count + status.pending}" if status.pending else f"{count}"
    ready = f" ({', '.join(status.ready)})" if status.ready else ""
    error = f": {status.error}" if status.error else ""
    return (
        f"{record.worker} {status.state.value} {shapes} shapes ready{ready},"
        f" {status.seconds:.1f} s{error}"
    )


async def run_status(args: argparse.Namespace) -> int:
    settings, slots = _settings(args.data_dir)
    budget = slots if slots is not None else settings.gpu_slots
    nc = await bus.connect(settings.nats_url, "sdswarm-status", settings)
    client = open_client(settings.mongodb_url)
    try:
        js = nc.jetstream()
        models = await ModelStore(database(client, settings.mongodb_db)).list(
            ModelType.STABLE_DIFFUSION
        )
        records = await worker_records(js)
        workers = Counter((r.model_key, r.state.value) for r in records)
        header = (
            f"{'checkpoint':40} {'status':9} {'queued':>6} {'running':>7} {'share':>5}"
            f" {'limit':>5} {'batch':>5}  workers"
        )
        print(header)
        in_use = 0
        for model in models:
            key = model["model_key"]
            batch = max_batch(settings, model)
            queued = running = share = limit = 0
            try:
                info = await js.consumer_info(names.TASK_STREAM, names.consumer_name(key))
                queued, running = int(info.num_pending or 0), int(info.num_ack_pending or 0)
                limit, pinned = current_share(info)
                # slots: workers of up to `batch` tasks each (limit: tasks in flight)
                share = slots_of(info, limit, batch)
                share_text = f"{share}{'*' if pinned is not None else ''}"
            except NotFoundError:
                share_text = "-"
            in_use += max(share, running_slots(running, batch))
            states = ", ".join(
                f"{count} {state}" for (k, state), count in sorted(workers.items()) if k == key
            )
            print(
                f"{model['name'][:40]:40} {model['status']:9} {queued:>6} {running:>7}"
                f" {share_text:>5} {limit:>5} {batch:>5}  {states or '-'}"
            )
            if model.get("cold_start_s") is not None:
                print(f"  cold start {cold_start_text(model)}")
            for record in records:
                compiled = compile_text(record) if record.model_key == key else None
                if compiled is not None:
                    print(f"  compile {compiled}")
        # share is in slots: workers of up to `batch` tasks each
        print(f"budget: {in_use} of {budget} slots in use   (* = operator pin)")
    finally:
        await client.close()
        await nc.close()
    return 0
