"""AUTOMATIC1111 compatibility: ``/sdapi/v1/*`` with A1111's request and response shapes.

Off-the-shelf A1111 clients send no ``stable_diffusion_model``: the checkpoint comes
from ``override_settings.sd_model_checkpoint``, else the caller's stored options, else
the only registered checkpoint. Titles like ``model.safetensors [abcdef0123]`` are
accepted. Generation is synchronous, as in A1111, and images come back as base64.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from proto import ModelType, TaskStatus, names
from proto.requests import Img2ImgRequest, Txt2ImgRequest, to_builtins
from proto.samplers import SAMPLERS, SCHEDULE_TYPES
from services.common import bus
from services.gateway.adapters import families_match
from services.gateway.auth import caller, caller_is_admin, server_paths
from services.gateway.bounds import check_options
from services.gateway.errors import ApiError, Handler, invalid_body
from services.gateway.openapi import (
    A1111ImageResponse,
    A1111Progress,
    ProgressState,
    SeedOptionsResponse,
    respond,
)
from services.gateway.resources import Resources, resources
from services.gateway.responses import (
    A1111Checkpoint,
    A1111Embedding,
    A1111Embeddings,
    A1111Lora,
    A1111Memory,
    A1111Sampler,
    A1111Scheduler,
    A1111Vae,
    CudaMemory,
    Empty,
    MemoryCurrent,
    MemoryFigures,
    WorkerMemory,
)
from services.gateway.submit import (
    a1111_images,
    answer,
    submit,
    submit_once,
)
from services.gateway.tasks_api import cancel_document
from services.gateway.validation import check_limits, read_json
from services.storage.modelfiles import ModelFileError, read_safetensors_header
from services.storage.mongo import Document
from services.storage.objects import ObjectNotFoundError
from services.storage.scan import register_models
from services.storage.tasks import shown_task_id

Processing = TypeVar("Processing", Txt2ImgRequest, Img2ImgRequest)
CHECKPOINT_OPTION = "sd_model_checkpoint"
_TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]{8,64}\]$")


def model_title(document: Document) -> str:
    short = (document.get("sha256") or "")[:10]
    return f"{document['name']} [{short}]" if short else str(document["name"])


async def _checkpoint_name(res: Resources, user: str, body: dict[str, Any]) -> str:
    override = body.get("override_settings") or {}
    wanted = override.get(CHECKPOINT_OPTION) if isinstance(override, dict) else None
    wanted = wanted or (await res.options.get(user)).get(CHECKPOINT_OPTION)
    if wanted:
        return _TITLE_HASH.sub("", str(wanted))
    usable = [
        m for m in await res.models.list(ModelType.STABLE_DIFFUSION) if m["status"] != "failed"
    ]
    if len(usable) == 1:
        return str(usable[0]["name"])
    raise ApiError(
        422,
        "checkpoint_required",
        "choose a checkpoint: override_settings.sd_model_checkpoint or POST /sdapi/v1/options"
        " {sd_model_checkpoint}",
        field="override_settings.sd_model_checkpoint",
    )


async def _decode_a1111(
    request: web.Request, res: Resources, user: str, cls: type[Processing]
) -> Processing:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "request body must be a JSON object")
    body.setdefault("stable_diffusion_model", await _checkpoint_name(res, user, body))
    try:
        return msgspec.convert(body, cls)
    except msgspec.ValidationError as exc:
        raise invalid_body(exc) from exc


async def txt2img(request: web.Request) -> web.StreamResponse:
    return await _generate(request, Txt2ImgRequest)


async def img2img(request: web.Request) -> web.StreamResponse:
    return await _generate(request, Img2ImgRequest)


async def _generate(request: web.Request, cls: type[Processing]) -> web.StreamResponse:
    res = resources(request)
    user = await caller(request, res)
    body = (await _decode_a1111(request, res, user, cls)).with_firstphase()
    check_limits(body, res.settings)
    # The seed's headers work here too: `taskId` names the task, `Idempotency-Key` makes
    # retries safe, and `Request-Type: async` (with or without the seed's `Task-Flag:
    # true`) answers 202 at once; the outcome is then at /tasks/{taskId}/result.
    forced = _forced(body.force_task_id) if body.force_task_id else None
    submitted = await submit_once(
        request,
        res,
        user,
        lambda task, sync: submit(res, user, body, task, sync=sync),
        forced,
    )
    if not submitted.sync:
        return await answer(res, submitted)
    _, task_id, outcome, _ = submitted
    images = await a1111_images(res, task_id, outcome, send=body.send_images)
    assert outcome is not None
    info = outcome.get("info") or ""
    parameters = to_builtins(body)
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        # A1111 leaves the (large) input images out of the echoed parameters unless asked.
        parameters |= {"init_images": None, "mask": None}
    return respond(
        A1111ImageResponse(images=images, parameters=parameters, info=info),
        headers={"taskId": task_id},
    )


def _forced(task_id: str) -> str:
    """A1111's ``force_task_id``: the client names the task (validated like ``taskId``)."""
    try:
        return names.check_task_id(task_id)
    except ValueError as exc:
        raise ApiError(422, "invalid_field", str(exc), field="force_task_id") from exc


async def progress(request: web.Request) -> web.StreamResponse:
    res = resources(request)
    user = await caller(request, res)
    task_id = request.query.get("id_task")
    document = await res.tasks.get(task_id, user) if task_id else await res.tasks.current(user)
    state = ProgressState(
        skipped=False,
        interrupted=False,
        job="",
        job_count=0,
        job_timestamp="0",
        job_no=0,
        sampling_step=0,
        sampling_steps=0,
    )
    fraction, eta = 0.0, 0.0
    current_image = None
    if document is not None:
        snapshot = document["progress"]
        status = TaskStatus(document["status"])
        started = document.get("started_at")
        state = ProgressState(
            interrupted=status is TaskStatus.CANCELLED,
            skipped=bool(snapshot.get("skipped")),
            job=f"task({shown_task_id(document)})",
            job_count=snapshot["job_count"],
            job_timestamp=started.strftime("%Y%m%d%H%M%S") if started else "0",
            job_no=snapshot["job_no"],
            sampling_step=snapshot["step"],
            sampling_steps=snapshot["total_steps"],
        )
        fraction = 1.0 if status.terminal else min(float(snapshot["progress"]), 0.99)
        eta = float(snapshot.get("eta_seconds") or 0.0)
        preview = snapshot.get("preview_key")
        wants_image = request.query.get("skip_current_image", "false").lower() != "true"
        if preview and wants_image and not status.terminal:
            with contextlib.suppress(ObjectNotFoundError):
                current_image = base64.b64encode(await res.objects.get(preview)).decode()
    return respond(
        A1111Progress(
            progress=fraction,
            eta_relative=eta,
            state=state,
            current_image=current_image,
            textinfo=None,
        )
    )


async def interrupt(request: web.Request) -> web.StreamResponse:
    """Stop the caller's current task only (A1111's interrupt is global; ours is not)."""
    res = resources(request)
    user = await caller(request, res)
    document = await res.tasks.current(user)
    if document is not None:
        await cancel_document(res, document)
    return respond(Empty())


async def skip(request: web.Request) -> web.StreamResponse:
    """A1111's skip: the caller's running task ends its current job (of ``n_iter``) and
    goes on with the next; the task itself is not cancelled."""
    res = resources(request)
    user = await caller(request, res)
    document = await res.tasks.current(user)
    if document is not None and document["status"] == TaskStatus.RUNNING.value:
        await res.nc.publish(names.cancel_subject(document["_id"]), names.SKIP_PAYLOAD)
        await res.nc.flush()
    return respond(Empty())


async def get_options(request: web.Request) -> web.StreamResponse:
    res = resources(request)
    user = await caller(request, res)
    options = await res.options.get(user)
    if CHECKPOINT_OPTION in options:
        # Stored by name; A1111 answers with the title it lists (``name [hash]``).
        chosen = await res.models.get(str(options[CHECKPOINT_OPTION]))
        if chosen is not None:
            options[CHECKPOINT_OPTION] = model_title(chosen)
    else:
        usable = await res.models.list(ModelType.STABLE_DIFFUSION)
        if len(usable) == 1:
            options[CHECKPOINT_OPTION] = model_title(usable[0])
    return respond(options)


async def set_options(request: web.Request) -> web.StreamResponse:
    res = resources(request)
    user = await caller(request, res)
    changes = await read_json(request)
    if not isinstance(changes, dict):
        raise ApiError(400, "invalid_json", "options must be a JSON object")
    await _check_checkpoint_option(res, changes)
    check_options({**await res.options.get(user), **changes}, res.settings, "options")
    await res.options.update(user, changes)
    return respond(None)


async def _check_checkpoint_option(res: Resources, changes: dict[str, Any]) -> None:
    wanted = changes.get(CHECKPOINT_OPTION)
    if wanted is None:
        return
    name = _TITLE_HASH.sub("", str(wanted))
    if await res.models.get(name) is None:
        raise ApiError(
            404, "model_not_found", f"model {name!r} is not registered", field=CHECKPOINT_OPTION
        )
    changes[CHECKPOINT_OPTION] = name


async def seed_options(request: web.Request) -> web.StreamResponse:
    """The seed's ``POST /options`` ``{"data": {...}}``: a new snapshot of the caller's options."""
    res = resources(request)
    user = await caller(request, res)
    body = await read_json(request)
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        raise ApiError(422, "invalid_field", "`data` must be an object of options", field="data")
    await _check_checkpoint_option(res, data)
    check_options(data, res.settings, "data")
    version = await res.options.update(user, data, replace=True)
    return respond(SeedOptionsResponse(message="success", version=version))


async def sd_models(request: web.Request) -> web.StreamResponse:
    models, shown = await _registry_list(request, ModelType.STABLE_DIFFUSION)
    return respond(
        [
            A1111Checkpoint(
                title=model_title(m),
                model_name=str(m["name"]).rsplit("/", 1)[-1].rsplit(".", 1)[0],
                hash=(m.get("sha256") or "")[:10] or None,
                sha256=m.get("sha256"),
                filename=shown(m["path"]),
                config=None,
            )
            for m in models
            if m["status"] != "failed"
        ]
    )


async def _registry_list(
    request: web.Request, model_type: ModelType
) -> tuple[list[Document], Callable[[str], str]]:
    """The registered models of a type, and how the caller may see their paths."""
    res = resources(request)
    _, admin = await caller_is_admin(request, res)
    return await res.models.list(model_type), server_paths(res, admin)


async def sd_vae(request: web.Request) -> web.StreamResponse:
    models, shown = await _registry_list(request, ModelType.SD_VAE)
    return respond([A1111Vae(model_name=m["name"], filename=shown(m["path"])) for m in models])


async def loras(request: web.Request) -> web.StreamResponse:
    models, shown = await _registry_list(request, ModelType.LORA)
    return respond(
        [
            A1111Lora(name=m["name"], alias=m["name"], path=shown(m["path"]), metadata={})
            for m in models
        ]
    )


def _embedding_shape(path: str) -> tuple[int, int] | None:
    """(vectors, width) of an A1111 embedding file, from its header alone; an SDXL one's
    width is its two encoders' together (768 + 1280 for the real ones)."""
    try:
        tensors, _ = read_safetensors_header(Path(path))
    except (ModelFileError, OSError):
        return None
    if "clip_l" in tensors and "clip_g" in tensors:
        parts = [tensors["clip_l"].shape, tensors["clip_g"].shape]
        if all(len(shape) == 2 for shape in parts):
            return parts[1][0], parts[0][1] + parts[1][1]
        return None
    info = tensors.get("emb_params") or next(
        (t for name, t in tensors.items() if name.startswith("string_to_param")), None
    )
    if info is None or len(info.shape) != 2:
        return None
    return info.shape[0], info.shape[1]


async def embeddings(request: web.Request) -> web.StreamResponse:
    """A1111's ``/sdapi/v1/embeddings``: registered embeddings usable with the caller's
    checkpoint under ``loaded``; unreadable ones and those made for another family than
    that checkpoint's (when both are known) under ``skipped``, as A1111 lists them."""
    res = resources(request)
    user = await caller(request, res)
    checkpoint = None
    with contextlib.suppress(ApiError):  # no default checkpoint: no family to compare with
        checkpoint = await res.models.get(await _checkpoint_name(res, user, {}))
    family = checkpoint.get("family") if checkpoint else None
    loaded: dict[str, A1111Embedding] = {}
    skipped: dict[str, A1111Embedding] = {}
    for model in await res.models.list(ModelType.EMBEDDING):
        shape = await asyncio.to_thread(_embedding_shape, model["path"])
        entry = A1111Embedding(
            step=None,
            sd_checkpoint=None,
            sd_checkpoint_name=None,
            shape=shape[1] if shape else None,
            vectors=shape[0] if shape else None,
        )
        usable = (
            shape is not None
            and model["status"] != "failed"
            and families_match(family, model.get("family"))
        )
        (loaded if usable else skipped)[model["name"]] = entry
    return respond(A1111Embeddings(loaded=loaded, skipped=skipped))


ADMINS_ONLY = "reported to administrators (SDSWARM_ADMINS) only"


def _host_ram() -> MemoryFigures:
    """The gateway host's memory, from /proc/meminfo (A1111's ``ram`` block)."""
    fields: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = int(value.split()[0]) * 1024
    total, free = fields.get("MemTotal", 0), fields.get("MemAvailable", 0)
    return MemoryFigures(free=free, used=total - free, total=total)


async def memory(request: web.Request) -> web.StreamResponse:
    """A1111's ``/sdapi/v1/memory``: ``ram`` of the gateway's host; ``cuda`` summed over
    the workers on CUDA devices (from their liveness records), and each worker's figures
    under ``workers`` (sdswarm extension). The host's RAM and the workers (names, models,
    memory) are for administrators only; others get ``cuda`` and an ``error`` for ``ram``."""
    res = resources(request)
    _, admin = await caller_is_admin(request, res)
    records = await bus.worker_records(res.js)
    on_cuda = [r for r in records if r.cuda_total_bytes]
    cuda = CudaMemory(error="no worker runs on a CUDA device")
    if on_cuda:
        total = sum(r.cuda_total_bytes or 0 for r in on_cuda)
        free = sum(r.cuda_free_bytes or 0 for r in on_cuda)
        allocated = sum(r.cuda_allocated_bytes or 0 for r in on_cuda)
        cuda = CudaMemory(
            system=MemoryFigures(free=free, used=total - free, total=total),
            active=MemoryCurrent(current=allocated),
            allocated=MemoryCurrent(current=allocated),
        )
    if not admin:
        return respond(A1111Memory(ram=MemoryFigures(error=ADMINS_ONLY), cuda=cuda))
    workers = [
        WorkerMemory(
            worker=r.worker,
            model=r.model_name,
            state=r.state.value,
            rss=r.rss_bytes,
            cudaFree=r.cuda_free_bytes,
            cudaTotal=r.cuda_total_bytes,
            cudaAllocated=r.cuda_allocated_bytes,
        )
        for r in records
    ]
    return respond(A1111Memory(ram=_host_ram(), cuda=cuda, workers=workers))


async def samplers(request: web.Request) -> web.StreamResponse:
    return respond([A1111Sampler(name=name, aliases=[], options={}) for name in SAMPLERS])


async def schedulers(request: web.Request) -> web.StreamResponse:
    return respond(
        [
            A1111Scheduler(
                name=label.lower().replace(" ", "_"),
                label=label,
                aliases=None,
                default_rho=-1,
                need_inner_model=False,
            )
            for label in SCHEDULE_TYPES
        ]
    )


def refresh(model_type: ModelType) -> Handler:
    """A1111's ``refresh-*``: rescan the models folder for files of one type now."""

    async def refresh(request: web.Request) -> web.StreamResponse:
        res = resources(request)
        await caller(request, res)
        folder = Path(res.settings.models_dir)
        await register_models(folder, res.models, res.settings.allow_pickle, (model_type,))
        return respond(None)

    return refresh
