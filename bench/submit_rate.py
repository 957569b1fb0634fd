"""How fast the gateway accepts a burst: async ``POST /txt2img`` of one user from 1, 16
and 64 concurrent clients, with quotas on (limits raised so that every request is
admitted, but checked) and off, on an empty queue and behind 5 000 queued tasks of that
user; against a raw JetStream publish of same-sized commands on the same server, side
by side in one run (these machines are noisy: compare the ratio, not the figures).

No worker runs: the queue only grows. The gateway runs as a process of its own.

    .venv/bin/python bench/submit_rate.py [--requests 256] [--depths 0,5000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
from nats.js import JetStreamContext
from pymongo.asynchronous.database import AsyncDatabase

from proto import ModelType, names
from services.common import bus
from services.common.servers import MongoServer, NatsServer, free_port
from services.storage.models import model_document
from services.storage.mongo import Document, database, open_client
from services.storage.tasks import new_task_document

MODEL = "bench.safetensors"
BODY = {"stable_diffusion_model": MODEL, "prompt": "a lighthouse", "steps": 4, "width": 64}
USER = "default"
RAISED = 10**7
"""Quota limits in the "quotas on" runs: checked on every request, never reached."""


class Run:
    def __init__(self, seconds: float, latencies: list[float], accepted: int) -> None:
        self.rate = accepted / seconds
        ordered = sorted(latencies)
        self.p50 = ordered[len(ordered) // 2] * 1000
        self.p95 = ordered[min(int(0.95 * len(ordered)), len(ordered) - 1)] * 1000


async def burst(n: int, concurrency: int, one: Callable[[int], Awaitable[bool]]) -> Run:
    latencies: list[float] = []
    accepted = 0
    counter = iter(range(n))

    async def client() -> None:
        nonlocal accepted
        for index in counter:
            started = time.perf_counter()
            ok = await one(index)  # (not `accepted += await …`: that loses updates)
            accepted += ok
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return Run(time.perf_counter() - started, latencies, accepted)


@contextlib.asynccontextmanager
async def gateway(env: dict[str, str], log: Path) -> AsyncIterator[str]:
    port = free_port()
    with log.open("ab") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.gateway.app",
            env={**os.environ, **env, "SDSWARM_PORT": str(port)},
            stdout=out,
            stderr=out,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(600):
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{url}/healthz") as response:
                        if response.status == 200:
                            break
                await asyncio.sleep(0.1)
        yield url
    finally:
        process.terminate()
        await process.wait()


async def main(requests: int, depths: list[int], concurrencies: list[int]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        async with NatsServer(root / "nats") as nats, MongoServer(root / "mongo") as mongo:
            env = {
                "SDSWARM_NATS_URL": nats.url,
                "SDSWARM_MONGODB_URL": mongo.url,
                "SDSWARM_MONGODB_DB": "bench",
                "SDSWARM_STORE_DIR": str(root / "objects"),
                "SDSWARM_MODELS_DIR": str(root / "models"),
                "SDSWARM_TASK_STREAM_MAX_MSGS": str(10**6),
            }
            client = open_client(mongo.url)
            db = database(client, "bench")
            nc = await bus.connect(nats.url, "bench")
            js = nc.jetstream()
            model = model_document(
                name=MODEL,
                model_type=ModelType.STABLE_DIFFUSION,
                path=str(root / "models" / MODEL),
                family="sd1",
                size_bytes=1,
                sha256="0" * 64,
            )
            key = model["model_key"]
            print(f"{requests} async submits per run; accepted/s, p50/p95 ms, ratio to raw")
            print("quotas  depth  clients  raw/s  gateway/s  p50   p95   ratio")
            try:
                for quotas in ("off", "on"):
                    limit = str(RAISED if quotas == "on" else 0)
                    settings = {
                        "SDSWARM_MAX_OPEN_TASKS_PER_USER": limit,
                        "SDSWARM_MAX_TASKS_PER_MINUTE": limit,
                    }
                    async with gateway(env | settings, root / "gateway.log") as url:
                        await db["models"].replace_one({"_id": model["_id"]}, model, upsert=True)
                        for depth in depths:
                            await reset(db, js, key, depth)
                            for concurrency in concurrencies:
                                await compare(url, js, key, requests, quotas, depth, concurrency)
            finally:
                await nc.close()
                await client.close()


async def reset(db: AsyncDatabase[Document], js: JetStreamContext, key: str, depth: int) -> None:
    """An empty queue, then ``depth`` queued tasks of the user (documents and messages)."""
    tasks = db["tasks"]
    await tasks.delete_many({})
    await db["task_open_counts"].delete_many({})
    await js.purge_stream(names.TASK_STREAM)
    for start in range(0, depth, 1000):
        batch = [
            new_task_document(
                task_id=secrets.token_hex(12),
                user=USER,
                kind="txt2img",
                model_name=MODEL,
                model_key=key,
                total_steps=4,
                job_count=1,
            )
            for _ in range(min(1000, depth - start))
        ]
        await tasks.insert_many(batch)
        await asyncio.gather(*(js.publish(names.task_subject(key), b"x" * 900) for _ in batch))
    if depth:
        counts = db["task_open_counts"]
        await counts.replace_one({"_id": USER}, {"_id": USER, "n": depth}, upsert=True)


async def compare(
    url: str, js: JetStreamContext, key: str, n: int, quotas: str, depth: int, concurrency: int
) -> None:
    payload = b"x" * 900  # about a command's size

    async def raw(index: int) -> bool:
        await js.publish(
            names.task_subject(key), payload, headers={names.MSG_ID_HEADER: secrets.token_hex(12)}
        )
        return True

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

        async def submit(index: int) -> bool:
            async with http.post(
                f"{url}/txt2img", json=BODY, headers={"Request-Type": "async"}
            ) as response:
                await response.read()
                return response.status == 202

        published = await burst(n, concurrency, raw)
        accepted = await burst(n, concurrency, submit)
    ratio = accepted.rate / published.rate
    print(
        f"{quotas:>6}  {depth:>5}  {concurrency:>7}  {published.rate:>5.0f}  {accepted.rate:>9.0f}"
        f"  {accepted.p50:>4.0f}  {accepted.p95:>4.0f}  {ratio:>5.2f}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--depths", default="0,5000")
    parser.add_argument("--concurrency", default="1,16,64")
    args = parser.parse_args()
    asyncio.run(
        main(
            args.requests,
            [int(d) for d in args.depths.split(",")],
            [int(c) for c in args.concurrency.split(",")],
        )
    )
