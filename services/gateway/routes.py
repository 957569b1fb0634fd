"""Every route of the gateway in one table: method, path, handler, and what the OpenAPI
document says of it (summary, request Struct, response Struct, parameters). The app
registers its routes from this table and ``/openapi.json`` is built from it, so a route
cannot exist undocumented nor be documented without existing. Paths are aiohttp's
(``{model_name:.+}``); the document shows them without the patterns.

Order matters where paths overlap: aiohttp tries resources in order, and a path that
matches with another method goes on to the next (``POST /models/{name}/warm`` after
``/models/{name}``'s GET, PUT and DELETE).
"""

from __future__ import annotations

from typing import Annotated, Any

from aiohttp import web
from msgspec import Meta

from proto import ModelType, TaskStatus
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
from services.gateway import (
    auth,
    console,
    controlnet_api,
    extras_api,
    functions,
    observe,
    pnginfo,
    registry,
    sdapi,
    styles,
    system_api,
    tasks_api,
    waiting,
    webhooks_api,
)
from services.gateway.openapi import (
    A1111_OPTIONS,
    MODEL_TYPE,
    NULL,
    SUBMIT,
    TASK_HEADERS,
    A1111ExtrasBatchResponse,
    A1111ExtrasResponse,
    A1111ImageResponse,
    A1111Progress,
    CancelResponse,
    DeadLetter,
    Health,
    LoginRequest,
    LoginResponse,
    Message,
    ModelAttributes,
    ModelChange,
    ModelDeleted,
    PngInfoRequest,
    PngInfoResponse,
    Route,
    SeedOptionsRequest,
    SeedOptionsResponse,
    SubmitTaskResponse,
    TaskList,
    TaskProgressResponse,
    TaskResultResponse,
    Warming,
    WebhookFailure,
    WebhookSecret,
    build_document,
    render_docs,
)
from services.gateway.responses import (
    A1111Checkpoint,
    A1111Embeddings,
    A1111FaceRestorer,
    A1111Lora,
    A1111Memory,
    A1111PromptStyle,
    A1111Sampler,
    A1111Scheduler,
    A1111Upscaler,
    A1111Vae,
    ControlNetModels,
    ControlNetModules,
    ControlNetSettings,
    ControlNetVersion,
    Empty,
    FunctionsDeleted,
    FunctionsList,
    FunctionsUpdate,
)

PARTIAL_FAILURE = "some named item failed (the same body, with each item's outcome)"

ROUTES: list[Route] = [
    Route("post", "/login", auth.login, "Log in", LoginResponse, LoginRequest),
    Route(
        "post",
        "/txt2img",
        tasks_api.txt2img,
        f"Generate from text. {SUBMIT}",
        SubmitTaskResponse,
        Txt2ImgRequest,
        headers=TASK_HEADERS,
    ),
    Route(
        "post",
        "/img2img",
        tasks_api.img2img,
        f"Generate from images. {SUBMIT}",
        SubmitTaskResponse,
        Img2ImgRequest,
        headers=TASK_HEADERS,
    ),
    Route(
        "post",
        "/extra_images",
        extras_api.extra_images,
        f"Upscale an image as a task. {SUBMIT}",
        SubmitTaskResponse,
        ExtraImagesRequest,
        headers=TASK_HEADERS,
    ),
    Route(
        "get",
        "/tasks",
        tasks_api.list_tasks,
        "The caller's tasks, newest first",
        TaskList,
        query=(
            ("status", TaskStatus, "only tasks in this status"),
            ("model", str, "only tasks of this checkpoint"),
            ("limit", Annotated[int, Meta(ge=1, le=100)], "page size (20)"),
            ("cursor", str, "nextCursor of the previous page"),
        ),
    ),
    Route(
        "get",
        "/tasks/{task_id}/result",
        tasks_api.task_result,
        "A task's result",
        TaskResultResponse,
    ),
    Route(
        "get",
        "/tasks/{task_id}/progress",
        tasks_api.task_progress,
        "A task's progress",
        TaskProgressResponse,
    ),
    Route(
        "get", "/tasks/{task_id}/events", waiting.task_events, "A task's events (text/event-stream)"
    ),
    Route(
        "post",
        "/tasks/{task_id}/cancellation",
        tasks_api.cancel_task,
        "Cancel a task",
        CancelResponse,
        status=202,
    ),
    Route(
        "post",
        "/options",
        sdapi.seed_options,
        "Store a new snapshot of the caller's options",
        SeedOptionsResponse,
        SeedOptionsRequest,
    ),
    Route(
        "get",
        "/models",
        registry.list_models,
        "Registered models",
        list[ModelAttributes],
        query=(MODEL_TYPE,),
    ),
    Route(
        "post",
        "/models",
        registry.register_model,
        "Register a file from the object store (202 while it is copied)",
        ModelChange,
        RegisterModelRequest,
        status=201,
    ),
    Route(
        "get",
        "/models/{model_name:.+}",
        registry.get_model,
        "One registered model",
        ModelAttributes,
        query=(MODEL_TYPE,),
    ),
    Route(
        "put",
        "/models/{model_name:.+}",
        registry.put_model,
        "Register again from ossPath (JSON), or upload the file itself (any other body)",
        ModelChange,
        RegisterModelRequest,
        upload=True,
        query=(
            MODEL_TYPE,
            ("sha256", str, "upload: the file's SHA-256, checked"),
            ("suffix", str, "upload: the file's extension when the name has none"),
        ),
    ),
    Route(
        "delete",
        "/models/{model_name:.+}",
        registry.delete_model,
        "Delete a model (drain=true: after its open tasks)",
        ModelDeleted,
        query=(MODEL_TYPE, ("drain", bool, "run the queued tasks first (202)")),
    ),
    Route(
        "get",
        "/webhooks/secret",
        webhooks_api.secret,
        "The caller's webhook signing secret",
        WebhookSecret,
    ),
    Route(
        "get",
        "/webhooks/failures",
        webhooks_api.failures,
        "Webhook deliveries that gave up, newest first",
        list[WebhookFailure],
    ),
    Route(
        "get",
        "/list/sdapi/functions",
        functions.list_functions,
        "Checkpoints' worker pools",
        FunctionsList,
    ),
    Route(
        "get",
        "/list/sdapi/fucntions",
        functions.list_functions,
        "The same (the seed document's spelling)",
        FunctionsList,
    ),
    Route(
        "post",
        "/batch_update_sd_resource",
        functions.batch_update,
        "Change worker pools' settings",
        FunctionsUpdate,
        BatchUpdateSdResourceRequest,
        also=((500, PARTIAL_FAILURE),),
    ),
    Route(
        "post",
        "/del/sd/functions",
        functions.delete_functions,
        "Reset worker pools to their defaults",
        FunctionsDeleted,
        DeleteFunctionsRequest,
        also=((500, PARTIAL_FAILURE),),
    ),
    Route("post", "/restart", functions.restart, "Rolling restart of every worker", Message),
    Route(
        "get",
        "/deadletters",
        functions.dead_letters,
        "Tasks JetStream gave up on, newest first (administrators)",
        list[DeadLetter],
        query=(("limit", int, "at most this many (1 to 500, default 50)"),),
    ),
    Route(
        "post",
        "/models/{model_name:.+}/warm",
        functions.warm,
        "Pre-warm: start a checkpoint's worker ahead of traffic (202)",
        Warming,
        WarmModelRequest,
    ),
    Route(
        "get",
        "/healthz",
        system_api.healthz,
        "Health of NATS, MongoDB and the object store",
        Health,
        also=((503, "NATS, MongoDB or the object store does not answer"),),
    ),
    Route(
        "get",
        "/metrics",
        observe.metrics_route,
        "Prometheus metrics (text exposition format); administrators only once auth is on",
    ),
    Route(
        "get",
        "/files/{key:.+}",
        system_api.download,
        "Signed download link of the local object store",
        query=(("expires", int, "Unix time"), ("signature", str, "the link's HMAC")),
    ),
    Route(
        "post",
        "/sdapi/v1/txt2img",
        sdapi.txt2img,
        "A1111 txt2img",
        A1111ImageResponse,
        Txt2ImgRequest,
        headers=TASK_HEADERS,
    ),
    Route(
        "post",
        "/sdapi/v1/img2img",
        sdapi.img2img,
        "A1111 img2img",
        A1111ImageResponse,
        Img2ImgRequest,
        headers=TASK_HEADERS,
    ),
    Route(
        "get",
        "/sdapi/v1/progress",
        sdapi.progress,
        "A1111 progress of the caller's task",
        A1111Progress,
        query=(
            ("id_task", str, "this task instead of the current one"),
            ("skip_current_image", bool, "leave the preview out"),
        ),
    ),
    Route(
        "post",
        "/sdapi/v1/interrupt",
        sdapi.interrupt,
        "A1111 interrupt of the caller's task",
        Empty,
    ),
    Route(
        "post",
        "/sdapi/v1/skip",
        sdapi.skip,
        "A1111 skip: the caller's task ends its current job",
        Empty,
    ),
    Route("get", "/sdapi/v1/options", sdapi.get_options, "A1111 options", A1111_OPTIONS),
    Route(
        "post", "/sdapi/v1/options", sdapi.set_options, "A1111 options update", NULL, A1111_OPTIONS
    ),
    Route(
        "get", "/sdapi/v1/sd-models", sdapi.sd_models, "A1111 checkpoints", list[A1111Checkpoint]
    ),
    Route("get", "/sdapi/v1/sd-vae", sdapi.sd_vae, "A1111 VAEs", list[A1111Vae]),
    Route("get", "/sdapi/v1/loras", sdapi.loras, "A1111 LoRAs", list[A1111Lora]),
    Route(
        "get",
        "/sdapi/v1/embeddings",
        sdapi.embeddings,
        "A1111 textual-inversion embeddings",
        A1111Embeddings,
    ),
    Route(
        "get",
        "/sdapi/v1/memory",
        sdapi.memory,
        "A1111 memory (gateway RAM, workers' CUDA)",
        A1111Memory,
    ),
    Route("get", "/sdapi/v1/samplers", sdapi.samplers, "A1111 samplers", list[A1111Sampler]),
    Route(
        "get",
        "/sdapi/v1/schedulers",
        sdapi.schedulers,
        "A1111 schedule types",
        list[A1111Scheduler],
    ),
    Route(
        "post",
        "/sdapi/v1/refresh-checkpoints",
        sdapi.refresh(ModelType.STABLE_DIFFUSION),
        "Scan the checkpoints folder",
        NULL,
    ),
    Route(
        "post",
        "/sdapi/v1/refresh-vae",
        sdapi.refresh(ModelType.SD_VAE),
        "Scan the VAE folder",
        NULL,
    ),
    Route(
        "post",
        "/sdapi/v1/refresh-loras",
        sdapi.refresh(ModelType.LORA),
        "Scan the LoRA folders",
        NULL,
    ),
    Route(
        "post",
        "/sdapi/v1/png-info",
        pnginfo.png_info,
        "A1111 PNG info",
        PngInfoResponse,
        PngInfoRequest,
    ),
    Route(
        "get",
        "/sdapi/v1/prompt-styles",
        styles.prompt_styles,
        "A1111 prompt styles",
        list[A1111PromptStyle],
    ),
    Route(
        "post",
        "/sdapi/v1/extra-single-image",
        extras_api.extra_single_image,
        "A1111 extras",
        A1111ExtrasResponse,
        ExtraImagesRequest,
        headers=TASK_HEADERS,
    ),
    Route(
        "post",
        "/sdapi/v1/extra-batch-images",
        extras_api.extra_batch_images,
        "A1111 extras, several images",
        A1111ExtrasBatchResponse,
        ExtraBatchImagesRequest,
        headers=TASK_HEADERS,
    ),
    Route(
        "get", "/sdapi/v1/upscalers", extras_api.upscalers, "A1111 upscalers", list[A1111Upscaler]
    ),
    Route(
        "get",
        "/sdapi/v1/face-restorers",
        extras_api.face_restorers,
        "A1111 face restorers",
        list[A1111FaceRestorer],
    ),
    Route(
        "get",
        "/controlnet/model_list",
        controlnet_api.model_list,
        "ControlNet extension: models",
        ControlNetModels,
    ),
    Route(
        "get",
        "/controlnet/module_list",
        controlnet_api.module_list,
        "ControlNet extension: preprocessors",
        ControlNetModules,
    ),
    Route(
        "get",
        "/controlnet/version",
        controlnet_api.version,
        "ControlNet extension: API version",
        ControlNetVersion,
    ),
    Route(
        "get",
        "/controlnet/settings",
        controlnet_api.settings,
        "ControlNet extension: settings",
        ControlNetSettings,
    ),
    Route(
        "post",
        "/controlnet/detect",
        controlnet_api.detect,
        "ControlNet extension: a preprocessor's maps",
        DetectResponse,
        DetectRequest,
    ),
]

_DOCUMENT: dict[str, Any] | None = None


def document() -> dict[str, Any]:
    """The OpenAPI document of :data:`ROUTES` (built once)."""
    global _DOCUMENT
    if _DOCUMENT is None:
        _DOCUMENT = build_document(ROUTES)
    return _DOCUMENT


async def openapi_json(request: web.Request) -> web.StreamResponse:
    return web.json_response(document())


async def docs(request: web.Request) -> web.StreamResponse:
    return web.Response(text=render_docs(document()), content_type="text/html")


UNDOCUMENTED: list[tuple[str, str, Any]] = [
    ("get", "/openapi.json", openapi_json),
    ("get", "/docs", docs),
]
"""Routes the document leaves out: the document itself (and the console's files)."""
UNDOCUMENTED_PATHS = frozenset({path for _, path, _ in UNDOCUMENTED} | console.PATHS)


def add_routes(app: web.Application) -> None:
    for route in ROUTES:
        assert route.handler is not None
        app.router.add_route(route.method.upper(), route.path, route.handler)
    for method, path, handler in UNDOCUMENTED:
        app.router.add_route(method.upper(), path, handler)
    console.add_routes(app)
