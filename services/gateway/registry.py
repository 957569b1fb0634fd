"""The seed's model API, with statuses that are true.

- ``GET /models`` (``?type=`` filters) and ``GET /models/{name}`` (``?type=``, default
  checkpoints) read the registry; ``GET`` of one model answers an object (the seed
  answered a one-element array).
- ``POST /models`` registers a file already in the object store (the seed's ``ossPath``):
  it is copied into the models folder in chunks, hashed on the way and checked against
  ``etag``, then inspected. The record says ``registering`` meanwhile. Small files are
  done before the answer (201, or 422 with the reason); a copy that outlasts
  ``registry_wait_s`` answers 202 and goes on: poll ``GET /models/{name}``.
- ``PUT /models/{name}`` with a JSON body re-registers from ``ossPath``; with any other
  body it *is* the file: a streaming upload (never buffered; ``Content-Length`` bounded
  by ``max_model_bytes``; ``?sha256=`` checked when given). A failed or interrupted
  upload leaves nothing behind and can simply be sent again.
- ``DELETE /models/{name}``: new requests get 404 at once; tasks still queued for a
  checkpoint end ``failed`` with the reason; its workers stop; its file is removed; the
  record stays ``deleted`` for history.

Reading is open to every caller; changing the registry is for administrators.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path

from aiohttp import web
from nats.js.errors import NotFoundError

from proto import ModelStatus, ModelType, names
from proto.events import TaskFailed
from proto.requests import RegisterModelRequest
from services.common import bus
from services.gateway.auth import caller_is_admin, require_admin, server_paths
from services.gateway.errors import ApiError
from services.gateway.openapi import ModelAttributes, ModelChange, ModelDeleted, respond
from services.gateway.resources import Resources, resources
from services.gateway.validation import decode, read_body
from services.storage.intake import IntakeError, install, receive, target_path
from services.storage.models import CLAIM_RENEW_S, ClaimedError, claim_interrupted
from services.storage.mongo import Document
from services.storage.objects import ObjectNotFoundError, check_key
from services.storage.scan import remove_model_file

log = logging.getLogger(__name__)
JOBS = web.AppKey("registry_jobs", set[asyncio.Task[None]])


def model_attributes(doc: Document, shown: Callable[[str], str] = str) -> ModelAttributes:
    """A registry document in the seed's ``ModelAttributes`` shape (plus our fields);
    ``shown`` hides server paths from non-administrators (``auth.server_paths``)."""
    stale = claim_interrupted(doc)
    error = "registration was interrupted; register it again" if stale else doc.get("error")
    source = str(doc.get("source") or "")
    return ModelAttributes(
        type=ModelType(doc["type"]),
        name=doc["name"],
        # The object a model was registered from (the seed's meaning), else its file.
        ossPath=source.removeprefix("object:")
        if source.startswith("object:")
        else shown(str(doc.get("path", ""))),
        source=source or "scan",
        etag=doc.get("sha256") or "",
        status=ModelStatus.FAILED if stale else ModelStatus(doc["status"]),
        registeredTime=doc["registered_at"].isoformat(),
        lastModificationTime=doc["modified_at"].isoformat(),
        family=doc.get("family"),
        modelKey=doc["model_key"],
        sha256=doc.get("sha256"),
        sizeBytes=doc.get("size_bytes"),
        error=shown(str(error)) if error else error,
        loadedWorkers=doc.get("loaded_workers", 0),
        draining=bool(doc.get("draining")),
        predictionType=doc.get("prediction_type") or "epsilon",
    )


def _model_type(request: web.Request, default: ModelType | None) -> ModelType | None:
    kind = request.query.get("type")
    if not kind:
        return default
    try:
        return ModelType(kind)
    except ValueError as exc:
        valid = ", ".join(t.value for t in ModelType)
        raise ApiError(422, "invalid_field", f"type must be one of {valid}", field="type") from exc


def _checked_type(request: web.Request) -> ModelType:
    model_type = _model_type(request, ModelType.STABLE_DIFFUSION)
    assert model_type is not None
    return model_type


async def list_models(request: web.Request) -> web.StreamResponse:
    res = resources(request)
    shown = server_paths(res, (await caller_is_admin(request, res))[1])
    documents = await res.models.list(_model_type(request, None))
    return respond([model_attributes(d, shown) for d in documents])


async def get_model(request: web.Request) -> web.StreamResponse:
    res = resources(request)
    shown = server_paths(res, (await caller_is_admin(request, res))[1])
    name, model_type = request.match_info["model_name"], _checked_type(request)
    doc = await res.models.get(name, model_type)
    if doc is None:
        raise ApiError(404, "model_not_found", f"{model_type.value} {name!r} is not registered")
    return respond(model_attributes(doc, shown))


def _target(res: Resources, model_type: ModelType, name: str, suffix: str = "") -> Path:
    settings = res.settings
    root = Path(settings.models_dir).resolve()
    try:
        target = target_path(root, model_type, name, settings.allow_pickle, suffix)
    except IntakeError as exc:
        raise _api_error(exc) from exc
    for folder in target.parents:
        if folder == root:
            break
        if folder.exists() and not folder.is_dir():
            raise ApiError(
                422,
                "invalid_field",
                f"`name` {name!r} would put a file below {folder.relative_to(root)},"
                " which is a file, not a folder",
                field="name",
            )
    return target


async def _chunks(request: web.Request, idle_s: float) -> AsyncIterator[bytes]:
    """An upload's chunks, streamed (a model may take minutes); 408 when none arrives for
    ``idle_s``: a stalled sender does not hold the upload open."""
    chunks = request.content.iter_chunked(1024 * 1024).__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(anext(chunks), idle_s)
        except StopAsyncIteration:
            return
        except TimeoutError as exc:
            raise IntakeError(
                408, "body_timeout", f"the upload sent nothing for {idle_s:g} s"
            ) from exc
        yield chunk


def _api_error(exc: IntakeError) -> ApiError:
    return ApiError(exc.status, exc.code, exc.message, field=exc.field)


async def _claim(
    res: Resources, model_type: ModelType, name: str, target: Path, source: str
) -> Document | None:
    """Claim the model for this registration (409 while another one runs); the record
    as it was before."""
    try:
        return await res.models.claim(model_type, name, str(target), source)
    except ClaimedError as exc:
        raise ApiError(409, "registering", str(exc)) from exc


@asynccontextmanager
async def _renewing_claim(res: Resources, model_type: ModelType, name: str) -> AsyncIterator[None]:
    """Keep a registration's claim fresh while its file is copied or uploaded."""

    async def renew() -> None:
        while True:
            await asyncio.sleep(CLAIM_RENEW_S)
            await res.models.renew_claim(name, model_type)

    renewing = asyncio.create_task(renew())
    try:
        yield
    finally:
        renewing.cancel()


async def _copy_from_store(
    res: Resources, body: RegisterModelRequest, name: str, target: Path
) -> None:
    """The registration job: copy, verify, register; a refusal is recorded as ``failed``."""
    model_type = body.type
    try:
        async with _renewing_claim(res, model_type, name):
            store_etag = await res.objects.etag(body.ossPath)
            received = await receive(
                res.objects.stream(body.ossPath), target, res.settings.max_model_bytes
            )
            await install(
                res.models,
                model_type,
                name,
                received,
                target,
                source=f"object:{body.ossPath}",
                expected=body.etag or None,
                store_etag=store_etag,
            )
    except (IntakeError, ObjectNotFoundError, OSError) as exc:
        message = (
            exc.message
            if isinstance(exc, IntakeError)
            else f"object {body.ossPath!r} not found"
            if isinstance(exc, ObjectNotFoundError)
            else f"copy failed: {exc}"
        )
        await res.models.update(
            name, model_type, {"status": ModelStatus.FAILED.value, "error": message}
        )
        raise


async def _register_from_store(
    request: web.Request, res: Resources, body: RegisterModelRequest, name: str, created: bool
) -> web.StreamResponse:
    try:
        check_key(body.ossPath)
    except ValueError as exc:
        raise ApiError(422, "invalid_field", str(exc), field="ossPath") from exc
    target = _target(res, body.type, name, Path(body.ossPath).suffix)
    if not await res.objects.exists(body.ossPath):
        raise ApiError(
            422, "invalid_field", f"no object {body.ossPath!r} in the store", field="ossPath"
        )
    await _claim(res, body.type, name, target, f"object:{body.ossPath}")
    job = asyncio.create_task(_copy_from_store(res, body, name, target))
    jobs = request.app[JOBS]
    jobs.add(job)
    job.add_done_callback(jobs.discard)
    job.add_done_callback(_log_failure)
    done, _ = await asyncio.wait({job}, timeout=res.settings.registry_wait_s)
    if not done:
        return _answer(await res.models.get(name, body.type), 202, "registering")
    with suppress(IntakeError, ObjectNotFoundError, OSError):
        job.result()
    document = await res.models.get(name, body.type)
    if document and document["status"] == ModelStatus.FAILED.value:
        raise ApiError(422, "invalid_model", str(document.get("error")), field="ossPath")
    return _answer(document, 201 if created else 200, "register success")


def _log_failure(job: asyncio.Task[None]) -> None:
    if not job.cancelled() and (error := job.exception()) is not None:
        log.warning("model registration failed: %s", error)


def _answer(document: Document | None, status: int, message: str) -> web.StreamResponse:
    model = model_attributes(document) if document is not None else None
    return respond(ModelChange(message=message, model=model), status)


async def register_model(request: web.Request) -> web.StreamResponse:
    """``POST /models``: register a file from the object store under a new name."""
    res, _ = await require_admin(request, "register models")
    body = decode(await read_body(request), RegisterModelRequest)
    name = body.name or Path(body.ossPath).name
    if body.type not in (ModelType.STABLE_DIFFUSION, ModelType.SD_VAE):
        name = Path(name).stem if not body.name else name
    known = await res.models.get(name, body.type)
    if known and known["status"] != ModelStatus.FAILED.value and not claim_interrupted(known):
        raise ApiError(409, "model_exists", f"models existed: {body.type.value} {name!r}")
    return await _register_from_store(request, res, body, name, created=True)


async def put_model(request: web.Request) -> web.StreamResponse:
    """``PUT /models/{name}``: JSON re-registers from ``ossPath``; other bodies are the file."""
    res, _ = await require_admin(request, "register models")
    name = request.match_info["model_name"]
    if request.content_type == "application/json":
        body = decode(await read_body(request), RegisterModelRequest)
        if await res.models.get(name, body.type) is None:
            raise ApiError(404, "model_not_found", f"{body.type.value} {name!r} is not registered")
        return await _register_from_store(request, res, body, name, created=False)
    return await _upload(request, res, name, _checked_type(request))


async def _upload(
    request: web.Request, res: Resources, name: str, model_type: ModelType
) -> web.StreamResponse:
    limit = res.settings.max_model_bytes
    if request.content_length is None:
        raise ApiError(411, "length_required", "send the file with a Content-Length")
    if request.content_length > limit:
        raise ApiError(413, "too_large", f"model files are limited to {limit} bytes")
    target = _target(res, model_type, name, request.query.get("suffix", ""))
    known = await _claim(res, model_type, name, target, "upload")
    started = time.monotonic()
    try:
        async with _renewing_claim(res, model_type, name):
            chunks = _chunks(request, res.settings.body_read_timeout_s)
            received = await receive(chunks, target, limit)
            if received.size != request.content_length:
                await asyncio.to_thread(received.part.unlink, missing_ok=True)
                raise IntakeError(400, "incomplete", "the upload ended early")
            await install(
                res.models,
                model_type,
                name,
                received,
                target,
                source="upload",
                expected=request.query.get("sha256") or None,
            )
    except BaseException as exc:
        # A refused or broken upload leaves the registry as it was.
        await asyncio.shield(res.models.unclaim(model_type, name, known))
        if isinstance(exc, IntakeError):
            raise _api_error(exc) from exc
        raise
    log.info(
        "uploaded %s %s: %d bytes in %.1f s",
        model_type.value,
        name,
        received.size,
        time.monotonic() - started,
    )
    document = await res.models.get(name, model_type)
    return _answer(document, 201 if known is None else 200, "register success")


async def delete_model(request: web.Request) -> web.StreamResponse:
    res, _ = await require_admin(request, "delete models")
    name, model_type = request.match_info["model_name"], _checked_type(request)
    if request.query.get("drain", "").lower() in ("1", "true", "yes"):
        return await _drain(res, name, model_type)
    document = await res.models.mark_deleted(name, model_type)
    if document is None:
        raise ApiError(404, "model_not_found", f"{model_type.value} {name!r} is not registered")
    failed = 0
    if model_type is ModelType.STABLE_DIFFUSION:
        failed = await _fail_queued(res, document)
    folder = Path(res.settings.models_dir)
    await asyncio.to_thread(remove_model_file, Path(document["path"]), folder)
    log.info("deleted %s %s (%d queued tasks failed)", model_type.value, name, failed)
    return respond(ModelDeleted(message="delete success", failedTasks=failed))


async def _drain(res: Resources, name: str, model_type: ModelType) -> web.StreamResponse:
    """Delete once the queue is empty: new requests → 404 now, queued tasks still run.

    The storage service finishes the delete when no task of the model is open.
    """
    document = await res.models.update(name, model_type, {"draining": True})
    if document is None:
        raise ApiError(404, "model_not_found", f"{model_type.value} {name!r} is not registered")
    queued = await res.tasks.count_open({"model_key": document["model_key"]})
    log.info("draining %s %s (%d open tasks)", model_type.value, name, queued)
    return respond(ModelDeleted(message="draining", openTasks=queued), 202)


async def _fail_queued(res: Resources, model: Document) -> int:
    """Remove a deleted checkpoint's queue; each task still waiting ends ``failed``.

    Tasks already running finish on their worker; the scheduler then stops the workers.
    """
    key = model["model_key"]
    with suppress(NotFoundError):
        await res.js.purge_stream(names.TASK_STREAM, subject=names.task_subject(key))
    with suppress(NotFoundError):
        await res.js.delete_consumer(names.TASK_STREAM, names.consumer_name(key))
    waiting = await res.tasks.waiting_ids(key)
    for task_id in waiting:
        event = TaskFailed(
            task_id=task_id,
            attempt=0,
            at=time.time(),
            worker="gateway",
            code="model_deleted",
            message=f"checkpoint {model['name']!r} was deleted before the task started",
        )
        await bus.publish_event(res.js, event, f"{event.task_id}.failed.model-deleted")
    return len(waiting)


async def _cancel_jobs(app: web.Application) -> AsyncIterator[None]:
    jobs: set[asyncio.Task[None]] = set()
    app[JOBS] = jobs
    yield
    for job in list(jobs):
        job.cancel()
    await asyncio.gather(*jobs, return_exceptions=True)


def add_jobs(app: web.Application) -> None:
    """Registration jobs still copying when the app stops are cancelled."""
    app.cleanup_ctx.append(_cancel_jobs)
