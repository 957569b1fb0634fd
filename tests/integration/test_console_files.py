"""The console's files as the gateway serves them: the page, its modules, its policy."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from services.common.servers import free_port
from services.gateway import console

pytestmark = pytest.mark.integration


@pytest.fixture
async def url() -> AsyncIterator[str]:
    app = web.Application()
    console.add_routes(app)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_page_and_every_module_it_imports_are_served_under_the_policy(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/") as response:
            assert 200 == response.status
            assert "text/html" == response.content_type
            assert console.CSP == response.headers["Content-Security-Policy"]
            assert "nosniff" == response.headers["X-Content-Type-Options"]
            page = await response.text()
        # The page's own files, and every module they import, exist (no build step, no CDN).
        wanted = re.findall(r'(?:src|href)="(/console/[^"]+)"', page)
        assert {"/console/app.js", "/console/console.css"} == set(wanted)
        seen: set[str] = set()
        while wanted:
            path = wanted.pop()
            if path in seen:
                continue
            seen.add(path)
            async with http.get(f"{url}{path}") as response:
                assert 200 == response.status, path
                assert console.CSP == response.headers["Content-Security-Policy"]
                text = await response.text()
            if path.endswith(".js"):
                # ES modules run only when served as JavaScript.
                assert response.content_type in ("text/javascript", "application/javascript")
                wanted += [f"/console/{name}" for name in re.findall(r'from "\./([^"]+)"', text)]
        assert len(seen) >= 9, seen
        assert not any("http" in path for path in seen)


async def test_nothing_outside_the_console_folder_is_served(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        for path in ("/console/../console.py", "/console/%2e%2e/console.py", "/console/nope.js"):
            async with http.get(f"{url}{path}") as response:
                assert response.status in (403, 404), path
