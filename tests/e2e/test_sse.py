"""SSE survives reconnects: Last-Event-ID resumes with no gap and no duplicate."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.common.servers import free_port
from tests.documents import task_document
from tests.e2e.gateways import extra_gateway
from tests.system import System
from tests.waiting import eventually, serving

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("system", ["local"], indirect=True)]

Event = tuple[int, str, dict[str, Any]]


async def _read(
    system: System, task_id: str, last_id: int | None, stop_after: int | None
) -> list[Event]:
    headers = {"Last-Event-ID": str(last_id)} if last_id is not None else {}
    events: list[Event] = []
    async with system.http.get(f"{system.url}/tasks/{task_id}/events", headers=headers) as r:
        assert 200 == r.status
        name, event_id = "", 0
        async for raw in r.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("id: "):
                event_id = int(line[4:])
            elif line.startswith("data: "):
                events.append((event_id, name, json.loads(line[6:])))
                if stop_after is not None and len(events) >= stop_after:
                    break  # drop the connection mid-task
    return events


async def test_reconnect_with_last_event_id_misses_nothing(system: System) -> None:
    body = {
        "stable_diffusion_model": "tiny.safetensors",
        "prompt": "x",
        "steps": 40,
        "width": 128,
        "height": 128,
    }
    task_id = await system.submit(body)

    first = await _read(system, task_id, None, stop_after=3)
    assert 3 == len(first)
    rest = await _read(system, task_id, first[-1][0], stop_after=None)
    everything = await _read(system, task_id, None, stop_after=None)

    received = first + rest
    assert [e[0] for e in everything] == [e[0] for e in received], "no gap, no duplicate"
    assert "succeeded" == received[-1][1]
    assert list(range(1, 41)) == [e[2]["step"] for e in received if e[1] == "progress"]


async def _waiting_task(system: System, user: str = "default") -> str:
    """A task that stays waiting (stored, never queued): its event stream stays open."""
    document = task_document(user=user, model_name="tiny.safetensors", model_key="none-000000")
    await system.db["tasks"].insert_one(document)
    return str(document["_id"])


async def test_open_event_streams_are_capped_per_user_and_in_all(system: System) -> None:
    """Issue 15 item 4: no cap on open SSE streams (600 streams → 1.84 GB)."""
    keys = {"ann": "ann-key-0123456789ab", "ben": "ben-key-0123456789ab"}
    caps = {"max_sse_streams": 5, "max_sse_streams_per_user": 3}
    api_keys = [f"{user}:{key}" for user, key in keys.items()]
    tasks = {user: await _waiting_task(system, user) for user in keys}
    async with (
        extra_gateway(system, api_keys=api_keys, **caps) as url,
        contextlib.AsyncExitStack() as held,
    ):

        async def open_stream(user: str) -> int:
            response = await held.enter_async_context(
                system.http.get(
                    f"{url}/tasks/{tasks[user]}/events",
                    headers={"Authorization": f"Bearer {keys[user]}"},
                )
            )
            if response.status == 429:
                assert "Retry-After" in response.headers
                assert "too_many_streams" == (await response.json())["code"]
            return response.status

        assert [200, 200, 200, 429] == [await open_stream("ann") for _ in range(4)]
        assert [200, 200, 429] == [await open_stream("ben") for _ in range(3)]
        # Closed streams give their slots back (noticed at the next keep-alive, ≤ 5 s).
        await held.aclose()

        async def slot_back() -> bool:
            return await open_stream("ben") == 200

        await eventually(slot_back, "a closed stream's slot back", timeout_s=15, interval_s=0.5)


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_memory_per_open_event_stream(system: System, tmp_path: Path) -> None:
    """Issue 15 item 4: each open stream cost ~2 MB of gateway memory. Measured here on a
    gateway process of its own: RSS with 200 streams open, per stream."""
    port = free_port()
    settings = system.settings
    env = {
        **os.environ,
        "SDSWARM_NATS_URL": settings.nats_url,
        "SDSWARM_MONGODB_URL": settings.mongodb_url,
        "SDSWARM_MONGODB_DB": settings.mongodb_db,
        "SDSWARM_STORE_DIR": settings.store_dir,
        "SDSWARM_MODELS_DIR": settings.models_dir,
        "SDSWARM_PORT": str(port),
        "SDSWARM_MAX_SSE_STREAMS_PER_USER": "0",
    }
    log = (tmp_path / "gateway.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.gateway.app", env=env, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    streams = 200
    try:
        await serving(system.http, url, process)
        task_id = await _waiting_task(system)
        # Warm up (first stream, imports, connection pools), then measure.
        async with system.http.get(f"{url}/tasks/{task_id}/events") as response:
            assert 200 == response.status
        await asyncio.sleep(0.5)
        before = await asyncio.to_thread(_rss_bytes, process.pid)
        connector = aiohttp.TCPConnector(limit=0)
        async with (
            aiohttp.ClientSession(connector=connector) as http,
            contextlib.AsyncExitStack() as held,
        ):
            for _ in range(streams):
                response = await held.enter_async_context(http.get(f"{url}/tasks/{task_id}/events"))
                assert 200 == response.status
            await asyncio.sleep(1)
            during = await asyncio.to_thread(_rss_bytes, process.pid)
        await asyncio.sleep(2)
        after = await asyncio.to_thread(_rss_bytes, process.pid)
    finally:
        process.terminate()
        await process.wait()
        log.close()
    per_stream = (during - before) / streams
    print(
        f"gateway RSS {before / 2**20:.1f} MiB; with {streams} open event streams"
        f" {during / 2**20:.1f} MiB ({per_stream / 1024:.0f} KiB per stream);"
        f" after closing them {after / 2**20:.1f} MiB"
    )
    assert per_stream < 256 * 1024
