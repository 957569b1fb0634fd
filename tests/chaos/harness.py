"""Submit N tasks, inject faults while they run, drain, and count what happened.

Counts, per scenario: attempted (requests sent), accepted (202 with a task id),
succeeded, failed with a reason, lost (accepted but no task document), stuck (not
terminal when the run drained or timed out) and duplicated (more than one terminal event
published for a task: the same task finished twice). Pass = 0 lost, 0 stuck, 0
duplicated, and every failure carries a reason.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from proto import names
from services.common import bus
from tests.system import System

TERMINAL = ("succeeded", "failed", "cancelled")
TASKS = int(os.environ.get("CHAOS_TASKS", "60"))
"""Tasks per scenario: 60 in CI, 500 or more with ``make chaos``."""

BODY = {
    "stable_diffusion_model": "tiny.safetensors",
    "prompt": "chaos",
    "steps": 3,
    "width": 64,
    "height": 64,
}


@dataclass
class Report:
    scenario: str
    attempted: int = 0
    accepted: int = 0
    succeeded: int = 0
    failed: int = 0
    failed_without_reason: int = 0
    lost: int = 0
    stuck: int = 0
    duplicated: int = 0
    faults: int = 0
    seconds: float = 0.0
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def passed(self) -> bool:
        clean = not (self.lost or self.stuck or self.duplicated or self.failed_without_reason)
        return clean and self.accepted == self.attempted

    def line(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items())) or "none"
        return (
            f"{self.scenario}: attempted {self.attempted}, accepted {self.accepted}, succeeded"
            f" {self.succeeded}, failed with reason {self.failed} ({reasons}), lost {self.lost},"
            f" stuck {self.stuck}, duplicated {self.duplicated}; {self.faults} faults injected,"
            f" {self.seconds:.0f} s"
        )


async def submit_all(system: System, count: int, report: Report) -> list[str]:
    """Submit ``count`` async tasks, retrying a refused or dropped request (as clients do)."""
    task_ids: list[str] = []
    for n in range(count):
        report.attempted += 1
        task_id = f"chaos{os.getpid()}x{n:05d}x{time.time_ns() % 10**9:09d}"
        for _ in range(60):
            try:
                async with system.http.post(
                    f"{system.url}/txt2img",
                    json=BODY,
                    # The same task id on a retry: JetStream and MongoDB deduplicate it.
                    headers={"Request-Type": "async", "taskId": task_id},
                ) as response:
                    if response.status in (202, 409):  # 409: an earlier try got through
                        report.accepted += 1
                        task_ids.append(task_id)
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    return task_ids


async def terminal_events(nats_url: str) -> collections.Counter[str]:
    """How many terminal events each task has in the event stream."""
    nc = await bus.connect(nats_url, "chaos-count")
    counts: collections.Counter[str] = collections.Counter()
    try:
        js = nc.jetstream()
        subscription = await js.pull_subscribe(
            names.EVENT_SUBJECTS,
            stream=names.EVENT_STREAM,
            config=ConsumerConfig(
                ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, inactive_threshold=30
            ),
        )
        while True:
            try:
                messages = await subscription.fetch(1000, timeout=1)
            except TimeoutError:
                break
            for message in messages:
                _, _, task_id, kind = message.subject.split(".", 3)
                if kind in TERMINAL:
                    counts[task_id] += 1
        await subscription.unsubscribe()
    finally:
        await nc.close()
    return counts


async def run_scenario(
    system: System,
    scenario: str,
    inject: Callable[[asyncio.Event], Coroutine[Any, Any, int]],
    *,
    count: int = TASKS,
    drain_s: float = 600,
) -> Report:
    """Submit ``count`` tasks while ``inject`` runs (it returns how many faults it caused)."""
    report = Report(scenario)
    started = time.monotonic()
    stop = asyncio.Event()
    injector = asyncio.create_task(inject(stop))
    task_ids: list[str] = []
    try:
        task_ids = await submit_all(system, count, report)
        deadline = time.monotonic() + drain_s
        pending = set(task_ids)
        while pending and time.monotonic() < deadline:
            # The ids are the client's (`taskId`), kept as `client_id` (stored per user).
            async for finished in system.db["tasks"].find(
                {"client_id": {"$in": list(pending)}, "status": {"$in": list(TERMINAL)}},
                {"client_id": 1},
            ):
                pending.discard(finished["client_id"])
            await asyncio.sleep(0.5)
    finally:
        stop.set()
        report.faults = await injector
    report.seconds = time.monotonic() - started
    events = await terminal_events(system.nats_url)
    for task_id in task_ids:
        doc: dict[str, Any] | None = await system.db["tasks"].find_one({"client_id": task_id})
        if doc is None:
            report.lost += 1
            continue
        status = doc["status"]
        if status == "succeeded":
            report.succeeded += 1
        elif status in ("failed", "cancelled"):
            report.failed += 1
            report.reasons[doc.get("code") or status] += 1
            if not doc.get("message"):
                report.failed_without_reason += 1
        else:
            report.stuck += 1
        report.duplicated += events[doc["_id"]] > 1  # the bus knows the internal id
    return report
