"""Users from the CLI, the seed's login, session tokens and API keys."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from aiohttp import web

from services.common.servers import free_port
from services.gateway.app import create_app
from tests.e2e.conftest import System

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("system", ["local"], indirect=True)]

PASSWORD = "correct horse battery"


async def _cli(system: System, *args: str, stdin: str = "") -> tuple[int, str]:
    env = {
        **os.environ,
        "SDSWARM_MONGODB_URL": system.settings.mongodb_url,
        "SDSWARM_MONGODB_DB": system.settings.mongodb_db,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        "users",
        *args,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate(stdin.encode())
    assert process.returncode is not None
    return process.returncode, out.decode().strip()


@pytest.fixture
async def authed_url(system: System) -> AsyncIterator[str]:
    port = free_port()
    settings = msgspec.structs.replace(system.settings, port=port, auth=True, session_ttl_s=60)
    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def _login(system: System, url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with system.http.post(f"{url}/login", json=body) as response:
        return response.status, await response.json()


async def test_cli_users_login_tokens_and_keys(system: System, authed_url: str) -> None:
    assert (0, "user carol created") == await _cli(system, "add", "carol", stdin=PASSWORD + "\n")
    code, out = await _cli(system, "add", "carol", stdin=PASSWORD + "\n")
    assert (1, "error: user 'carol' exists") == (code, out)
    assert (1, "error: passwords need at least 8 characters") == await _cli(
        system, "add", "dave", stdin="short\n"
    )
    assert "carol" in (await _cli(system, "ls"))[1].splitlines()

    assert 401 == (await _login(system, authed_url, {"userName": "carol", "password": "nope"}))[0]
    assert 401 == (await _login(system, authed_url, {"userName": "eve", "password": PASSWORD}))[0]
    # The seed's clients send UserName/Password.
    status, session = await _login(system, authed_url, {"UserName": "carol", "Password": PASSWORD})
    assert (200, "carol", "login success") == (status, session["userName"], session["message"])

    body = {
        "stable_diffusion_model": "tiny.safetensors",
        "prompt": "x",
        "steps": 2,
        "width": 64,
        "height": 64,
    }
    async with system.http.post(f"{authed_url}/txt2img", json=body) as response:
        assert 401 == response.status
    # The seed document's request example: token header, Request-Type sync.
    headers = {"token": session["token"], "Request-Type": "sync"}
    async with system.http.post(f"{authed_url}/txt2img", json=body, headers=headers) as response:
        result = await response.json()
    assert (200, "succeeded") == (response.status, result["status"])
    assert result["images"][0].startswith("images/carol/")

    code, key = await _cli(system, "key", "carol", "--label", "ci")
    assert 0 == code
    async with system.http.get(
        f"{authed_url}/tasks/{result['taskId']}/result", headers={"Authorization": f"Bearer {key}"}
    ) as response:
        assert 200 == response.status

    assert (0, "user carol removed") == await _cli(system, "rm", "carol")
    for secret in (session["token"], key):
        async with system.http.get(f"{authed_url}/tasks", headers={"token": secret}) as response:
            assert 401 == response.status
