"""OpenAPI 3.1 for the gateway, generated from the msgspec Structs in ``proto/``.

Request bodies are the very Structs the gateway decodes with, so the document cannot
drift from the validation. Response shapes are declared here as Structs too. The route
table itself (:mod:`services.gateway.routes`) is what the app registers and what
:func:`build_document` describes. ``/docs`` renders the document as a plain HTML page
(no external scripts: it works offline).
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from proto import ModelStatus, ModelType, TaskKind, TaskStatus
from services.gateway.errors import Handler


class Error(msgspec.Struct, kw_only=True):
    code: str
    message: str
    field: str | None = None


class _Strict(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """A response the handler encodes from this very Struct: the document lists every field
    it can carry and no other (``additionalProperties: false``); fields with a default are
    left out when they have it."""


Body = msgspec.Struct | Sequence[msgspec.Struct] | dict[str, Any] | None
"""What a handler sends: a response Struct, a list of them, ``null``, or (A1111's
options alone) an open mapping."""


def _builtin(value: Any) -> Any:
    """What msgspec will not encode by itself: MongoDB's ``Int64`` (an ``int`` subclass
    that PyMongo returns for 64-bit integers, such as a 2 GiB file's size)."""
    if isinstance(value, int):
        return int(value)
    raise NotImplementedError(f"cannot encode {type(value).__name__} in a response")


_encoder = msgspec.json.Encoder(enc_hook=_builtin)


def respond(body: Body, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """Send a response Struct as JSON: what the document describes is what is sent."""
    return web.Response(
        body=_encoder.encode(body),
        status=status,
        headers=headers,
        content_type="application/json",
    )


class SubmitTaskResponse(_Strict):
    """A submission's answer: async, ``taskId`` and ``status`` (202); sync, the outcome
    (500 with ``code`` when it failed)."""

    taskId: str
    status: TaskStatus
    message: str | None = None
    ossUrl: list[str] | None = None
    images: list[str] | None = None
    code: str | None = None


class TaskResultResponse(_Strict):
    taskId: str
    status: TaskStatus
    images: list[str]
    ossUrl: list[str]
    parameters: dict[str, Any]
    info: dict[str, Any]
    message: str
    code: str | None


class ProgressState(_Strict):
    interrupted: bool
    skipped: bool
    job: str
    job_count: int
    job_no: int
    job_timestamp: str
    sampling_step: int
    sampling_steps: int


class TaskProgressResponse(_Strict):
    taskId: str
    status: TaskStatus
    progress: float
    etaRelative: float
    state: ProgressState
    currentImage: str
    """The live preview's object key ("" when there is none)."""
    currentImageUrl: str
    """A signed link to the preview ("" when there is none)."""
    message: str
    queuePosition: int | None = None
    """Waiting tasks: 1-based place among the checkpoint's waiting tasks."""
    coldStartSeconds: float | None = None
    """Waiting tasks with no worker loaded: the checkpoint's measured cold start."""


class A1111ImageResponse(_Strict):
    images: list[str]
    parameters: dict[str, Any]
    info: str


class LoginRequest(msgspec.Struct, kw_only=True):
    userName: str
    password: str


class LoginResponse(_Strict):
    token: str
    userName: str
    message: str


class Message(_Strict):
    message: str


class TaskSummary(_Strict):
    taskId: str
    status: TaskStatus
    kind: TaskKind
    model: str
    progress: float
    createdTime: str
    finishedTime: str | None
    message: str


class TaskList(_Strict):
    tasks: list[TaskSummary]
    nextCursor: str | None


class CancelResponse(_Strict):
    taskId: str
    status: TaskStatus
    message: str


class ModelAttributes(_Strict):
    """The seed's ``ModelAttributes`` plus sdswarm's fields (see ``registry.py``)."""

    type: ModelType
    name: str
    ossPath: str
    source: str
    etag: str
    status: ModelStatus
    registeredTime: str
    lastModificationTime: str
    family: str | None
    modelKey: str
    sha256: str | None
    sizeBytes: int | None
    error: str | None
    loadedWorkers: int
    draining: bool
    predictionType: str


class ModelChange(_Strict):
    message: str
    model: ModelAttributes | None = None


class ModelDeleted(_Strict):
    """``failedTasks`` after a delete; ``openTasks`` (202) when draining."""

    message: str
    failedTasks: int | None = None
    openTasks: int | None = None


class WebhookSecret(_Strict):
    secret: str


class WebhookFailure(_Strict):
    deliveryId: str
    taskId: str
    url: str
    event: str
    attempts: int
    error: str
    at: str


class DeadLetter(_Strict):
    id: str
    taskId: str | None
    subject: str
    advisory: str
    consumer: str
    deliveries: int
    at: str


class SeedOptionsRequest(msgspec.Struct, kw_only=True):
    data: dict[str, Any]


class SeedOptionsResponse(_Strict):
    message: str
    version: int


class Health(_Strict):
    status: str
    checks: dict[str, str]


class A1111Progress(_Strict):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None
    textinfo: str | None


class PngInfoRequest(msgspec.Struct, kw_only=True):
    image: str
    """Base64 PNG (a ``data:`` prefix is fine)."""


class PngInfoResponse(_Strict):
    info: str
    items: dict[str, str]
    parameters: dict[str, Any]


class A1111ExtrasResponse(_Strict):
    html_info: str
    image: str


class A1111ExtrasBatchResponse(_Strict):
    html_info: str
    images: list[str]


class Warming(_Strict):
    """``POST /models/{name}/warm`` (202): a worker is kept until ``warmUntil``."""

    message: str
    model: str
    functionName: str
    warmUntil: str
    coldStartSeconds: float | None
    """The last measured cold start (process start → ready), null until measured."""


Param = tuple[str, Any, str]
"""A query or header parameter: name, type, description."""
MODEL_TYPE: Param = ("type", ModelType, "model type (default stableDiffusion)")
TASK_HEADERS: tuple[Param, ...] = (
    ("taskId", str, "the task id to use ([A-Za-z0-9_-]{1,64}; an existing one → 409)"),
    ("Idempotency-Key", str, "the same key and body answer for the same task (48 h)"),
)
SUBMIT = "Request-Type: sync (default) waits for the outcome; async answers 202 at once"
NULL: Any = type(None)
"""A response body of JSON ``null`` (A1111's answer to option updates and refreshes)."""
A1111_OPTIONS = dict[str, Any]
"""A1111's settings: an open mapping of option name to value, on purpose (``GET`` and
``POST /sdapi/v1/options``); the one response that is no Struct."""


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    """aiohttp's path: ``{name}`` parameters, ``{name:regex}`` where they span slashes."""
    handler: Handler | None
    summary: str
    response: Any = None
    """The success body's type (None: none described)."""
    request: Any = None
    """The type the handler decodes the JSON body with: the very proto Struct."""
    status: int = 200
    query: tuple[Param, ...] = ()
    headers: tuple[Param, ...] = ()
    upload: bool = False
    """The body may also be the raw file (``application/octet-stream``)."""
    also: tuple[tuple[int, str], ...] = ()
    """Other statuses answered with the success body's type, and why: 500 when some
    named item failed (the seed's functions contract), 503 when a dependency is down."""


ERRORS = [
    ("400", "malformed"),
    ("401", "unauthorized"),
    ("404", "not found"),
    ("409", "conflict"),
    ("422", "invalid field"),
    ("429", "busy"),
]


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def openapi_path(path: str) -> str:
    """``/models/{model_name:.+}`` as OpenAPI writes it: ``/models/{model_name}``."""
    return re.sub(r"\{(\w+):[^}]*\}", r"{\1}", path)


def build_document(routes: list[Route]) -> dict[str, Any]:
    types: list[Any] = [Error]
    for route in routes:
        types += [t for t in (route.request, route.response) if t is not None]
        types += [t for _, t, _ in route.query + route.headers]
    schemas, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    schema_of = {id(t): schema for t, schema in zip(types, schemas, strict=True)}
    error = schema_of[id(Error)]
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        path = openapi_path(route.path)
        operation: dict[str, Any] = {"summary": route.summary, "responses": {}}
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in re.findall(r"\{(\w+)\}", path)
        ]
        for where, params in (("query", route.query), ("header", route.headers)):
            parameters += [
                {"name": name, "in": where, "description": about, "schema": schema_of[id(kind)]}
                for name, kind, about in params
            ]
        if parameters:
            operation["parameters"] = parameters
        if route.request is not None:
            content = _json(schema_of[id(route.request)])
            if route.upload:
                content["application/octet-stream"] = {
                    "schema": {"type": "string", "format": "binary"}
                }
            operation["requestBody"] = {"required": True, "content": content}
        ok: dict[str, Any] = {"description": "success"}
        if route.response is not None:
            ok["content"] = _json(schema_of[id(route.response)])
        operation["responses"][str(route.status)] = ok
        for status, reason in route.also:
            operation["responses"][str(status)] = {**ok, "description": reason}
        for code, why in ERRORS:
            operation["responses"][code] = {"description": why, "content": _json(error)}
        paths.setdefault(path, {})[route.method] = operation
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


def render_docs(document: dict[str, Any]) -> str:
    """The document as a plain HTML page (no scripts: it works offline)."""
    rows = []
    for path, operations in document["paths"].items():
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
    return page
