"""Images per second: plain diffusers (the ceiling), sdswarm's inference path, and the
whole system, measured side by side in one run (compare the ratios, not the seconds).

    .venv/bin/python bench/throughput.py                    # tiny model, CPU
    .venv/bin/python bench/throughput.py --full-size        # random-weight SD1.5, a GPU

1. plain diffusers: one pipeline call with ``batch`` prompts (and one with 1);
2. sdswarm's path: ``DiffusersPipeline.generate`` for one task, ``generate_batch`` for
   ``batch`` tasks (their PNGs encoded, as the worker does);
3. the whole system (gateway → NATS → worker → store → MongoDB), with ``--slots`` N
   workers of ``max_batch = batch`` (``sdswarm up --gpu-slots N``; on a CPU each
   computes with (cores − 1) / N threads, at least 1), all loaded before measuring, at
   each queue depth D: D clients each send sync requests one after another (a closed
   loop: D requests are always open). After ``SETTLE_S`` of that load, a window counts
   the answers (``--rounds`` per client and 64 in all, at least), so the rate is the
   steady state's: not that of one burst's fill and drain (a single burst of D requests
   understated it: 32 tiny images in ~2 s), nor of the scheduler's reaction to a new
   load. ``--slots 1,2`` measures the system once per slot count, in the same run.

Each window is also compared with the ceiling measured just before and just after it,
while the system stands idle (its clients stopped), by a process of its own (in the
bench's process, which hosts the gateway, scheduler and storage service, their event
loop took the interpreter from the ceiling's pipeline: 15–20 images/s instead of 24–32).
Measured only once, before the system started, the ceiling moved between 24 and 45
images/s from run to run, and the ratio with it (0.88–1.51× for the same code) said more
about the machine's moment than about sdswarm. The table's first rows are still that
first measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import msgspec
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.models import build_full_sd1
from bench.system import started_system
from proto import GenerateImage
from proto.commands import Txt2ImgTask
from proto.requests import Txt2ImgRequest
from services.inference.batched import Member
from services.inference.loader import load_pipeline
from services.inference.pipeline import DiffusersPipeline
from services.inference.tiny import build_tiny_sd1

NAME = "bench.safetensors"


MIN_REQUESTS = 64
"""Answers a queue depth's measurement window holds, at least."""
SETTLE_S = 2.0
"""Load before a depth's window opens: the scheduler (a tick a second) sets the consumer's
limits for the new load. Measured from the start, a depth that followed a lighter one
lost its first second to the old limits: depth 8 read 21 images/s one run, 29 the next."""


def _timed(call: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``repeats`` calls, after one warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _command(body: dict[str, Any], n: int) -> GenerateImage:
    return Txt2ImgTask(
        task_id=f"bench{n}",
        user="bench",
        model_name=NAME,
        model_key="bench-000000",
        request=msgspec.convert({**body, "seed": n, "prompt": f"a cat, {n}"}, Txt2ImgRequest),
    )


Ceiling = Callable[[], float]
"""Measures plain diffusers at the batch size now: images/s."""


def _plain_call(pipe: Any, body: dict[str, Any], n: int) -> Callable[[], object]:
    """One plain diffusers call with ``n`` prompts."""

    def call() -> object:
        generators = [torch.Generator("cpu").manual_seed(i) for i in range(n)]
        return pipe(
            prompt=[f"a cat, {i}" for i in range(n)],
            negative_prompt=[""] * n,
            num_inference_steps=body["steps"],
            guidance_scale=body["cfg_scale"],
            width=body["width"],
            height=body["height"],
            generator=generators,
        ).images

    return call


def _loaded(checkpoint: Path, cache: Path, device: str) -> Any:
    """The checkpoint's diffusers pipeline, as diffusers loads it, without progress bars."""
    pipe = load_pipeline(checkpoint, cache_dir=cache, device=device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _plain_ceiling(pipe: Any, body: dict[str, Any], batch: int, repeats: int) -> Ceiling:
    def ceiling() -> float:
        return batch / _timed(_plain_call(pipe, body, batch), repeats)

    return ceiling


def in_process(
    checkpoint: Path, cache: Path, device: str, body: dict[str, Any], batch: int, repeats: int
) -> dict[str, float]:
    """Images/s of plain diffusers and of sdswarm's inference path, batch 1 and ``batch``.
    Plain diffusers is measured first, as diffusers loads it: sdswarm's pipeline sets its
    own options on the components it is given (the VAE's, say), and before session 17 the
    ceiling was measured after that, with them."""
    pipe = _loaded(checkpoint, cache, device)
    rates = {
        "diffusers batch 1": 1 / _timed(_plain_call(pipe, body, 1), repeats),
        f"diffusers batch {batch}": _plain_ceiling(pipe, body, batch, repeats)(),
    }
    runner = DiffusersPipeline(pipe, model_name=NAME, model_hash="", device=device)
    one = _command(body, 0)
    commands = [_command(body, n) for n in range(batch)]

    def ours_one() -> object:
        return runner.generate(one, {}, lambda *_: None, lambda: False).images

    def ours_batch() -> object:
        members = [
            Member(c, lambda *_: None, lambda: False, lambda: False, lambda: None) for c in commands
        ]
        runner.generate_batch(members)
        return [m.outcome.images for m in members if m.outcome is not None]  # type: ignore[union-attr]

    rates["sdswarm path batch 1"] = 1 / _timed(ours_one, repeats)
    rates[f"sdswarm path batch {batch}"] = batch / _timed(ours_batch, repeats)
    return rates


_child_ceiling: Ceiling | None = None
"""In the ceiling's own process (:class:`CeilingProcess`): its measurement."""


def _load_ceiling(
    checkpoint: Path, cache: Path, device: str, body: dict[str, Any], batch: int, repeats: int
) -> None:
    global _child_ceiling
    if not device.startswith("cuda"):
        torch.set_flush_denormal(True)
    _child_ceiling = _plain_ceiling(_loaded(checkpoint, cache, device), body, batch, repeats)


def _measure_child_ceiling() -> float:
    assert _child_ceiling is not None
    return _child_ceiling()


class CeilingProcess:
    """The ceiling measured by a process of its own, on demand (see the module)."""

    def __init__(
        self, checkpoint: Path, cache: Path, device: str, body: dict[str, Any], batch: int,
        repeats: int,
    ) -> None:  # fmt: skip
        self.pool = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_load_ceiling,
            initargs=(checkpoint, cache, device, body, batch, repeats),
        )

    async def measure(self) -> float:
        return await asyncio.get_running_loop().run_in_executor(self.pool, _measure_child_ceiling)

    def close(self) -> None:
        self.pool.shutdown()


class Window(NamedTuple):
    """One queue depth's window: images/s, p50 and p95 latency (s), and the ceiling
    measured just before and just after it (images/s; NaN without one)."""

    rate: float
    p50: float
    p95: float
    ceiling_before: float
    ceiling_after: float

    @property
    def ceiling(self) -> float:
        return (self.ceiling_before + self.ceiling_after) / 2


async def whole_system(
    root: Path,
    models: Path,
    device: str,
    body: dict[str, Any],
    batch: int,
    depths: list[int],
    rounds: int,
    slots: int = 1,
    ceiling: CeilingProcess | None = None,
) -> dict[int, Window]:
    """Per queue depth, the window of ``depth`` closed-loop clients, once ``slots``
    workers are loaded (their cold starts are not measured); with ``ceiling``, measured
    before and after each window (the system answers nothing meanwhile)."""
    out: dict[int, Window] = {}

    async def measure_ceiling() -> float:
        return math.nan if ceiling is None else await ceiling.measure()

    async with (
        started_system(
            root,
            models,
            device=device,
            gateway={
                "max_open_tasks_per_user": 100_000,
                "max_tasks_per_minute": 100_000,
                "sync_timeout_s": 3600,
            },
            scheduler={"gpu_slots": slots, "max_batch": batch},
        ) as system,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as http,
    ):

        async def one(n: int) -> None:
            request = {**body, "seed": n, "prompt": f"a cat, {n}"}
            async with http.post(f"{system.url}/txt2img", json=request) as response:
                result = await response.json()
            assert result["status"] == "succeeded", result

        await warm(http, system.url, slots)
        # Every worker's first tasks pay their own one-off costs (lazy imports, first
        # allocations): a burst that reaches them all before anything is measured.
        await asyncio.gather(*(one(1_000_000 + n) for n in range(2 * slots * batch)))
        after = await measure_ceiling()
        for depth in depths:
            before = after
            rate, latencies = await closed_loop(one, depth, max(MIN_REQUESTS, rounds * depth))
            after = await measure_ceiling()
            p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
            out[depth] = Window(rate, statistics.median(latencies), p95, before, after)
    return out


async def closed_loop(
    one: Callable[[int], Awaitable[None]], depth: int, answers: int
) -> tuple[float, list[float]]:
    """``depth`` clients, each sending a request as soon as its last one is answered.
    After ``SETTLE_S`` and an answer for every client, a window opens; it closes once
    ``answers`` answers came inside it. Answers per second in the window, and the sorted
    latencies of the requests sent and answered inside it."""
    seeds = itertools.count()
    timings: list[tuple[float, float]] = []  # (sent, answered)
    answered: set[int] = set()
    stop, news = asyncio.Event(), asyncio.Event()

    async def client(number: int) -> None:
        while not stop.is_set():
            sent = time.perf_counter()
            await one(next(seeds))
            timings.append((sent, time.perf_counter()))
            answered.add(number)
            news.set()

    async def until(condition: Callable[[], bool]) -> None:
        while not condition():
            news.clear()
            await news.wait()

    clients = [asyncio.create_task(client(n)) for n in range(depth)]
    await asyncio.sleep(SETTLE_S)
    await until(lambda: len(answered) == depth)
    opened = time.perf_counter()
    await until(lambda: sum(1 for _, at in timings if at > opened) >= answers)
    closed = time.perf_counter()
    stop.set()
    await asyncio.gather(*clients)
    inside = [at for _, at in timings if opened < at <= closed]
    latencies = sorted(at - sent for sent, at in timings if sent >= opened and at <= closed)
    return len(inside) / (closed - opened), latencies or [math.nan]


async def warm(http: aiohttp.ClientSession, url: str, slots: int) -> None:
    """``slots`` workers of the checkpoint loaded (``minInstances``), as a busy system
    keeps them; a worker started by the backlog mid-measurement would count its cold
    start."""
    update = {"models": [NAME], "minInstances": slots}
    async with http.post(f"{url}/batch_update_sd_resource", json=update) as response:
        assert response.status == 200, await response.text()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        async with http.get(f"{url}/models/{NAME}") as response:
            if (await response.json()).get("loadedWorkers", 0) >= slots:
                return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{slots} workers did not load in 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full-size", action="store_true", help="random-weight SD1.5")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=0, help="default: 8 on CUDA, 4 on CPU")
    parser.add_argument("--steps", type=int, default=0, help="default: 30 full size, 4 tiny")
    parser.add_argument("--size", type=int, default=0, help="default: 512 full size, 64 tiny")
    parser.add_argument("--depths", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--rounds", type=int, default=4, help="answers per client in a window, at least"
    )
    parser.add_argument("--skip-system", action="store_true")
    parser.add_argument(
        "--no-ceiling-beside",
        action="store_true",
        help="skip the ceiling measured beside each window (a second copy of the model in"
        " a process of its own; on a GPU, whose ceiling does not swing as two shared CPU"
        " cores do, the first measurement serves)",
    )
    parser.add_argument(
        "--slots",
        default="1",
        help="worker slots of the whole system, comma-separated to compare (1,2): on a"
        " CPU, one single-thread worker per core may beat one worker with cores − 1 threads",
    )
    parser.add_argument(
        "--compute-threads",
        type=int,
        default=0,
        help="torch threads for the ceiling and the worker (0: torch's default). On a CPU,"
        " 1 leaves the other cores to the control plane, as a GPU would",
    )
    args = parser.parse_args()
    if args.compute_threads:
        # Before any worker starts (they inherit it) and for the in-process ceiling.
        os.environ["OMP_NUM_THREADS"] = str(args.compute_threads)
        torch.set_num_threads(args.compute_threads)
    cuda = args.device.startswith("cuda")
    batch = args.batch or (8 if cuda else 4)
    size = args.size or (512 if args.full_size else 64)
    body: dict[str, Any] = {
        "stable_diffusion_model": NAME,
        "steps": args.steps or (30 if args.full_size else 4),
        "width": size,
        "height": size,
        "cfg_scale": 7.0,
        "sampler_name": "Euler",
    }
    if not cuda:
        torch.set_flush_denormal(True)
    depths = [int(d) for d in args.depths.split(",") if d]
    slot_counts = [int(n) for n in args.slots.split(",") if n]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        models = root / "models"
        target = models / "Stable-diffusion" / NAME
        target.parent.mkdir(parents=True)
        if args.full_size:
            build_full_sd1(target)
        else:
            build_tiny_sd1(root / "tiny").single_file.rename(target)
        started = time.perf_counter()
        rates = in_process(target, root / "cache-direct", args.device, body, batch, args.repeats)
        print(f"in-process measured in {time.perf_counter() - started:.0f} s", flush=True)
        system: dict[int, dict[int, Window]] = {}
        if not args.skip_system:
            ceiling = None
            if not args.no_ceiling_beside:
                ceiling = CeilingProcess(
                    target, root / "cache-direct", args.device, body, batch, args.repeats
                )
            try:
                for slots in slot_counts:
                    system[slots] = asyncio.run(
                        whole_system(
                            root, models, args.device, body, batch, depths, args.rounds, slots,
                            ceiling,
                        )
                    )  # fmt: skip
            finally:
                if ceiling is not None:
                    ceiling.close()
    print(
        f"\nmodel={'SD1.5 random weights' if args.full_size else 'tiny'} device={args.device}"
        f" {size}x{size} steps={body['steps']} Euler cfg 7 batch={batch}"
        f" compute threads={torch.get_num_threads()}"
    )
    first = rates[f"diffusers batch {batch}"]
    for name, rate in rates.items():
        print(f"{name:30} {rate:8.2f} images/s   {rate / first:5.2f}x the ceiling")
    windows = [
        (f"whole system depth {depth}" + (f" slots {slots}" if len(system) > 1 else ""), window)
        for slots, by_depth in system.items()
        for depth, window in by_depth.items()
    ]
    for name, window in windows:
        print(
            f"{name:30} {window.rate:8.2f} images/s   {window.rate / first:5.2f}x"
            f" the ceiling   p50 {window.p50:6.2f} s  p95 {window.p95:6.2f} s"
        )
    windows = [(name, window) for name, window in windows if not math.isnan(window.ceiling)]
    if windows:
        print(
            "\nagainst the ceiling measured just before and after each window"
            " (the system idle meanwhile):"
        )
    for name, window in windows:
        print(
            f"{name:30} {window.rate / window.ceiling:5.2f}x the ceiling beside it"
            f" ({window.ceiling_before:.2f} before, {window.ceiling_after:.2f} after)"
        )


if __name__ == "__main__":
    main()
