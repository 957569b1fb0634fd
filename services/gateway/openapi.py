"""OpenAPI 3.1 for the gateway, generated from the msgspec Structs in ``proto/``.

Request bodies are the very Structs the gateway decodes with, so the document cannot
drift from the validation. Response shapes are declared here as Structs too. ``/docs``
renders the document as a plain HTML page (no external scripts: it works offline).
"""

from __future__ import annotations

import html
from typing import Any

import msgspec
from aiohttp import web

from proto.requests import (
    ExtraBatchImagesRequest,
    ExtraImagesRequest,
    Img2ImgRequest,
    Txt2ImgRequest,
)


class Error(msgspec.Struct, kw_only=True):
    code: str
    message: str
    field: str | None = None


class SubmitTaskResponse(msgspec.Struct, kw_only=True):
    taskId: str
    status: str
    ossUrl: list[str] = []
    images: list[str] = []
    message: str = ""


class TaskResultResponse(msgspec.Struct, kw_only=True):
    taskId: str
    status: str
    images: list[str]
    ossUrl: list[str]
    parameters: dict[str, Any]
    info: dict[str, Any]
    message: str
    code: str | None = None


class ProgressState(msgspec.Struct, kw_only=True):
    interrupted: bool
    skipped: bool
    job: str
    job_count: int
    job_no: int
    job_timestamp: str
    sampling_step: int
    sampling_steps: int


class TaskProgressResponse(msgspec.Struct, kw_only=True):
    taskId: str
    status: str
    progress: float
    etaRelative: float
    state: ProgressState
    currentImage: str
    message: str
    queuePosition: int | None = None


class A1111ImageResponse(msgspec.Struct, kw_only=True):
    images: list[str]
    parameters: dict[str, Any]
    info: str


class LoginRequest(msgspec.Struct, kw_only=True):
    userName: str
    password: str


class LoginResponse(msgspec.Struct, kw_only=True):
    token: str
    userName: str
    message: str


_TYPES: list[type[msgspec.Struct]] = [
    Txt2ImgRequest, Img2ImgRequest, ExtraImagesRequest, ExtraBatchImagesRequest, Error,
    SubmitTaskResponse,
    TaskResultResponse, TaskProgressResponse, A1111ImageResponse, LoginRequest, LoginResponse,
]  # fmt: skip

# (method, path, summary, request body, success status, response, extra parameters)
_ROUTES: list[tuple[str, str, str, str | None, int, str | None]] = [
    (
        "post",
        "/txt2img",
        "Generate from text (Request-Type: sync|async)",
        "Txt2ImgRequest",
        200,
        "SubmitTaskResponse",
    ),
    (
        "post",
        "/img2img",
        "Generate from images (Request-Type: sync|async)",
        "Img2ImgRequest",
        200,
        "SubmitTaskResponse",
    ),
    (
        "post",
        "/extra_images",
        "Upscale an image as a task (Request-Type: sync|async)",
        "ExtraImagesRequest",
        200,
        "SubmitTaskResponse",
    ),
    ("get", "/tasks/{taskId}/result", "A task's result", None, 200, "TaskResultResponse"),
    ("get", "/tasks/{taskId}/progress", "A task's progress", None, 200, "TaskProgressResponse"),
    ("get", "/tasks/{taskId}/events", "A task's events (text/event-stream)", None, 200, None),
    ("post", "/tasks/{taskId}/cancellation", "Cancel a task", None, 202, None),
    ("get", "/tasks", "The caller's tasks", None, 200, None),
    ("post", "/login", "Log in", "LoginRequest", 200, "LoginResponse"),
    ("post", "/options", "Store the caller's options snapshot", None, 200, None),
    ("get", "/models", "Registered models", None, 200, None),
    ("get", "/models/{model_name}", "One registered model", None, 200, None),
    ("get", "/healthz", "Health of NATS, MongoDB and the object store", None, 200, None),
    ("post", "/sdapi/v1/txt2img", "A1111 txt2img", "Txt2ImgRequest", 200, "A1111ImageResponse"),
    ("post", "/sdapi/v1/img2img", "A1111 img2img", "Img2ImgRequest", 200, "A1111ImageResponse"),
    ("post", "/sdapi/v1/extra-single-image", "A1111 extras", "ExtraImagesRequest", 200, None),
    (
        "post",
        "/sdapi/v1/extra-batch-images",
        "A1111 extras, several images",
        "ExtraBatchImagesRequest",
        200,
        None,
    ),
    ("get", "/sdapi/v1/upscalers", "A1111 upscalers", None, 200, None),
    ("get", "/sdapi/v1/progress", "A1111 progress of the caller's task", None, 200, None),
    ("post", "/sdapi/v1/interrupt", "A1111 interrupt of the caller's task", None, 200, None),
    ("get", "/sdapi/v1/options", "A1111 options", None, 200, None),
    ("post", "/sdapi/v1/options", "A1111 options update", None, 200, None),
    ("get", "/sdapi/v1/sd-models", "A1111 checkpoints", None, 200, None),
    ("get", "/sdapi/v1/samplers", "A1111 samplers", None, 200, None),
    ("get", "/sdapi/v1/schedulers", "A1111 schedule types", None, 200, None),
]


def build_document() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(
        _TYPES, ref_template="#/components/schemas/{name}"
    )
    error = {"$ref": "#/components/schemas/Error"}
    paths: dict[str, dict[str, Any]] = {}
    for method, path, summary, request, status, response in _ROUTES:
        operation: dict[str, Any] = {"summary": summary, "responses": {}}
        parameters = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in ("taskId", "model_name")
            if "{" + p + "}" in path
        ]
        if parameters:
            operation["parameters"] = parameters
        if request:
            operation["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{request}"}}
                },
            }
        ok: dict[str, Any] = {"description": "success"}
        if response:
            ok["content"] = {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{response}"}}
            }
        operation["responses"][str(status)] = ok
        for code, why in [
            ("400", "malformed"),
            ("401", "unauthorized"),
            ("404", "not found"),
            ("409", "conflict"),
            ("422", "invalid field"),
            ("429", "busy"),
        ]:
            operation["responses"][code] = {
                "description": why,
                "content": {"application/json": {"schema": error}},
            }
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "sdswarm",
            "version": "0.1.0",
            "description": "Serverless-style Stable Diffusion API",
        },
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "token": {"type": "apiKey", "in": "header", "name": "token"},
            },
        },
        "security": [{"bearer": []}, {"token": []}, {}],
        "paths": paths,
    }


_DOCUMENT = build_document()


async def openapi_json(request: web.Request) -> web.StreamResponse:
    return web.json_response(_DOCUMENT)


async def docs(request: web.Request) -> web.StreamResponse:
    rows = []
    for path, operations in _DOCUMENT["paths"].items():
        for method, operation in operations.items():
            rows.append(
                f"<tr><td><code>{method.upper()}</code></td><td><code>{html.escape(path)}"
                f"</code></td><td>{html.escape(operation['summary'])}</td></tr>"
            )
    page = (
        "<!doctype html><meta charset=utf-8><title>sdswarm API</title>"
        "<style>body{font-family:sans-serif;margin:2em}td{padding:.2em .8em}</style>"
        "<h1>sdswarm API</h1><p>Machine-readable: <a href=/openapi.json>/openapi.json</a>"
        " (OpenAPI 3.1).</p><table>" + "".join(rows) + "</table>"
    )
    return web.Response(text=page, content_type="text/html")
