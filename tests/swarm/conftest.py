"""The stack on a live one-node swarm, deployed once for every test in tests/swarm.

Selected only with ``-m swarm`` (``make test-swarm``): it installs and starts a Docker
engine, builds images and deploys the stack, which takes minutes and root.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest

from tests.swarm import engine
from tests.system import System

GATEWAY = "http://127.0.0.1:7860"
IDLE_TIMEOUT_S = 20
ACK_WAIT_S = 15


@dataclass
class Stack:
    url: str
    http: aiohttp.ClientSession

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        async with self.http.request(method, self.url + path, **kwargs) as response:
            text = await response.text()
            try:
                return response.status, json.loads(text)
            except ValueError:
                return response.status, text

    async def submit(self, body: dict[str, Any]) -> str:
        status, answer = await self.call(
            "POST", "/txt2img", json=body, headers={"Request-Type": "async"}
        )
        assert 202 == status, answer
        task_id: str = answer["taskId"]
        return task_id

    async def events(self, task_id: str) -> list[tuple[str, dict[str, Any]]]:
        """The task's SSE stream read to its end: (event, data) pairs (the e2e reader:
        it needs only ``url`` and ``http``)."""
        return await System.events(cast(System, self), task_id)

    async def status(self, task_id: str) -> str:
        _, answer = await self.call("GET", f"/tasks/{task_id}/progress")
        return str(answer.get("status", ""))


async def _healthy(http: aiohttp.ClientSession) -> bool:
    try:
        async with http.get(f"{GATEWAY}/healthz") as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False


@pytest.fixture(scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    logs = tmp_path_factory.mktemp("swarm")
    started = time.monotonic()
    await asyncio.to_thread(engine.ensure_engine, logs)
    await asyncio.to_thread(engine.ensure_base_image)
    await asyncio.to_thread(engine.ensure_wheelhouse)
    await asyncio.to_thread(engine.build_images)
    await asyncio.to_thread(engine.remove_stack)  # a run that was cut off
    api_key = secrets.token_urlsafe(24)
    await asyncio.to_thread(engine.create_secrets, api_key)
    deploy_started = time.monotonic()
    env = {
        "DOCKER_API_VERSION": engine.api_version(),
        # CPU workers on this one node: no GPU resources, no gpu label.
        "SWARM_GPUS": "0",
        "WORKER_CONSTRAINTS": "",
        "WORKER_DEVICE": "cpu",
        "GPU_SLOTS": "2",
        "IDLE_TIMEOUT_S": str(IDLE_TIMEOUT_S),
        "ACK_WAIT_S": str(ACK_WAIT_S),
        "ADMINS": "admin",
        # This kernel has no IPVS (CONFIG_IP_VS unset): no virtual IPs, no routing mesh.
        "ENDPOINT_MODE": "dnsrr",
        "PUBLISH_MODE": "host",
        "GATEWAY_REPLICAS": "1",
    }
    await asyncio.to_thread(engine.deploy, env)
    headers = {"Authorization": f"Bearer {api_key}"}
    timeout = aiohttp.ClientTimeout(total=600, sock_read=300)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as http:
        deadline = time.monotonic() + 300
        while not await _healthy(http):
            assert time.monotonic() < deadline, engine.sh("docker", "service", "ls")
            await asyncio.sleep(2)
        engine.FIGURES["stack_deploy_s"] = round(time.monotonic() - deploy_started, 1)
        yield Stack(GATEWAY, http)
    await asyncio.to_thread(engine.remove_stack)  # (done already when the last test ran)
    engine.FIGURES["total_s"] = round(time.monotonic() - started, 1)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if engine.FIGURES:
        terminalreporter.section("swarm figures")
        for name, value in engine.FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")
        out = Path("build")
        out.mkdir(exist_ok=True)
        (out / "swarm-figures.json").write_text(json.dumps(engine.FIGURES, indent=1))
