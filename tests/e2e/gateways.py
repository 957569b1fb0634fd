"""A second gateway on a running test system, with other settings."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from aiohttp import web

from services.common.servers import free_port
from services.gateway.app import create_app
from tests.system import System


@contextlib.asynccontextmanager
async def extra_gateway(system: System, **settings: Any) -> AsyncIterator[str]:
    """Another gateway on the same system with ``settings`` changed; its URL."""
    port = free_port()
    changed = msgspec.structs.replace(system.settings, port=port, **settings)
    runner = web.AppRunner(create_app(changed))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
