"""The web console: static files (plain HTML, CSS and ES modules) served at ``/``.

The page is a client of the public HTTP API and nothing more: it signs in with
``POST /login`` (or takes an API key), then calls the same routes as any client with
``Authorization: Bearer``. Serving it needs no credentials; everything it shows does.
No build step and no CDN: the files under ``console/`` are what the browser runs.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

FOLDER = Path(__file__).parent / "console"
CSP = "; ".join(
    [
        "default-src 'self'",
        # Result images are presigned links, which may point at an S3 endpoint elsewhere.
        "img-src 'self' data: blob: http: https:",
        "connect-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
"""The page runs only its own files and talks only to its own origin."""


async def _headers(request: web.Request, response: web.StreamResponse) -> None:
    if request.path == "/" or request.path.startswith("/console/"):
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        # Fresh files after an upgrade; they are small and served from memory by the OS.
        response.headers["Cache-Control"] = "no-cache"


async def index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(FOLDER / "index.html")


PATHS = frozenset({"/", "/console"})
"""What :func:`add_routes` serves (left out of the OpenAPI document)."""


def add_routes(app: web.Application) -> None:
    app.on_response_prepare.append(_headers)
    app.router.add_get("/", index)
    app.router.add_static("/console/", FOLDER, follow_symlinks=False)
