"""The gateway: ``create_app(settings)`` and the routes it serves."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from services.common import bus
from services.gateway import (
    console,
    controlnet_api,
    extras_api,
    functions,
    openapi,
    registry,
    sdapi,
    tasks_api,
    waiting,
    webhooks_api,
)
from services.gateway.auth import announce, auth_enabled, login, parse_api_keys
from services.gateway.errors import ApiError, error_middleware
from services.gateway.resources import RESOURCES, SETTINGS, Resources, StreamSlots, resources
from services.gateway.settings import GatewaySettings
from services.gateway.validation import bounded_int
from services.storage.idempotency import IdempotencyStore
from services.storage.models import ModelStore
from services.storage.mongo import database, open_client
from services.storage.objects import LocalObjectStore, ObjectNotFoundError, open_object_store
from services.storage.options import OptionStore
from services.storage.quotas import LoginThrottle, QuotaStore
from services.storage.tasks import TaskStore
from services.storage.users import UserStore

log = logging.getLogger(__name__)
MAX_EXPIRES = 10**11
"""A signed link's expiry (Unix seconds) is below this (the year 5138)."""


async def _open_resources(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    async with contextlib.AsyncExitStack() as stack:
        nc = await bus.connect(settings.nats_url, "sdswarm-gateway", settings)
        stack.push_async_callback(nc.drain)
        js = nc.jetstream()
        await bus.ensure_streams(js, settings)
        mongo = open_client(settings.mongodb_url)
        stack.push_async_callback(mongo.close)
        db = database(mongo, settings.mongodb_db)
        tasks, models, users = TaskStore(db), ModelStore(db), UserStore(db)
        await users.ensure_indexes()
        idempotency = IdempotencyStore(db)
        await idempotency.ensure_indexes()
        quotas = QuotaStore(db)
        await quotas.ensure_indexes()
        logins = LoginThrottle(db)
        await logins.ensure_indexes()
        await tasks.ensure_indexes()
        await models.ensure_indexes()
        objects = await open_object_store(settings)
        stack.push_async_callback(objects.aclose)
        app[RESOURCES] = Resources(
            settings=settings,
            options=OptionStore(db),
            idempotency=idempotency,
            quotas=quotas,
            nc=nc,
            js=js,
            mongo=mongo,
            tasks=tasks,
            models=models,
            objects=objects,
            cancels=await bus.cancel_bucket(js, settings),
            api_keys=parse_api_keys(settings.api_keys),
            users=users,
            logins=logins,
            password_checks=asyncio.Semaphore(max(settings.password_checks, 1)),
            streams=StreamSlots(settings.max_sse_streams, settings.max_sse_streams_per_user),
            auth=auth_enabled(settings),
        )
        yield


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
    return web.json_response(
        {"status": "ok" if healthy else "unavailable", "checks": checks},
        status=200 if healthy else 503,
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
        data = await res.objects.get(key)
    except (ObjectNotFoundError, ValueError) as exc:
        raise ApiError(404, "not_found", "no such object") from exc
    content_type = "image/png" if key.endswith(".png") else "application/octet-stream"
    return web.Response(body=data, content_type=content_type)


def create_app(settings: GatewaySettings) -> web.Application:
    announce(settings)
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_open_resources)
    app.router.add_post("/login", login)
    app.router.add_post("/txt2img", tasks_api.txt2img)
    app.router.add_post("/img2img", tasks_api.img2img)
    app.router.add_get("/tasks", tasks_api.list_tasks)
    app.router.add_get("/tasks/{task_id}/result", tasks_api.task_result)
    app.router.add_get("/tasks/{task_id}/progress", tasks_api.task_progress)
    app.router.add_get("/tasks/{task_id}/events", waiting.task_events)
    app.router.add_post("/tasks/{task_id}/cancellation", tasks_api.cancel_task)
    registry.add_routes(app)
    webhooks_api.add_routes(app)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/openapi.json", openapi.openapi_json)
    app.router.add_get("/docs", openapi.docs)
    sdapi.add_routes(app)
    extras_api.add_routes(app)
    controlnet_api.add_routes(app)
    functions.add_routes(app)
    app.router.add_get("/files/{key:.+}", download)
    console.add_routes(app)
    return app


def main() -> None:
    from services.common.settings import from_environ

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = from_environ(GatewaySettings)
    web.run_app(create_app(settings), host=settings.host, port=settings.port)


if __name__ == "__main__":
    main()
