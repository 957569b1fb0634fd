"""A 2 GiB model upload streams through the gateway: its peak memory stays flat.

The gateway runs as its own process (``sdswarm gateway``) so its peak RSS (``VmHWM``)
is its alone; the file is a valid safetensors file the test writes sparsely.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import struct
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.common.servers import free_port
from tests.waiting import serving

pytestmark = pytest.mark.integration

SIZE = 2 * 1024**3
CHUNK = 4 * 1024 * 1024
PEAK_GROWTH_LIMIT = 150 * 1024**2
"""Peak RSS over the idle gateway's: the chunks in flight, never the file."""


def _sparse_safetensors(path: Path, data_bytes: int) -> None:
    """One U8 tensor named like a LoRA weight, all zeros, written without using disk."""
    header = json.dumps(
        {
            "big.lora_down.weight": {
                "dtype": "U8",
                "shape": [data_bytes],
                "data_offsets": [0, data_bytes],
            }
        }
    ).encode()
    header += b" " * (-len(header) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header)
        handle.truncate(8 + len(header) + data_bytes)


def _memory(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


@pytest.fixture
async def gateway(
    tmp_path: Path, nats_server: Any, mongo_server: Any
) -> AsyncIterator[tuple[str, int, Path]]:
    port = free_port()
    models = tmp_path / "models"
    env = {
        **os.environ,
        "SDSWARM_PORT": str(port),
        "SDSWARM_NATS_URL": nats_server.url,
        "SDSWARM_MONGODB_URL": mongo_server.url,
        "SDSWARM_MONGODB_DB": f"upload_{port}",
        "SDSWARM_STORE_DIR": str(tmp_path / "objects"),
        "SDSWARM_MODELS_DIR": str(models),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "gateway", env=env
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            await serving(http, url, process)
        yield url, process.pid, models
    finally:
        process.terminate()
        await process.wait()


async def test_two_gib_upload_keeps_gateway_memory_flat(
    gateway: tuple[str, int, Path], tmp_path: Path
) -> None:
    url, pid, models = gateway
    source = tmp_path / "big.safetensors"
    await asyncio.to_thread(_sparse_safetensors, source, SIZE)
    size = (await asyncio.to_thread(source.stat)).st_size
    digest = hashlib.sha256()
    before = _memory(pid)

    async def chunks() -> AsyncIterator[bytes]:
        handle = await asyncio.to_thread(source.open, "rb")
        try:
            while chunk := await asyncio.to_thread(handle.read, CHUNK):
                digest.update(chunk)
                yield chunk
        finally:
            handle.close()

    started = time.monotonic()
    async with (
        aiohttp.ClientSession() as http,
        http.put(
            f"{url}/models/big?type=lora",
            data=chunks(),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            timeout=aiohttp.ClientTimeout(total=600),
        ) as response,
    ):
        body = await response.json()
        assert 201 == response.status, body
    seconds = time.monotonic() - started
    after = _memory(pid)
    growth = after["VmHWM"] - before["VmRSS"]
    print(
        f"2 GiB upload: {seconds:.1f} s ({size / seconds / 2**20:.0f} MiB/s); gateway RSS"
        f" {before['VmRSS'] / 2**20:.0f} MiB idle, peak {after['VmHWM'] / 2**20:.0f} MiB"
    )
    assert digest.hexdigest() == body["model"]["sha256"]
    assert size == body["model"]["sizeBytes"]
    assert growth < PEAK_GROWTH_LIMIT, f"peak RSS grew by {growth / 2**20:.0f} MiB"
    assert size == (models / "Lora" / "big.safetensors").stat().st_size
