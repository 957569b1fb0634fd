"""What the system adds on top of the model: sync txt2img through gateway → NATS →
worker → object store → MongoDB, against the same pipeline called directly, side by
side in one run (these machines are noisy: compare the ratio, not the seconds).

    .venv/bin/python bench/system_overhead.py [--requests 20] [--steps 4] [--size 64]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import msgspec
import torch

from proto import GenerateImage
from proto.requests import Txt2ImgRequest
from services.common.servers import MongoServer, NatsServer, free_port
from services.common.settings import from_environ
from services.embedded import running_system
from services.gateway.settings import GatewaySettings
from services.inference.loader import load_pipeline
from services.inference.pipeline import DiffusersPipeline
from services.inference.tiny import build_tiny_sd1
from services.scheduler.settings import SchedulerSettings


def direct(checkpoint: Path, cache: Path, body: dict[str, object], n: int) -> list[float]:
    torch.set_flush_denormal(True)
    pipe = load_pipeline(checkpoint, cache_dir=cache)
    pipe.set_progress_bar_config(disable=True)
    runner = DiffusersPipeline(pipe, model_name="tiny.safetensors", model_hash="", device="cpu")
    command = GenerateImage(
        task_id="bench",
        user="bench",
        model_name="tiny.safetensors",
        model_key="tiny-000000",
        txt2img=msgspec.convert(body, Txt2ImgRequest),
    )
    times = []
    for _ in range(n + 1):
        started = time.perf_counter()
        runner.generate(command, {}, lambda *_: None, lambda: False)
        times.append(time.perf_counter() - started)
    return times[1:]  # the first call warms caches


async def through_system(root: Path, models: Path, body: dict[str, object], n: int) -> list[float]:
    async with NatsServer(root / "nats") as nats, MongoServer(root / "mongo") as mongo:
        port = free_port()
        common = {
            "nats_url": nats.url,
            "mongodb_url": mongo.url,
            "store_dir": str(root / "objects"),
            "public_url": f"http://127.0.0.1:{port}",
        }
        gateway = from_environ(GatewaySettings, {}, port=port, **common)
        scheduler = from_environ(
            SchedulerSettings,
            {},
            cache_dir=str(root / "cache"),
            device="cpu",
            worker_log_dir=str(root / "logs"),
            poll_interval_s=0.2,
            **common,
        )
        async with running_system(gateway, scheduler, models), aiohttp.ClientSession() as http:
            times = []
            for _ in range(n + 1):
                started = time.perf_counter()
                async with http.post(f"http://127.0.0.1:{port}/txt2img", json=body) as response:
                    result = await response.json()
                assert result["status"] == "succeeded", result
                times.append(time.perf_counter() - started)
            return times[1:]  # the first includes the worker's cold start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
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
        direct_times = direct(checkpoint, root / "cache-direct", body, args.requests)
        system_times = asyncio.run(through_system(root, models, body, args.requests))
    d, s = statistics.median(direct_times), statistics.median(system_times)
    print(f"requests={args.requests} steps={args.steps} size={args.size}x{args.size}")
    print(f"direct pipeline   median {d * 1000:8.1f} ms")
    print(f"through sdswarm   median {s * 1000:8.1f} ms")
    print(f"ratio system/direct {s / d:6.2f}  (overhead {1000 * (s - d):.1f} ms per request)")


if __name__ == "__main__":
    main()
