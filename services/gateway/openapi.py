"""OpenAPI 3.1 for the gateway, generated from the msgspec Structs in ``proto/``.

Request bodies are the very Structs the gateway decodes with, so the document cannot
drift from the validation. Response shapes are declared here as Structs too. Every route
the app registers is listed in ``ROUTES`` (a unit test walks the router). ``/docs``
renders the document as a plain HTML page (no external scripts: it works offline).
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from aiohttp import web
from msgspec import Meta

from proto import ModelStatus, ModelType, TaskStatus
from proto.controlnet import DetectRequest, DetectResponse
from proto.requests import (
    BatchUpdateSdResourceRequest,
    DeleteFunctionsRequest,
    ExtraBatchImagesRequest,
    ExtraImagesRequest,
    Img2ImgRequest,
    RegisterModelRequest,
    Txt2ImgRequest,
    WarmModelRequest,
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


class Message(msgspec.Struct, kw_only=True):
    message: str


class TaskSummary(msgspec.Struct, kw_only=True):
    taskId: str
    status: str
    kind: str
    model: str
    progress: float
    createdTime: str
    finishedTime: str | None
    message: str


class TaskList(msgspec.Struct, kw_only=True):
    tasks: list[TaskSummary]
    nextCursor: str | None


class CancelResponse(msgspec.Struct, kw_only=True):
    taskId: str
    status: str
    message: str


class ModelAttributes(msgspec.Struct, kw_only=True):
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


class ModelChange(msgspec.Struct, kw_only=True):
    message: str
    model: ModelAttributes | None = None


class ModelDeleted(msgspec.Struct, kw_only=True):
    """``failedTasks`` after a delete; ``openTasks`` (202) when draining."""

    message: str
    failedTasks: int | None = None
    openTasks: int | None = None


class WebhookSecret(msgspec.Struct, kw_only=True):
    secret: str


class WebhookFailure(msgspec.Struct, kw_only=True):
    deliveryId: str
    taskId: str
    url: str
    event: str
    attempts: int
    error: str
    at: str


class DeadLetter(msgspec.Struct, kw_only=True):
    id: str
    taskId: str | None
    subject: str
    advisory: str
    consumer: str
    deliveries: int
    at: str


class SeedOptionsRequest(msgspec.Struct, kw_only=True):
    data: dict[str, Any]


class SeedOptionsResponse(msgspec.Struct, kw_only=True):
    message: str
    version: int


class Health(msgspec.Struct, kw_only=True):
    status: str
    checks: dict[str, str]


class A1111Progress(msgspec.Struct, kw_only=True):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None
    textinfo: str | None


class PngInfoRequest(msgspec.Struct, kw_only=True):
    image: str
    """Base64 PNG (a ``data:`` prefix is fine)."""


class PngInfoResponse(msgspec.Struct, kw_only=True):
    info: str
    items: dict[str, str]
    parameters: dict[str, Any]


class A1111ExtrasResponse(msgspec.Struct, kw_only=True):
    html_info: str
    image: str


class A1111ExtrasBatchResponse(msgspec.Struct, kw_only=True):
    html_info: str
    images: list[str]


class FunctionsList(msgspec.Struct, kw_only=True):
    status: str
    functions: list[dict[str, Any]]
    errMsg: str


class FunctionsChange(msgspec.Struct, kw_only=True):
    """``status: fail`` (HTTP 500, as the seed answers) when a named function failed."""

    status: str
    functions: list[dict[str, Any]] = []
    failFuncList: list[dict[str, Any]] = []
    fails: list[dict[str, Any]] = []
    errMsg: str = ""


class Warming(msgspec.Struct, kw_only=True):
    """``POST /models/{name}/warm`` (202): a worker is kept until ``warmUntil``."""

    message: str
    model: str
    functionName: str
    warmUntil: str
    coldStartSeconds: float | None = None
    """The last measured cold start (process start → ready), null until measured."""


Param = tuple[str, Any, str]
"""A query or header parameter: name, type, description."""
MODEL_TYPE: Param = ("type", ModelType, "model type (default stableDiffusion)")
TASK_HEADERS: tuple[Param, ...] = (
    ("taskId", str, "the task id to use ([A-Za-z0-9_-]{1,64}; an existing one → 409)"),
    ("Idempotency-Key", str, "the same key and body answer for the same task (48 h)"),
)
SUBMIT = "Request-Type: sync (default) waits for the outcome; async answers 202 at once"
A1111_LIST = list[dict[str, Any]]
A1111_OBJECT = dict[str, Any]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
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
    partial_failure: bool = False
    """500 with the same body when some named item failed (the seed's contract)."""


ROUTES: list[Route] = [
    Route("post", "/login", "Log in", LoginResponse, LoginRequest),
    Route(
        "post", "/txt2img", f"Generate from text. {SUBMIT}", SubmitTaskResponse, Txt2ImgRequest,
        headers=TASK_HEADERS,
    ),
    Route(
        "post", "/img2img", f"Generate from images. {SUBMIT}", SubmitTaskResponse, Img2ImgRequest,
        headers=TASK_HEADERS,
    ),
    Route(
        "post", "/extra_images", f"Upscale an image as a task. {SUBMIT}", SubmitTaskResponse,
        ExtraImagesRequest, headers=TASK_HEADERS,
    ),
    Route(
        "get", "/tasks", "The caller's tasks, newest first", TaskList,
        query=(
            ("status", TaskStatus, "only tasks in this status"),
            ("model", str, "only tasks of this checkpoint"),
            ("limit", Annotated[int, Meta(ge=1, le=100)], "page size (20)"),
            ("cursor", str, "nextCursor of the previous page"),
        ),
    ),
    Route("get", "/tasks/{taskId}/result", "A task's result", TaskResultResponse),
    Route("get", "/tasks/{taskId}/progress", "A task's progress", TaskProgressResponse),
    Route("get", "/tasks/{taskId}/events", "A task's events (text/event-stream)"),
    Route("post", "/tasks/{taskId}/cancellation", "Cancel a task", CancelResponse, status=202),
    Route(
        "post", "/options", "Store a new snapshot of the caller's options", SeedOptionsResponse,
        SeedOptionsRequest,
    ),
    Route("get", "/models", "Registered models", list[ModelAttributes], query=(MODEL_TYPE,)),
    Route(
        "post", "/models", "Register a file from the object store (202 while it is copied)",
        ModelChange, RegisterModelRequest, status=201,
    ),
    Route(
        "get", "/models/{model_name}", "One registered model", ModelAttributes,
        query=(MODEL_TYPE,),
    ),
    Route(
        "put", "/models/{model_name}",
        "Register again from ossPath (JSON), or upload the file itself (any other body)",
        ModelChange, RegisterModelRequest, upload=True,
        query=(
            MODEL_TYPE,
            ("sha256", str, "upload: the file's SHA-256, checked"),
            ("suffix", str, "upload: the file's extension when the name has none"),
        ),
    ),
    Route(
        "delete", "/models/{model_name}", "Delete a model (drain=true: after its open tasks)",
        ModelDeleted, query=(MODEL_TYPE, ("drain", bool, "run the queued tasks first (202)")),
    ),
    Route("get", "/webhooks/secret", "The caller's webhook signing secret", WebhookSecret),
    Route(
        "get", "/webhooks/failures", "Webhook deliveries that gave up, newest first",
        list[WebhookFailure],
    ),
    Route("get", "/list/sdapi/functions", "Checkpoints' worker pools", FunctionsList),
    Route("get", "/list/sdapi/fucntions", "The same (the seed document's spelling)", FunctionsList),
    Route(
        "post", "/batch_update_sd_resource", "Change worker pools' settings", FunctionsChange,
        BatchUpdateSdResourceRequest, partial_failure=True,
    ),
    Route(
        "post", "/del/sd/functions", "Reset worker pools to their defaults", FunctionsChange,
        DeleteFunctionsRequest, partial_failure=True,
    ),
    Route("post", "/restart", "Rolling restart of every worker", Message),
    Route(
        "get", "/deadletters", "Tasks JetStream gave up on, newest first (administrators)",
        list[DeadLetter], query=(("limit", int, "at most this many (1 to 500, default 50)"),),
    ),
    Route(
        "post", "/models/{model_name}/warm",
        "Pre-warm: start a checkpoint's worker ahead of traffic (202)", Warming,
        WarmModelRequest,
    ),
    Route("get", "/healthz", "Health of NATS, MongoDB and the object store", Health),
    Route(
        "get", "/files/{key}", "Signed download link of the local object store",
        query=(("expires", int, "Unix time"), ("signature", str, "the link's HMAC")),
    ),
    Route(
        "post", "/sdapi/v1/txt2img", "A1111 txt2img", A1111ImageResponse, Txt2ImgRequest,
        headers=TASK_HEADERS,
    ),
    Route(
        "post", "/sdapi/v1/img2img", "A1111 img2img", A1111ImageResponse, Img2ImgRequest,
        headers=TASK_HEADERS,
    ),
    Route(
        "get", "/sdapi/v1/progress", "A1111 progress of the caller's task", A1111Progress,
        query=(
            ("id_task", str, "this task instead of the current one"),
            ("skip_current_image", bool, "leave the preview out"),
        ),
    ),
    Route("post", "/sdapi/v1/interrupt", "A1111 interrupt of the caller's task", A1111_OBJECT),
    Route("post", "/sdapi/v1/skip", "A1111 skip: the caller's task ends its current job",
          A1111_OBJECT),
    Route("get", "/sdapi/v1/options", "A1111 options", A1111_OBJECT),
    Route("post", "/sdapi/v1/options", "A1111 options update", None, A1111_OBJECT),
    Route("get", "/sdapi/v1/sd-models", "A1111 checkpoints", A1111_LIST),
    Route("get", "/sdapi/v1/sd-vae", "A1111 VAEs", A1111_LIST),
    Route("get", "/sdapi/v1/loras", "A1111 LoRAs", A1111_LIST),
    Route("get", "/sdapi/v1/embeddings", "A1111 textual-inversion embeddings", A1111_OBJECT),
    Route("get", "/sdapi/v1/memory", "A1111 memory (gateway RAM, workers' CUDA)", A1111_OBJECT),
    Route("get", "/sdapi/v1/samplers", "A1111 samplers", A1111_LIST),
    Route("get", "/sdapi/v1/schedulers", "A1111 schedule types", A1111_LIST),
    Route("post", "/sdapi/v1/refresh-checkpoints", "Scan the checkpoints folder"),
    Route("post", "/sdapi/v1/refresh-vae", "Scan the VAE folder"),
    Route("post", "/sdapi/v1/refresh-loras", "Scan the LoRA folders"),
    Route("post", "/sdapi/v1/png-info", "A1111 PNG info", PngInfoResponse, PngInfoRequest),
    Route("get", "/sdapi/v1/prompt-styles", "A1111 prompt styles", A1111_LIST),
    Route(
        "post", "/sdapi/v1/extra-single-image", "A1111 extras", A1111ExtrasResponse,
        ExtraImagesRequest, headers=TASK_HEADERS,
    ),
    Route(
        "post", "/sdapi/v1/extra-batch-images", "A1111 extras, several images",
        A1111ExtrasBatchResponse, ExtraBatchImagesRequest, headers=TASK_HEADERS,
    ),
    Route("get", "/sdapi/v1/upscalers", "A1111 upscalers", A1111_LIST),
    Route("get", "/sdapi/v1/face-restorers", "A1111 face restorers", A1111_LIST),
    Route("get", "/controlnet/model_list", "ControlNet extension: models", A1111_OBJECT),
    Route(
        "get", "/controlnet/module_list", "ControlNet extension: preprocessors", A1111_OBJECT
    ),
    Route("get", "/controlnet/version", "ControlNet extension: API version", A1111_OBJECT),
    Route("get", "/controlnet/settings", "ControlNet extension: settings", A1111_OBJECT),
    Route(
        "post", "/controlnet/detect", "ControlNet extension: a preprocessor's maps",
        DetectResponse, DetectRequest,
    ),
]  # fmt: skip
UNDOCUMENTED = frozenset({"/openapi.json", "/docs", "/", "/console"})
"""Routes the document leaves out: the document itself and the web console's files."""
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


def build_document() -> dict[str, Any]:
    types: list[Any] = [Error]
    for route in ROUTES:
        types += [t for t in (route.request, route.response) if t is not None]
        types += [t for _, t, _ in route.query + route.headers]
    schemas, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    schema_of = {id(t): schema for t, schema in zip(types, schemas, strict=True)}
    error = schema_of[id(Error)]
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        operation: dict[str, Any] = {"summary": route.summary, "responses": {}}
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in re.findall(r"\{(\w+)\}", route.path)
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
        if route.partial_failure:
            operation["responses"]["500"] = {**ok, "description": "some named item failed"}
        for code, why in ERRORS:
            operation["responses"][code] = {"description": why, "content": _json(error)}
        paths.setdefault(route.path, {})[route.method] = operation
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
