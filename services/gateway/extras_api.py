"""Extras (upscaling) as tasks: the seed's ``/extra_images`` and A1111's extras endpoints.

Extras need no checkpoint: they queue on the extras pool's subject
(``sd.task.extras``, consumer ``sd_extras``), which the scheduler scales like a
checkpoint's. Everything a worker could refuse is refused here first, with nothing
queued: face restoration with no restorer registered, CodeFormer (not supported), an
upscaler that is neither built in nor registered as type ``upscaler``, a result larger
than ``max_input_pixels``.
"""

from __future__ import annotations

import time
from pathlib import PurePath

import msgspec
from aiohttp import web

from proto import ModelType, names
from proto.commands import AdapterRef, ExtrasTask
from proto.requests import (
    BUILTIN_UPSCALERS,
    ExtraBatchImagesRequest,
    ExtraImagesRequest,
    ExtrasOptions,
    Webhook,
    extras_options,
)
from services.gateway.adapters import resolve_face_restorer, resolve_upscaler
from services.gateway.auth import caller, caller_is_admin, server_paths
from services.gateway.bounds import check_free_form
from services.gateway.errors import ApiError
from services.gateway.images import stage_inputs, upload_staged
from services.gateway.openapi import A1111ExtrasBatchResponse, A1111ExtrasResponse, respond
from services.gateway.resources import Resources, resources
from services.gateway.responses import A1111FaceRestorer, A1111Upscaler
from services.gateway.submit import (
    TASK_ID_HEADER,
    Echo,
    TaskRef,
    a1111_images,
    admitted,
    answer,
    enqueue,
    submit_once,
)
from services.gateway.validation import decode, read_body
from services.gateway.webhooks_api import checked_webhook
from services.storage.models import usable
from services.storage.mongo import Document

DEFAULT_MODEL_SCALE = 4
"""What ``/sdapi/v1/upscalers`` reports when the registry does not know a model's
scale (A1111 reports 4 for models it has not loaded either)."""


async def _resolve_upscalers(res: Resources, options: ExtrasOptions) -> dict[str, str]:
    """Registered upscaler models the request names (name → path); 422 for unknown ones."""
    wanted = [("upscaler_1", options.upscaler_1), ("upscaler_2", options.upscaler_2)]
    found: dict[str, str] = {}
    for field, name in wanted:
        if name not in BUILTIN_UPSCALERS:
            found[name] = (await resolve_upscaler(res, name, field, BUILTIN_UPSCALERS)).path
    return found


async def _resolve_restorer(res: Resources, options: ExtrasOptions) -> AdapterRef | None:
    """The face restorer ``gfpgan_visibility`` > 0 asks for; CodeFormer is refused."""
    refusal = options.face_refusal(has_restorer=True)  # whether one is: resolved below
    if refusal is not None:
        raise ApiError(422, refusal.code, refusal.message, field=refusal.field)
    if options.gfpgan_visibility <= 0:
        return None
    return await resolve_face_restorer(res, None, "gfpgan_visibility")


def _check_output_sizes(
    res: Resources, options: ExtrasOptions, sizes: list[tuple[int, int]], field: str
) -> None:
    """Each image's size after the upscale is within ``max_input_pixels``: measured on
    the sizes read when the inputs were checked, before anything is stored."""
    limit = res.settings.max_input_pixels
    for n, size in enumerate(sizes):
        width, height = options.output_size(*size)
        if width * height > limit:
            raise ApiError(
                422,
                "limit_exceeded",
                f"`{field}[{n}]` would become {width}×{height} pixels; at most {limit} allowed",
                field="upscaling_resize" if options.resize_mode == 0 else "upscaling_resize_w",
            )


async def submit_extras(
    res: Resources,
    user: str,
    options: ExtrasOptions,
    images: list[str],
    field: str,
    task: TaskRef,
    *,
    sync: bool,
    webhook: Webhook | None = None,
) -> Document | None:
    """Queue an extras task for ``images`` (base64 or owned keys); with ``sync``, wait."""
    check_free_form(options, res.settings)
    if not images:
        raise ApiError(422, "invalid_field", f"`{field}` needs at least one image", field=field)
    if len(images) > res.settings.max_input_images:
        raise ApiError(
            422,
            "limit_exceeded",
            f"`{field}` must hold at most {res.settings.max_input_images} images"
            f" but holds {len(images)}",
            field=field,
        )
    upscalers = await _resolve_upscalers(res, options)
    face_restorer = await _resolve_restorer(res, options)
    async with admitted(res, user):
        checked = await checked_webhook(res, webhook)
        task_id = task.id
        staged = await stage_inputs(res, user, task_id, images, field)
        _check_output_sizes(res, options, staged.sizes, field)
        await upload_staged(res, staged)
        keys = staged.keys
        key = names.EXTRAS_MODEL_KEY
        command = ExtrasTask(
            task_id=task_id,
            user=user,
            model_name=key,
            model_key=key,
            request=extras_options(options),
            upscalers=upscalers,
            face_restorer=face_restorer,
            input_keys=keys,
            submitted_at=time.time(),
        )
        echo = Echo(total_steps=1, job_count=len(keys), webhook=checked, images_field=field)
        return await enqueue(res, command, task, echo, sync=sync)


async def extra_images(request: web.Request) -> web.StreamResponse:
    """The seed's ``POST /extra_images``: sync or async (``Request-Type``), a task."""
    res = resources(request)
    user = await caller(request, res)
    body = decode(await read_body(request), ExtraImagesRequest)

    async def queue(task: TaskRef, sync: bool) -> Document | None:
        return await submit_extras(
            res,
            user,
            body,
            [body.image],
            "image",
            task,
            sync=sync,
            webhook=body.webhook,
        )

    return await answer(res, await submit_once(request, res, user, queue))


def _html_info(outcome: Document | None) -> str:
    info = msgspec.json.decode((outcome or {}).get("info") or "{}")
    return str(info.get("html_info", "")) if isinstance(info, dict) else ""


async def _a1111_extras(
    request: web.Request, cls: type[ExtraImagesRequest] | type[ExtraBatchImagesRequest]
) -> web.StreamResponse:
    """A1111's extras endpoints: synchronous, results as base64 beside ``html_info``."""
    res = resources(request)
    user = await caller(request, res)
    body: ExtraImagesRequest | ExtraBatchImagesRequest = decode(await read_body(request), cls)
    if isinstance(body, ExtraImagesRequest):
        field, images = "image", [body.image]
    else:
        field, images = "imageList", [entry.data for entry in body.imageList]
    # The seed's headers work here as on A1111's txt2img: `taskId` names the task,
    # `Idempotency-Key` makes retries safe, and `Request-Type: async` answers 202 at once
    # (the outcome is at /tasks/{taskId}/result).
    submitted = await submit_once(
        request,
        res,
        user,
        lambda task, sync: submit_extras(res, user, body, images, field, task, sync=sync),
    )
    if not submitted.sync:
        return await answer(res, submitted)
    _, task_id, outcome, _ = submitted
    results = await a1111_images(res, task_id, outcome)
    html_info = _html_info(outcome)
    reply: A1111ExtrasResponse | A1111ExtrasBatchResponse = (
        A1111ExtrasResponse(html_info=html_info, image=results[0])
        if isinstance(body, ExtraImagesRequest)
        else A1111ExtrasBatchResponse(html_info=html_info, images=results)
    )
    return respond(reply, headers={TASK_ID_HEADER: task_id})


async def extra_single_image(request: web.Request) -> web.StreamResponse:
    """A1111 ``POST /sdapi/v1/extra-single-image`` → ``{html_info, image}``."""
    return await _a1111_extras(request, ExtraImagesRequest)


async def extra_batch_images(request: web.Request) -> web.StreamResponse:
    """A1111 ``POST /sdapi/v1/extra-batch-images`` → ``{html_info, images}``."""
    return await _a1111_extras(request, ExtraBatchImagesRequest)


async def upscalers(request: web.Request) -> web.StreamResponse:
    """A1111 ``GET /sdapi/v1/upscalers``: the built-ins, then the registered models."""
    res = resources(request)
    shown = server_paths(res, (await caller_is_admin(request, res))[1])
    builtins = [
        A1111Upscaler(name=name, model_name=None, model_path=None, model_url=None, scale=4)
        for name in BUILTIN_UPSCALERS
    ]
    models = [
        A1111Upscaler(
            name=m["name"],
            model_name=str(m["name"]).rsplit("/", 1)[-1].rsplit(".", 1)[0],
            model_path=shown(str(m.get("path") or "")),
            model_url=None,
            scale=m.get("scale") or DEFAULT_MODEL_SCALE,
        )
        for m in await res.models.list(ModelType.UPSCALER)
        if usable(m)
    ]
    return respond(builtins + models)


async def face_restorers(request: web.Request) -> web.StreamResponse:
    """A1111 ``GET /sdapi/v1/face-restorers``: the registered restorers (``name``,
    ``cmd_dir``: the folder of the file, as A1111 reports its models' folder)."""
    res = resources(request)
    await caller(request, res)
    return respond(
        [
            A1111FaceRestorer(
                name=m["name"], cmd_dir=str(PurePath(str(m.get("path") or "")).parent)
            )
            for m in await res.models.list(ModelType.FACE_RESTORER)
            if usable(m)
        ]
    )
