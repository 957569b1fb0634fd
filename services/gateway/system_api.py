"""The gateway's own routes: its health and the local object store's signed downloads."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from services.gateway.errors import ApiError
from services.gateway.openapi import Health, respond
from services.gateway.resources import resources
from services.gateway.validation import bounded_int
from services.storage.objects import LocalObjectStore, ObjectNotFoundError

MAX_EXPIRES = 10**11
"""A signed link's expiry (Unix seconds) is below this (the year 5138)."""


async def healthz(request: web.Request) -> web.StreamResponse:
    """200 only when NATS, MongoDB and the object store all answer."""
    res = resources(request)
    checks: dict[str, str] = {}

    async def probe(name: str, check: Any) -> None:
        try:
            await asyncio.wait_for(check, 3)
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"error: {type(exc).__name__}: {exc}"

    await asyncio.gather(
        probe("nats", res.nc.flush(timeout=2)),
        probe("mongodb", res.mongo.admin.command("ping")),
        probe("objects", res.objects.ping()),
    )
    healthy = all(v == "ok" for v in checks.values())
    return respond(
        Health(status="ok" if healthy else "unavailable", checks=checks),
        200 if healthy else 503,
    )


async def download(request: web.Request) -> web.StreamResponse:
    """Signed download links of the local-folder object store."""
    res = resources(request)
    if not isinstance(res.objects, LocalObjectStore):
        raise ApiError(404, "not_found", "downloads are served by the object store")
    key = request.match_info["key"]
    if "expires" not in request.query:
        raise ApiError(403, "invalid_signature", "the link is invalid or has expired")
    expires = bounded_int(request.query["expires"], "expires", 0, MAX_EXPIRES)
    if not res.objects.verify(key, expires, request.query.get("signature", "")):
        raise ApiError(403, "invalid_signature", "the link is invalid or has expired")
    try:
        path = await res.objects.file(key)
    except (ObjectNotFoundError, ValueError) as exc:
        raise ApiError(404, "not_found", "no such object") from exc
    # Streamed from the file (sendfile), with Range, ETag and Last-Modified.
    return web.FileResponse(path, headers={"X-Content-Type-Options": "nosniff"})
