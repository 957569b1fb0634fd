"""The gateway's metrics: ``GET /metrics``, and a middleware that times requests and
counts error answers by code.

``/metrics`` on the API port is for administrators (``SDSWARM_ADMINS``; with
authentication off, which only loopback allows, for everyone): Prometheus scrapes it
with an admin's API key as a bearer token. ``SDSWARM_METRICS_PORT`` adds a listener of
its own without authentication, for networks where only Prometheus reaches it. No
metric names a user (services/common/metrics.py).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from aiohttp import web

from services.common import metrics
from services.gateway.auth import require_admin
from services.gateway.errors import HTTP_ERROR_CODES, ApiError, Handler
from services.gateway.resources import SETTINGS


async def metrics_route(request: web.Request) -> web.StreamResponse:
    await require_admin(request, "read metrics")
    return await metrics.metrics_response(request)


def _route(request: web.Request) -> str:
    """The route's pattern (``/tasks/{task_id}/result``), never the path a client sent."""
    info = request.match_info
    resource = info.route.resource if info.http_exception is None else None
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def observe_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Inside the error middleware: sees the errors before they become answers."""
    started = time.monotonic()
    try:
        return await handler(request)
    except ApiError as exc:
        metrics.API_ERRORS.labels(exc.code, str(exc.status)).inc()
        raise
    except web.HTTPException as exc:
        if exc.status >= 400:
            code = HTTP_ERROR_CODES.get(exc.status, "http_error")
            metrics.API_ERRORS.labels(code, str(exc.status)).inc()
        raise
    except Exception:
        metrics.API_ERRORS.labels("internal", "500").inc()
        raise
    finally:
        elapsed = time.monotonic() - started
        metrics.REQUEST_SECONDS.labels(request.method, _route(request)).observe(elapsed)


async def metrics_listener(app: web.Application) -> AsyncIterator[None]:
    """``SDSWARM_METRICS_PORT``: a listener of its own beside the API port."""
    async with metrics.listening(app[SETTINGS], "gateway metrics"):
        yield


def add_listener(app: web.Application) -> None:
    """The separate metrics listener, when ``metrics_port`` asks for one."""
    if app[SETTINGS].metrics_port:
        app.cleanup_ctx.append(metrics_listener)
