"""Submission: the one path by which a request becomes a task, for every route (the
seed's ``/txt2img`` and ``/img2img``, A1111's ``/sdapi/v1/*``, extras).

The order makes bad input free and a task never half-exists: decode and validate →
resolve the model (unknown → 404, never a new worker) → admit under the caller's quotas
→ stage the input images → insert the task document → publish with ``Nats-Msg-Id =
task_id``. If JetStream refuses the publish the document is removed again and the client
gets a 429/503 it can retry; options a request changes are saved only once its task is
accepted. ``submit_once`` adds the ``Idempotency-Key`` and ``taskId`` headers and
``Request-Type`` (sync or async); ``answer`` and ``a1111_images`` turn outcomes into
the seed's and A1111's answers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple

import msgspec
from aiohttp import web
from nats.errors import Error as NatsError
from nats.js.errors import APIError
from pymongo.errors import DuplicateKeyError

from proto import GenerateImage, TaskStatus, names
from proto.codec import SchemaTooNewError, decode_generate, encode
from proto.commands import AdapterRef, DiffusionTask, ExtrasTask, Img2ImgTask, Txt2ImgTask
from proto.requests import Img2ImgRequest, Txt2ImgRequest, to_builtins
from services.common import bus
from services.gateway import waiting
from services.gateway.adapters import (
    resolve_embeddings,
    resolve_hr_upscaler,
    resolve_loras,
    resolve_restore_faces,
    resolve_vae,
)
from services.gateway.bounds import check_command, check_options
from services.gateway.controlnet_api import check_controlnets, claim_controlnets
from services.gateway.errors import ApiError, too_many
from services.gateway.images import StagedInputs, stage_inputs, upload_staged
from services.gateway.openapi import SubmitTaskResponse, respond
from services.gateway.resources import Resources
from services.gateway.styles import apply_styles
from services.gateway.validation import read_body
from services.gateway.webhooks_api import checked_webhook
from services.storage.idempotency import IdempotencyConflictError, request_hash
from services.storage.models import unregistered
from services.storage.mongo import Document
from services.storage.tasks import new_task_document, shown_task_id

log = logging.getLogger(__name__)
TASK_ID_HEADER = "taskId"
IDEMPOTENCY_HEADER = "Idempotency-Key"
REQUEST_TYPE_HEADER = "Request-Type"


def new_task_id() -> str:
    # 96 random bits from the OS CSPRNG: unguessable, subject- and key-safe.
    return secrets.token_hex(12)


class TaskRef(NamedTuple):
    """A new task's ids: ``id`` is internal (Mongo ``_id``, ``Nats-Msg-Id``, subjects,
    object keys), ``shown`` is what its owner sees as ``taskId`` in every answer."""

    id: str
    shown: str

    @property
    def client_id(self) -> str | None:
        """The id the client chose, if it chose one."""
        return self.shown if self.shown != self.id else None


def task_ref(user: str, chosen: str | None) -> TaskRef:
    """A generated id, or the caller's chosen one scoped to the caller: another user's
    choice of the same id neither collides with nor reveals this one."""
    if not chosen:
        generated = new_task_id()
        return TaskRef(generated, generated)
    return TaskRef(names.scoped_task_id(user, chosen), chosen)


def requested_task_id(request: web.Request) -> str | None:
    """The seed lets clients choose the task id (``taskId`` header); it must be safe."""
    supplied = request.headers.get(TASK_ID_HEADER, "").strip()
    if not supplied:
        return None
    try:
        return names.check_task_id(supplied)
    except ValueError as exc:
        raise ApiError(
            422, "invalid_field", f"{TASK_ID_HEADER} header: {exc}", field=TASK_ID_HEADER
        ) from exc


async def resolve_checkpoint(res: Resources, name: str, field: str) -> Document:
    model = await res.models.get_recent(name)
    if model is None or model.get("type") != "stableDiffusion" or model.get("draining"):
        raise ApiError(404, "model_not_found", f"model {name!r} is not registered", field=field)
    if unregistered(model):
        raise ApiError(
            409,
            "model_registering",
            f"model {name!r} is still being registered; retry when its status is unloaded",
            field=field,
            headers={"Retry-After": "5"},
        )
    if model.get("status") == "failed":
        raise ApiError(
            409,
            "model_unusable",
            f"model {name!r} cannot be used: {model.get('error')}",
            field=field,
        )
    return model


async def admit(res: Resources, user: str) -> None:
    """The caller's limits (open tasks, submissions per minute): 429 when over one."""
    refusal = await res.quotas.admit(
        user,
        max_open=res.settings.max_open_tasks_per_user,
        per_minute=res.settings.max_tasks_per_minute,
    )
    if refusal is not None:
        raise too_many("rate_limited", refusal.reason, refusal.retry_after_s)


@contextlib.asynccontextmanager
async def admitted(res: Resources, user: str) -> AsyncIterator[None]:
    """The caller's limits for a submission (429 when over one), given back if the block
    raises: a submission refused after admission counts for nothing."""
    await admit(res, user)
    try:
        yield
    except BaseException:
        await res.quotas.release(user, per_minute=res.settings.max_tasks_per_minute)
        raise


async def submit(
    res: Resources,
    user: str,
    body: Txt2ImgRequest | Img2ImgRequest,
    task: TaskRef,
    *,
    sync: bool,
) -> Document | None:
    """Queue a validated request; with ``sync``, wait for its outcome (None: deadline)."""
    # Independent reads at once: the caller's stored options do not depend on the model.
    model, options = await asyncio.gather(
        resolve_checkpoint(res, body.stable_diffusion_model, "stable_diffusion_model"),
        res.options.get(user),
    )
    hr_upscaler = await resolve_hr_upscaler(res, body) if isinstance(body, Txt2ImgRequest) else None
    async with admitted(res, user):
        return await _submit_admitted(
            res, user, body, task, Resolved(model, options, hr_upscaler), sync=sync
        )


class Resolved(NamedTuple):
    """What a submission read before its admission."""

    model: Document
    options: dict[str, Any]
    """The caller's stored options (``POST /sdapi/v1/options``)."""
    hr_upscaler: AdapterRef | None


async def _submit_admitted(
    res: Resources,
    user: str,
    body: Txt2ImgRequest | Img2ImgRequest,
    task: TaskRef,
    resolved: Resolved,
    *,
    sync: bool,
) -> Document | None:
    model, options, hr_upscaler = resolved
    webhook = await checked_webhook(res, body.webhook)
    if body.styles:
        prompt, negative = await apply_styles(res, body.styles, body.prompt, body.negative_prompt)
        body = msgspec.structs.replace(body, prompt=prompt, negative_prompt=negative)
    loras = await resolve_loras(res, body.prompt)  # after styles: a style may name LoRAs
    hr_loras = None
    if isinstance(body, Txt2ImgRequest) and body.enable_hr and body.hr_prompt:
        hr_loras = await resolve_loras(res, body.hr_prompt, "hr_prompt")
    embeddings = await resolve_embeddings(
        res, body.prompt, body.negative_prompt, family=model.get("family")
    )
    overrides = dict(body.override_settings or {})
    if overrides and not body.override_settings_restore_afterwards:
        check_options({**options, **overrides}, res.settings, "override_settings")
    if options:
        # The caller's stored options apply to every request; the request's own win.
        merged = {**options, **(body.override_settings or {})}
        body = msgspec.structs.replace(body, override_settings=merged)
    vae = await resolve_vae(res, body.sd_vae, body.override_settings)
    face_restorer = await resolve_restore_faces(res, body.restore_faces, body.override_settings)
    units = await check_controlnets(res, body, model)
    task_id = task.id
    input_keys: list[str] = []
    staged: list[StagedInputs] = []
    if isinstance(body, Img2ImgRequest):
        body, staged = await _claim_inputs(res, user, body, task_id)
        input_keys = body.init_images + ([body.mask] if body.mask else [])
    body, controlnets, control_images = await claim_controlnets(
        res, user, task_id, body, units, len(input_keys)
    )
    input_keys += [u.image_key for u in controlnets if u.image_key not in input_keys]
    await upload_staged(res, *staged, *control_images)  # every check has passed
    common: dict[str, Any] = dict(
        task_id=task_id,
        user=user,
        model_name=model["name"],
        model_key=model["model_key"],
        input_keys=input_keys,
        loras=loras,
        hr_loras=hr_loras,
        hr_upscaler=hr_upscaler,
        face_restorer=face_restorer,
        vae=vae,
        embeddings=embeddings,
        controlnets=controlnets,
        submitted_at=time.time(),
    )
    command: DiffusionTask = (
        Img2ImgTask(request=body, **common)
        if isinstance(body, Img2ImgRequest)
        else Txt2ImgTask(request=body, **common)
    )

    async def keep_overrides() -> None:
        if overrides and not body.override_settings_restore_afterwards:
            # A1111 keeps such overrides as its settings; here they become the caller's
            # options (as POST /sdapi/v1/options would), never anyone else's, and only
            # once the task is accepted (a refused one changes nothing).
            await res.options.update(user, overrides)

    return await enqueue(
        res,
        command,
        task,
        Echo(total_steps=body.steps, job_count=body.n_iter, webhook=webhook),
        sync=sync,
        accepted=keep_overrides,
    )


class Echo(NamedTuple):
    """What the task document keeps beside its command (the one copy of the request):
    progress totals, the checked webhook and, for extras, the field that held the images
    (``image`` or ``imageList``: how the result echoes their keys)."""

    total_steps: int
    job_count: int
    webhook: dict[str, Any] | None
    images_field: str | None = None


def echoed_parameters(document: Document) -> dict[str, Any]:
    """The request as the result's ``parameters`` show it (defaults filled in, input
    images as their object keys), read from the task's command."""
    if "parameters" in document:  # stored by a gateway from before the command was the copy
        return dict(document["parameters"])
    data = document.get("command")
    if not data:
        return {}
    try:
        command = decode_generate(bytes(data))
    except (SchemaTooNewError, msgspec.DecodeError):
        log.warning("task %s: its command cannot be read back", document["_id"])
        return {}
    shown = to_builtins(command.request)
    if isinstance(command, ExtrasTask) and command.input_keys:
        keys = command.input_keys
        field = document.get("images_field") or "imageList"
        shown[field] = keys if field == "imageList" else keys[0]
    return shown


async def enqueue(
    res: Resources,
    command: GenerateImage,
    task: TaskRef,
    echo: Echo,
    *,
    sync: bool,
    accepted: Callable[[], Awaitable[None]] | None = None,
) -> Document | None:
    """Store the task's document, publish its command, then run ``accepted``; with
    ``sync``, its outcome (None: deadline passed or async)."""
    task_id = command.task_id
    data = encode(command)  # once: stored (for the reconciler), checked, published
    document = new_task_document(
        task_id=task_id,
        user=command.user,
        kind=command.kind.value,
        model_name=command.model_name,
        model_key=command.model_key,
        total_steps=echo.total_steps,
        job_count=echo.job_count,
        command=data,
        client_id=task.client_id,
    )
    document["webhook"] = echo.webhook
    if echo.images_field is not None:
        document["images_field"] = echo.images_field
    check_command(data, command.request, res.settings, res.nc.max_payload)
    if res.nc.is_closed:  # while reconnecting, publishes wait in the client's buffer
        raise ApiError(503, "queue_unavailable", "the task queue is unreachable, retry later")
    # Subscribe before publishing so a fast worker's terminal event cannot be missed.
    waiter = await waiting.TerminalWaiter.start(res.nc, task_id, command.user) if sync else None
    try:
        try:
            await res.tasks.insert(document)
        except DuplicateKeyError as exc:
            raise _task_exists(shown_task_id(document)) from exc
        await _publish(res, command, data)
        if accepted is not None:
            await accepted()
        if waiter is None:
            return None
        return await waiter.wait(res.tasks, res.settings.sync_timeout_s)
    finally:
        if waiter is not None:
            await waiter.close()


def _task_exists(shown: str) -> ApiError:
    return ApiError(
        409, "task_exists", f"a task with id {shown!r} already exists", field=TASK_ID_HEADER
    )


async def _claim_inputs(
    res: Resources, user: str, body: Img2ImgRequest, task_id: str
) -> tuple[Img2ImgRequest, list[StagedInputs]]:
    """Claim check: the images will go to the object store (the caller uploads the staged
    ones once every check has passed), the command carries their keys."""
    if not body.init_images:
        raise ApiError(
            422, "invalid_field", "`init_images` needs at least one image", field="init_images"
        )
    if len(body.init_images) > res.settings.max_input_images:
        raise ApiError(
            422,
            "limit_exceeded",
            f"`init_images` must hold at most {res.settings.max_input_images} images"
            f" but holds {len(body.init_images)}",
            field="init_images",
        )
    images = await stage_inputs(res, user, task_id, body.init_images, "init_images")
    if not body.mask:
        return msgspec.structs.replace(body, init_images=images.keys), [images]
    mask = await stage_inputs(res, user, task_id, [body.mask], "mask", first=len(images.keys))
    if mask.sizes[0] != images.sizes[0]:
        (mw, mh), (iw, ih) = mask.sizes[0], images.sizes[0]
        raise ApiError(
            422,
            "invalid_field",
            f"`mask` is {mw}×{mh} but `init_images[0]` is {iw}×{ih}; they must match",
            field="mask",
        )
    body = msgspec.structs.replace(body, init_images=images.keys, mask=mask.keys[0])
    return body, [images, mask]


Queue = Callable[[TaskRef, bool], Awaitable[Document | None]]
"""``queue(task, sync)`` queues the request as that task; its outcome when sync."""


class Submitted(NamedTuple):
    user: str
    task_id: str
    """As the client knows it (``TaskRef.shown``)."""
    outcome: Document | None
    """Sync: the terminal task document (None: the deadline passed first). Async: None, or
    the document of the earlier request when the ``Idempotency-Key`` was seen before."""
    sync: bool


async def submit_once(
    request: web.Request, res: Resources, user: str, queue: Queue, task_id: str | None = None
) -> Submitted:
    """``queue`` the request, unless the ``Idempotency-Key`` header names an earlier one.

    ``Request-Type`` (sync unless ``async``) and the ``taskId`` header (unless ``task_id``
    is given) are read here. The same key with the same route and body answers for the
    earlier task; a different body is a 409; a refused submission releases its key.
    """
    sync = request.headers.get(REQUEST_TYPE_HEADER, "sync").strip().lower() != "async"
    task = task_ref(user, task_id or requested_task_id(request))
    key = request.headers.get(IDEMPOTENCY_HEADER, "").strip()
    digest = request_hash(request.path, await read_body(request))
    earlier = await _reserve(res, user, key, digest, task.id)
    if earlier is not None:
        # A retry of a request we already took: answer for the same task, but only once
        # that task exists and is the caller's. The key is reserved before the task is
        # inserted, and the insert may still fail (a `taskId` that is taken): until then
        # the key promises nothing, and a task id never answers for another user's task.
        document = await res.tasks.get(earlier, user)
        if document is None:
            raise ApiError(
                409,
                "idempotency_in_flight",
                f"a request with {IDEMPOTENCY_HEADER} {key!r} is still being submitted;"
                " retry shortly",
                field=IDEMPOTENCY_HEADER,
                headers={"Retry-After": "1"},
            )
        shown = shown_task_id(document)
        if not sync:
            return Submitted(user, shown, document, sync)
        waiter = await waiting.TerminalWaiter.start(res.nc, earlier, user)
        try:
            return Submitted(
                user,
                shown,
                await waiter.wait(res.tasks, res.settings.sync_timeout_s, read_first=True),
                sync,
            )
        finally:
            await waiter.close()
    try:
        if task.client_id and await res.tasks.get(task.client_id, user) is not None:
            # The owner's own id again (chosen, or one of its generated ids): the seed's 409.
            raise _task_exists(task.shown)
        return Submitted(user, task.shown, await queue(task, sync), sync)
    except ApiError:
        if key:
            await res.idempotency.release(user, key)
        raise


async def _reserve(res: Resources, user: str, key: str, digest: str, task_id: str) -> str | None:
    if not key:
        return None
    if len(key) > 255:
        raise ApiError(
            422,
            "invalid_field",
            f"{IDEMPOTENCY_HEADER} is at most 255 characters",
            field=IDEMPOTENCY_HEADER,
        )
    try:
        return await res.idempotency.reserve(user, key, digest, task_id)
    except IdempotencyConflictError as exc:
        raise ApiError(
            409,
            "idempotency_conflict",
            f"{IDEMPOTENCY_HEADER} {key!r} was used for a different request (task {exc})",
            field=IDEMPOTENCY_HEADER,
        ) from exc


async def answer(res: Resources, submitted: Submitted) -> web.StreamResponse:
    """The seed's answer: sync, from the terminal document; async, 202 with the status."""
    user, task_id, outcome, sync = submitted
    headers = {TASK_ID_HEADER: task_id}
    if not sync:
        status = TaskStatus(outcome["status"]) if outcome else TaskStatus.WAITING
        return respond(SubmitTaskResponse(taskId=task_id, status=status), 202, headers)
    return await _sync_response(res, user, task_id, outcome, headers)


async def _publish(res: Resources, command: GenerateImage, data: bytes) -> None:
    """Publish a task whose document is stored.

    A refusal by JetStream (queue full, no stream) removes the document and answers 4xx
    or 503. An ambiguous failure (a timeout, the connection dropping mid-publish) keeps
    it: the command may have landed, and the reconciler publishes it again under the same
    message id if it did not, so the task is accepted either way.
    """
    try:
        ack = await res.js.publish(
            names.task_subject(command.model_key),
            data,
            stream=names.TASK_STREAM,
            headers={names.MSG_ID_HEADER: command.task_id},
        )
    except APIError as exc:
        await res.tasks.delete(command.task_id)
        if exc.err_code == bus.JS_STORE_LIMIT:
            raise ApiError(
                429,
                "queue_full",
                "the task queue is full, retry later",
                headers={"Retry-After": "5"},
            ) from exc
        raise ApiError(503, "queue_unavailable", f"cannot queue the task: {exc}") from exc
    except NatsError as exc:
        log.warning(
            "task %s: publish unconfirmed (%r), the reconciler resends it", command.task_id, exc
        )
        return
    res.tasks.note_stream_seq(command.task_id, ack.seq)


async def _sync_response(
    res: Resources, user: str, task_id: str, outcome: Document | None, headers: dict[str, str]
) -> web.StreamResponse:
    if outcome is None:
        # Deadline passed: the task goes on; the client polls or follows the SSE stream.
        document = await res.tasks.get(task_id, user)
        status = TaskStatus(document["status"]) if document else TaskStatus.WAITING
        return respond(SubmitTaskResponse(taskId=task_id, status=status), 202, headers)
    status = TaskStatus(outcome["status"])
    body = SubmitTaskResponse(taskId=task_id, status=status, message=outcome["message"])
    if status is TaskStatus.SUCCEEDED:
        urls = [await res.objects.presign(k, res.settings.presign_ttl_s) for k in outcome["images"]]
        body = msgspec.structs.replace(body, ossUrl=urls, images=outcome["images"])
        return respond(body, headers=headers)
    if status is TaskStatus.FAILED:
        return respond(msgspec.structs.replace(body, code=outcome.get("code")), 500, headers)
    return respond(body, headers=headers)


async def a1111_images(
    res: Resources, task_id: str, outcome: Document | None, *, send: bool = True
) -> list[str]:
    """A finished sync A1111 task's images as base64 (none unless ``send``); A1111-style
    errors otherwise: 504 while it still runs, 500 when it failed, 409 when cancelled."""
    headers = {TASK_ID_HEADER: task_id}
    if outcome is None:
        raise ApiError(
            504,
            "timeout",
            f"task {task_id} is still running; follow /tasks/{task_id}/events",
            headers=headers,
        )
    status = outcome["status"]
    if status != TaskStatus.SUCCEEDED.value:
        raise ApiError(
            500 if status == TaskStatus.FAILED.value else 409,
            outcome.get("code") or status,
            outcome["message"] or f"task {status}",
            headers=headers,
        )
    if not send:
        return []
    return [base64.b64encode(await res.objects.get(k)).decode() for k in outcome["images"]]
