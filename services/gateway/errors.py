"""The gateway's error taxonomy and its one translation point (a middleware).

Handlers raise :class:`ApiError`; the middleware turns it, aiohttp's HTTP errors and
any unexpected exception into ``{"code", "message", "field"?}`` JSON with the right
status. An unexpected exception is logged with its traceback and answers 500 without
internals.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
HTTP_ERROR_CODES = {413: "body_too_large", 404: "not_found", 405: "method_not_allowed"}
"""The ``code`` of aiohttp's own HTTP errors (any other: ``http_error``)."""


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}

    def body(self) -> dict[str, str]:
        out = {"code": self.code, "message": self.message}
        if self.field is not None:
            out["field"] = self.field
        return out


def too_many(code: str, reason: str, retry_after_s: int) -> ApiError:
    """A 429 that says when to come back."""
    return ApiError(429, code, reason, headers={"Retry-After": str(retry_after_s)})


_PATH_RE = re.compile(r"at `\$\.?([^`]*)`")


def invalid_body(exc: msgspec.DecodeError) -> ApiError:
    """msgspec errors → 400 (not JSON) or 422 (JSON that breaks a rule), naming the field."""
    text = str(exc)
    if not isinstance(exc, msgspec.ValidationError):
        return ApiError(400, "invalid_json", f"request body is not valid JSON: {text}")
    match = _PATH_RE.search(text)
    field = match.group(1) if match else None
    if field is None and text.startswith("Object missing required field"):
        field = text.split("`")[1]
    return ApiError(422, "invalid_field", text, field=field or None)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return web.json_response(exc.body(), status=exc.status, headers=exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = HTTP_ERROR_CODES.get(exc.status, "http_error")
        return web.json_response({"code": code, "message": exc.reason}, status=exc.status)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return web.json_response({"code": "internal", "message": "internal error"}, status=500)
