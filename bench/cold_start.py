"""Cold start: a fresh worker process's start in phases, beside the same load in a warm
process, measured side by side in one run (compare the ratios, not the seconds).

    .venv/bin/python bench/cold_start.py                 # tiny model, CPU
    .venv/bin/python bench/cold_start.py --full-size     # random-weight SD1.5, a GPU
    .venv/bin/python bench/cold_start.py --compile       # SDSWARM_COMPILE: cold vs cached

1. in-process: ``load_pipeline`` of the single file in this (warm) process, then one image;
   again through the converted-weights cache, converting (miss), then loading it (hit);
2. cold: a fresh process runs the worker's own factory (imports, device, config, weights,
   warm-up) and one image, timed from its process's start; once with an empty cache
   (the file is converted) and once with the cache filled (the copy is loaded).

The issue's goal: cold (cache hit) ≤ 2 × (in-process load + one image) on CPU with the
tiny model; ≤ 5 s to the first image for SD1.5 on a GPU.

With ``--compile`` it runs two fresh processes with ``SDSWARM_COMPILE`` (one bucket, the
image's size) sharing one cache dir instead: the first compiles cold in the background, the
second from the persisted inductor cache (the goal: under 10 % of the cold compile).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _image(pipe: Any, size: int, steps: int) -> None:
    import torch

    pipe(
        "a photo of a cat",
        num_inference_steps=steps,
        height=size,
        width=size,
        generator=torch.Generator("cpu").manual_seed(0),
    )


def child(args: argparse.Namespace) -> None:
    """One cold worker start (the worker's factory) and one image; JSON on stdout."""
    from services.inference.__main__ import make_pipeline_factory
    from services.inference.coldstart import Phases
    from services.inference.pipeline import DiffusersPipeline
    from services.inference.settings import WorkerSettings

    phases = Phases()
    settings = WorkerSettings(
        model_name="bench.safetensors",
        model_key="bench-000000",
        checkpoint_path=args.checkpoint,
        model_sha256=args.sha256,
        cache_dir=args.cache,
        device=args.device,
        warmup_px=args.warmup_px,
        compile=args.compile,
        compile_sizes=f"{args.size}x{args.size}",
    )
    runner = make_pipeline_factory(settings, phases)()
    ready = time.time()
    assert isinstance(runner, DiffusersPipeline)
    compiled: dict[str, Any] = {}
    if runner.compiled is not None:
        state = runner.compiled.wait()
        compiled = {"compile_s": runner.compiled.status().seconds, "compile_state": state}
    started = time.time()
    _image(runner.pipe, args.size, args.steps)
    done = time.time()
    print(
        json.dumps(
            {
                "phases": phases.seconds(),
                "cached": phases.weights_cached,
                "ready_s": ready - phases.started_at,
                "first_image_s": done - phases.started_at,
                "image_s": done - started,
                **compiled,
            }
        )
    )


def _in_process(
    checkpoint: Path, cache: Path, device: str, size: int, steps: int, **kw: Any
) -> tuple[float, float]:
    import torch

    from services.inference.loader import load_pipeline

    if device == "cpu":
        torch.set_flush_denormal(True)
    started = time.perf_counter()
    pipe = load_pipeline(checkpoint, cache_dir=cache, device=device, **kw)
    pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter()
    _image(pipe, size, steps)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return loaded - started, time.perf_counter() - loaded


def _cold(
    args: argparse.Namespace, checkpoint: Path, sha256: str, cache: Path, forked: bool = False
) -> dict[str, Any]:
    """A fresh process's start: exec'd, or ``forked`` from the local backend's fork server
    (services/scheduler/forkserver.py: its imports done before the clock starts)."""
    command = [
        sys.executable, str(Path(__file__).resolve()), "--child",
        "--checkpoint", str(checkpoint), "--sha256", sha256, "--cache", str(cache),
        "--device", args.device, "--size", str(args.size), "--steps", str(args.steps),
        "--warmup-px", str(args.warmup_px), *(["--compile"] if args.compile else []),
    ]  # fmt: skip
    if forked:
        out = asyncio.run(_forked(command[1:], cache))
    else:
        run = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
        out = run.stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


async def _forked(script: list[str], cache: Path) -> str:
    from services.scheduler.forkserver import ForkServer

    server = ForkServer()
    log = cache.parent / "forked.log"
    try:
        await server.ready()  # the server's own start is not the worker's
        child = await server.fork(dict(os.environ), str(log), script)
        if await child.wait() != 0:
            raise RuntimeError(f"forked start failed: {log.read_text()[-2000:]}")
    finally:
        await server.aclose()
    return log.read_text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full-size", action="store_true", help="random-weight SD1.5")
    parser.add_argument("--device", default="")
    parser.add_argument("--size", type=int, default=0, help="default: 512 on CUDA, 64 else")
    parser.add_argument("--steps", type=int, default=0, help="default: 20 on CUDA, 3 else")
    parser.add_argument("--warmup-px", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="cold vs cached compile")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--sha256", default="", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = args.device.startswith("cuda")
    args.size = args.size or (512 if gpu else 64)
    args.steps = args.steps or (20 if gpu else 3)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.full_size:
            from bench.models import build_full_sd1

            checkpoint = build_full_sd1(work / "sd15.safetensors")
        else:
            from services.inference.tiny import build_tiny_sd1

            checkpoint = build_tiny_sd1(work / "tiny").single_file
        sha256 = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
        name = "SD1.5 (random weights)" if args.full_size else "tiny SD1"
        print(f"{name}, {checkpoint.stat().st_size / 1e9:.2f} GB, {args.device},"
              f" one image = {args.size}², {args.steps} steps")  # fmt: skip

        if args.compile:
            _compile_rows(args, checkpoint, sha256, work / "compiled")
            return
        # Warm this process (imports, first call) so the in-process figures exclude them.
        _in_process(checkpoint, work / "c0", args.device, args.size, 1)
        load, image = _in_process(checkpoint, work / "c1", args.device, args.size, args.steps)
        bound = {"sha256": sha256, "converted_cache_bytes": 1 << 40}
        miss, _ = _in_process(checkpoint, work / "c2", args.device, args.size, 1, **bound)
        hit, _ = _in_process(checkpoint, work / "c2", args.device, args.size, 1, **bound)
        print(f"in-process load: single file {load:.2f} s, converting into the cache"
              f" {miss:.2f} s, from the cache {hit:.2f} s ({load / hit:.2f}x); one image"
              f" {image:.2f} s")  # fmt: skip

        rows = [
            ("cold, empty cache", work / "c3", False),
            ("cold, cache filled", work / "c3", False),
            ("forked, cache filled", work / "c3", True),
        ]
        for label, cache, forked in rows:
            cold = _cold(args, checkpoint, sha256, cache, forked)
            phases = " + ".join(f"{k} {v:.2f}" for k, v in cold["phases"].items())
            ratio = cold["first_image_s"] / (load + image)
            print(f"{label:19} cached={cold['cached']!s:5} first image"
                  f" {cold['first_image_s']:.2f} s = {phases} + image {cold['image_s']:.2f}"
                  f"   cold / (in-process load + image) = {ratio:.2f}x")  # fmt: skip


def _compile_rows(args: argparse.Namespace, checkpoint: Path, sha256: str, cache: Path) -> None:
    """Two fresh processes with SDSWARM_COMPILE sharing ``cache``: cold, then cached."""
    seconds = []
    for label in ("compile, empty cache", "compile, cache filled"):
        run = _cold(args, checkpoint, sha256, cache)
        seconds.append(run["compile_s"])
        print(f"{label:21} {run['compile_state']:6} compile {run['compile_s']:.1f} s"
              f" (in the background after ready at {run['ready_s']:.2f} s);"
              f" one image compiled {run['image_s']:.2f} s")  # fmt: skip
    print(f"cached / cold compile = {seconds[1] / max(seconds[0], 1e-9):.1%}")


if __name__ == "__main__":
    main()
