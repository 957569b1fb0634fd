"""The seed's task API: submit (``/txt2img``, ``/img2img``), result, progress,
cancellation and the caller's task list. Submission itself is :mod:`.submit`.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from typing import Any

from aiohttp import web

from proto import TaskKind, TaskStatus, names
from proto.events import TaskCancelled
from proto.requests import Img2ImgRequest, Txt2ImgRequest
from services.common import bus
from services.gateway.auth import caller
from services.gateway.errors import ApiError
from services.gateway.openapi import (
    CancelResponse,
    ProgressState,
    TaskList,
    TaskProgressResponse,
    TaskResultResponse,
    TaskSummary,
    respond,
)
from services.gateway.resources import Resources, resources
from services.gateway.submit import (
    TASK_ID_HEADER,
    answer,
    echoed_parameters,
    submit,
    submit_once,
)
from services.gateway.validation import bounded_int, check_limits, decode, read_body
from services.storage.mongo import Document
from services.storage.tasks import shown_task_id


async def txt2img(request: web.Request) -> web.StreamResponse:
    return await _seed_submit(request, Txt2ImgRequest)


async def img2img(request: web.Request) -> web.StreamResponse:
    return await _seed_submit(request, Img2ImgRequest)


async def _seed_submit(
    request: web.Request, cls: type[Txt2ImgRequest] | type[Img2ImgRequest]
) -> web.StreamResponse:
    res = resources(request)
    user = await caller(request, res)
    body: Txt2ImgRequest | Img2ImgRequest = decode(await read_body(request), cls).with_firstphase()
    check_limits(body, res.settings)
    submitted = await submit_once(
        request, res, user, lambda task, sync: submit(res, user, body, task, sync=sync)
    )
    return await answer(res, submitted)


async def _owned_task(request: web.Request) -> tuple[Resources, Document]:
    res = resources(request)
    user = await caller(request, res)
    task_id = request.match_info["task_id"]
    document = await res.tasks.get(task_id, user)
    if document is None:
        # The same answer for "absent" and "someone else's": ids are not an oracle.
        raise ApiError(404, "task_not_found", f"task {task_id!r} not found")
    return res, document


async def task_result(request: web.Request) -> web.StreamResponse:
    res, document = await _owned_task(request)
    status = document["status"]
    succeeded = status == TaskStatus.SUCCEEDED.value
    images: list[str] = document["images"] if succeeded else []
    info: Any = {}
    if succeeded and document["info"]:
        info = json.loads(document["info"])
    return respond(
        TaskResultResponse(
            taskId=shown_task_id(document),
            status=status,
            images=images,
            ossUrl=[await res.objects.presign(k, res.settings.presign_ttl_s) for k in images],
            parameters=echoed_parameters(document) if succeeded else {},
            info=info,
            message=document["message"],
            code=document["code"],
        )
    )


async def task_progress(request: web.Request) -> web.StreamResponse:
    res, document = await _owned_task(request)
    status = TaskStatus(document["status"])
    progress = document["progress"]
    # Seed semantics: 1 once finished, never 1 before (capped at 0.99).
    fraction = 1.0 if status.terminal else min(float(progress["progress"]), 0.99)
    preview = progress.get("preview_key")
    started = document.get("started_at")
    eta = float(progress.get("eta_seconds") or 0.0)
    position = cold_start = None
    if status is TaskStatus.WAITING:
        position = await res.tasks.queue_position(document)
        model = await res.models.by_key(document["model_key"])
        if model and model.get("status") != "loaded" and model.get("cold_start_s"):
            # No warm worker: the task waits at least for one to load (measured).
            cold_start = eta = float(model["cold_start_s"])
    shown = shown_task_id(document)
    return respond(
        TaskProgressResponse(
            taskId=shown,
            status=status,
            progress=fraction,
            etaRelative=eta,
            state=ProgressState(
                interrupted=status is TaskStatus.CANCELLED,
                skipped=bool(progress.get("skipped")),
                job=f"task({shown})" if status is TaskStatus.RUNNING else "",
                job_count=progress["job_count"],
                job_no=progress["job_no"],
                job_timestamp=started.strftime("%Y%m%d%H%M%S") if started else "0",
                sampling_step=progress["step"],
                sampling_steps=progress["total_steps"],
            ),
            currentImage=preview or "",
            currentImageUrl=(
                await res.objects.presign(preview, res.settings.presign_ttl_s) if preview else ""
            ),
            message=document["message"],
            queuePosition=position,
            coldStartSeconds=cold_start,
        )
    )


async def cancel_task(request: web.Request) -> web.StreamResponse:
    """Stop a task: a waiting one never starts, a running one stops at its next step.

    The flag in the cancel bucket covers a task still in the queue (the worker skips it
    when fetched); the ``sd.cancel.<id>`` message reaches the worker running it. A
    waiting task is marked ``cancelled`` at once by a ``TaskCancelled`` event of attempt
    0, which the fold ignores if a worker has started it meanwhile (the running worker
    then ends it ``cancelled`` itself).
    """
    res, document = await _owned_task(request)
    return await cancel_document(res, document)


async def cancel_document(res: Resources, document: Document) -> web.StreamResponse:
    task_id, shown = document["_id"], shown_task_id(document)
    status = TaskStatus(document["status"])
    if status.terminal:
        message = f"task {shown!r} already ended {status.value}; nothing to cancel"
        raise ApiError(409, "task_finished", message)
    await res.cancels.put(task_id, b"1")
    await res.nc.publish(names.cancel_subject(task_id), b"")
    if status is TaskStatus.WAITING:
        event = TaskCancelled(task_id=task_id, attempt=0, at=time.time(), worker="gateway")
        await bus.publish_event(res.js, event, f"{task_id}.cancelled.0")
    return respond(
        CancelResponse(taskId=shown, status=status, message="cancellation requested"),
        202,
        {TASK_ID_HEADER: shown},
    )


MAX_PAGE = 100


def _encode_cursor(document: Document) -> str:
    raw = json.dumps([document["created_at"].isoformat(), document["_id"]]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, task_id = json.loads(raw)
        return dt.datetime.fromisoformat(created), str(task_id)
    except (ValueError, TypeError) as exc:
        raise ApiError(
            422, "invalid_field", "cursor is not one this API returned", field="cursor"
        ) from exc


def task_summary(document: Document) -> TaskSummary:
    finished = document.get("finished_at")
    return TaskSummary(
        taskId=shown_task_id(document),
        status=TaskStatus(document["status"]),
        kind=TaskKind(document["kind"]),
        model=document["model_name"],
        progress=document["progress"]["progress"],
        createdTime=document["created_at"].isoformat(),
        finishedTime=finished.isoformat() if finished else None,
        message=document["message"],
    )


async def list_tasks(request: web.Request) -> web.StreamResponse:
    """``GET /tasks``: the caller's history, newest first, filtered and cursor-paginated."""
    res = resources(request)
    user = await caller(request, res)
    query = request.query
    status = query.get("status")
    if status and status not in {s.value for s in TaskStatus}:
        valid = ", ".join(s.value for s in TaskStatus)
        raise ApiError(422, "invalid_field", f"status must be one of {valid}", field="status")
    limit = bounded_int(query.get("limit", "20"), "limit", 1, MAX_PAGE)
    cursor = query.get("cursor")
    documents = await res.tasks.page(
        user,
        limit=limit + 1,
        status=status,
        model_name=query.get("model"),
        before=_decode_cursor(cursor) if cursor else None,
    )
    more = len(documents) > limit
    documents = documents[:limit]
    return respond(
        TaskList(
            tasks=[task_summary(d) for d in documents],
            nextCursor=_encode_cursor(documents[-1]) if more else None,
        )
    )
