"""What the system adds on top of the model: sync txt2img through gateway → NATS →
worker → object store → MongoDB, against the same pipeline called directly, side by
side in one run (these machines are noisy: compare the ratio, not the seconds).

    .venv/bin/python bench/system_overhead.py [--requests 20] [--steps 4] [--size 64]

Direct calls and requests through the system alternate, so load from other processes
falls on both alike. ``--breakdown`` also prints where a request's time goes (medians),
from the command's and events' own timestamps and when a core-NATS subscriber heard them
(one clock: everything runs on this machine); see ``PHASES``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nats
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.system import started_system
from proto import names
from proto.codec import decode_generate
from proto.commands import Txt2ImgTask
from proto.events import TaskProgressed, TaskStarted, TaskSucceeded, decode_event
from proto.requests import Txt2ImgRequest
from services.common.cores import usable_cores
from services.inference.__main__ import torch_threads
from services.inference.loader import load_pipeline
from services.inference.pipeline import DiffusersPipeline
from services.inference.tiny import build_tiny_sd1

PHASES = (
    ("gateway", "resolution: sent → the command's submitted_at"),
    ("publish", "task insert + JetStream publish: → the command on sd.task"),
    ("to worker", "delivery, fetch, admission: → TaskStarted.at"),
    ("first step", "prompt encoding and the first step: → its TaskProgressed.at"),
    ("steps", "the other steps: → the last TaskProgressed.at"),
    ("output", "VAE decode, PNG, upload: → TaskSucceeded.at"),
    ("event out", "terminal event stored and delivered: → heard on sd.event"),
    ("fold", "the sink folds the end into MongoDB: → heard on sd.folded"),
    ("answer", "the waiter's read, presigning, HTTP: → response"),
)


SETTLE_S = 0.05
"""The pause before each pair."""
DIRECT_PHASES = ("first step", "steps", "output")
"""The phases a direct call has too: ``--breakdown`` prints its medians beside the
worker's, so the worker's own cost shows phase by phase."""

Timed = tuple[float, dict[str, float]]


def direct_runner(checkpoint: Path, cache: Path, body: dict[str, Any]) -> Callable[[], Timed]:
    """One direct call of the pipeline (with PNG encoding, as the worker does): seconds,
    and its :data:`DIRECT_PHASES` (from the call to the first step's callback, to the
    last's, to the encoded images).
    It computes with as many torch threads as the worker does (its own rule: cores − 1
    unless ``OMP_NUM_THREADS`` says otherwise); with torch's default of one per core, the
    direct calls' times swung between two modes (45 and 70 ms) from run to run."""
    torch.set_flush_denormal(True)
    threads = torch_threads(0, usable_cores(), os.environ)
    if threads is not None:
        torch.set_num_threads(threads)
    pipe = load_pipeline(checkpoint, cache_dir=cache)
    pipe.set_progress_bar_config(disable=True)
    runner = DiffusersPipeline(pipe, model_name="tiny.safetensors", model_hash="", device="cpu")
    command = Txt2ImgTask(
        task_id="bench",
        user="bench",
        model_name="tiny.safetensors",
        model_key="tiny-000000",
        request=msgspec.convert(body, Txt2ImgRequest),
    )

    def call() -> Timed:
        steps: list[float] = []
        started = time.perf_counter()
        generation = runner.generate(
            command, {}, lambda *_: steps.append(time.perf_counter()), lambda: False
        )
        assert generation.images
        ended = time.perf_counter()
        points = (started, steps[0], steps[-1], ended)
        return ended - started, {
            name: b - a for name, a, b in zip(DIRECT_PHASES, points, points[1:], strict=False)
        }

    return call


class Marks:
    """When each task's command and events were heard (core NATS, this clock)."""

    def __init__(self) -> None:
        self.seen: dict[str, dict[str, float]] = defaultdict(dict)

    async def on_command(self, message: Any) -> None:
        command = decode_generate(message.data)
        self.seen[command.task_id] |= {"submitted": command.submitted_at, "published": time.time()}

    async def on_event(self, message: Any) -> None:
        event = decode_event(message.data)
        if isinstance(event, TaskStarted):
            self.seen[event.task_id]["started"] = event.at
        elif isinstance(event, TaskProgressed):
            key = "first step" if event.step == 1 else "last step"
            self.seen[event.task_id][key] = event.at
        elif isinstance(event, TaskSucceeded):
            self.seen[event.task_id] |= {"succeeded": event.at, "heard": time.time()}

    async def on_folded(self, message: Any) -> None:
        task_id = message.subject.removeprefix(names.FOLDED_SUBJECT_PREFIX + ".")
        self.seen[task_id]["folded"] = time.time()


async def measure(
    root: Path, models: Path, body: dict[str, Any], n: int, direct: Callable[[], Timed]
) -> tuple[list[float], list[float], dict[str, list[float]], dict[str, list[float]]]:
    """Alternating direct calls and sync requests: their seconds, and the phases' (the
    system's, the direct calls')."""
    direct_times: list[float] = []
    system_times: list[float] = []
    phases: dict[str, list[float]] = {name: [] for name, _ in PHASES}
    direct_phases: dict[str, list[float]] = {name: [] for name in DIRECT_PHASES}
    marks = Marks()
    async with started_system(root, models) as system, aiohttp.ClientSession() as http:
        nc = await nats.connect(system.nats_url)
        await nc.subscribe(names.TASK_SUBJECTS, cb=marks.on_command)
        await nc.subscribe(names.EVENT_SUBJECTS, cb=marks.on_event)
        await nc.subscribe(names.FOLDED_SUBJECT_PREFIX + ".*", cb=marks.on_folded)
        try:
            for index in range(n + 1):  # the first pair warms caches and starts the worker
                # What the system does after an answer (the sink's bookkeeping) is over
                # before the direct call: it must not slow the call it is compared with.
                await asyncio.sleep(SETTLE_S)
                took, took_phases = await asyncio.to_thread(direct)
                sent, started = time.time(), time.perf_counter()
                async with http.post(f"{system.url}/txt2img", json=body) as response:
                    result = await response.json()
                elapsed, received = time.perf_counter() - started, time.time()
                assert result["status"] == "succeeded", result
                if index == 0:
                    continue
                direct_times.append(took)
                for name, value in took_phases.items():
                    direct_phases[name].append(value)
                system_times.append(elapsed)
                seen = marks.seen[result["taskId"]]
                keys = (
                    "submitted",
                    "published",
                    "started",
                    "first step",
                    "last step",
                    "succeeded",
                    "heard",
                    "folded",
                )
                if all(key in seen for key in keys):
                    points = [sent, *(seen[key] for key in keys), received]
                    for (name, _), a, b in zip(PHASES, points, points[1:], strict=False):
                        phases[name].append(b - a)
        finally:
            await nc.close()
    return direct_times, system_times, phases, direct_phases


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--breakdown", action="store_true")
    args = parser.parse_args()
    body = {
        "stable_diffusion_model": "tiny.safetensors",
        "prompt": "a cat",
        "seed": 1,
        "steps": args.steps,
        "width": args.size,
        "height": args.size,
    }
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        tiny = build_tiny_sd1(root / "tiny")
        models = root / "models"
        (models / "Stable-diffusion").mkdir(parents=True)
        tiny.single_file.rename(models / "Stable-diffusion" / "tiny.safetensors")
        checkpoint = models / "Stable-diffusion" / "tiny.safetensors"
        direct = direct_runner(checkpoint, root / "cache-direct", body)
        direct_times, system_times, phases, direct_phases = asyncio.run(
            measure(root, models, body, args.requests, direct)
        )
    d, s = statistics.median(direct_times), statistics.median(system_times)
    pairs = statistics.median(b / a for a, b in zip(direct_times, system_times, strict=True))
    print(
        f"requests={args.requests} steps={args.steps} size={args.size}x{args.size}"
        f" torch threads={torch.get_num_threads()} (direct and worker)"
    )
    print(f"direct pipeline   median {d * 1000:8.1f} ms")
    print(f"through sdswarm   median {s * 1000:8.1f} ms")
    print(f"ratio system/direct {s / d:6.2f}  (overhead {1000 * (s - d):.1f} ms per request)")
    print(f"median of the pairs' ratios {pairs:6.2f}")
    if args.breakdown:
        for name, meaning in PHASES:
            values = phases[name]
            if values:
                alone = ""
                if direct_phases.get(name):
                    alone = f" (direct {1000 * statistics.median(direct_phases[name]):5.1f})"
                print(
                    f"  {name:10} median {1000 * statistics.median(values):7.1f} ms{alone:16}"
                    f"  {meaning}"
                )


if __name__ == "__main__":
    main()
