"""The seed's functions API: one "function" per checkpoint, its worker pool.

A function is named after its consumer, ``sd_<model_key>`` (readable, unlike the seed's
64-hex hashes). Its settings live on the checkpoint's registry document; the scheduler
reads ``min_instances``, ``max_instances`` and ``idle_timeout_s`` from there and hands
``env`` to the workers. Settings the local backend cannot express (CPU, memory, image,
mounts …) are stored for the Swarm backend and listed as ``unsupported`` per function,
never silently dropped. Only administrators may change functions.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgspec
from aiohttp import web
from nats.js.errors import NotFoundError

from proto import ModelType, names
from proto.requests import BatchUpdateSdResourceRequest, DeleteFunctionsRequest, WarmModelRequest
from services.gateway.auth import require_admin
from services.gateway.errors import ApiError
from services.gateway.openapi import DeadLetter, Message, Warming, respond
from services.gateway.resources import Resources
from services.gateway.responses import (
    FunctionFailure,
    FunctionInfo,
    FunctionMissing,
    FunctionsDeleted,
    FunctionsList,
    FunctionsUpdate,
    FunctionUpdated,
)
from services.gateway.validation import bounded_int, decode, read_body
from services.storage.models import warm_until
from services.storage.mongo import Document

SCHEDULER_FIELDS: dict[str, str] = {
    "minInstances": "min_instances",
    "maxInstances": "max_instances",
    "idleTimeout": "idle_timeout_s",
    "maxBatch": "max_batch",
}
LOCAL_FIELDS = frozenset({"env"})
"""What the local backend applies besides the scheduler fields."""


async def _function(res: Resources, model: Document) -> FunctionInfo:
    key = model["model_key"]
    backlog = running = share = 0
    try:
        info = await res.js.consumer_info(names.TASK_STREAM, names.consumer_name(key))
        backlog, running = int(info.num_pending or 0), int(info.num_ack_pending or 0)
        share = 0 if getattr(info, "paused", False) else int(info.config.max_ack_pending or 0)
    except NotFoundError:
        pass
    until = warm_until(model)
    return FunctionInfo(
        functionName=names.consumer_name(key),
        model=model["name"],
        state=model["status"],
        replicas=model.get("loaded_workers", 0),
        share=share,
        backlog=backlog,
        running=running,
        minInstances=model.get("min_instances") or 0,
        maxInstances=model.get("max_instances"),
        idleTimeout=model.get("idle_timeout_s"),
        maxBatch=model.get("max_batch"),
        warmUntil=until.isoformat() if until else None,
        # The measured cold start (process start → ready) of the slowest live worker and
        # its phases (imports, device, config, weights, warmup); null until measured.
        coldStartSeconds=model.get("cold_start_s"),
        coldStartPhases=model.get("cold_start_phases") or {},
        resources=model.get("function") or {},
    )


async def list_functions(request: web.Request) -> web.StreamResponse:
    res, _ = await require_admin(request, "manage functions")
    models = await res.models.list(ModelType.STABLE_DIFFUSION)
    functions = [await _function(res, m) for m in models]
    return respond(FunctionsList(status="success", functions=functions, errMsg=""))


async def batch_update(request: web.Request) -> web.StreamResponse:
    res, _ = await require_admin(request, "manage functions")
    body = decode(await read_body(request), BatchUpdateSdResourceRequest)
    given = {
        k: v for k, v in msgspec.structs.asdict(body).items() if v is not None and k != "models"
    }
    low, high = body.minInstances, body.maxInstances
    if low is not None and high is not None and low > high:
        raise ApiError(
            422,
            "invalid_field",
            "`minInstances` must not exceed `maxInstances`",
            field="minInstances",
        )
    models = await res.models.list(ModelType.STABLE_DIFFUSION)
    by_name = {m["name"]: m for m in models}
    targets = body.models or list(by_name)
    failed = [
        FunctionFailure(model=name, err="not registered") for name in targets if name not in by_name
    ]
    updated = []
    for name in targets:
        model = by_name.get(name)
        if model is None:
            continue
        changes: dict[str, Any] = {
            SCHEDULER_FIELDS[k]: v for k, v in given.items() if k in SCHEDULER_FIELDS
        }
        for field, value in given.items():
            if field not in SCHEDULER_FIELDS:
                changes[f"function.{field}"] = value
        if changes:
            await res.models.configure(model, changes)
        unsupported = sorted(
            k for k in given if k not in SCHEDULER_FIELDS and k not in LOCAL_FIELDS
        )
        updated.append(
            FunctionUpdated(
                functionName=names.consumer_name(model["model_key"]),
                model=name,
                status="success",
                unsupported=unsupported,
            )
        )
    return respond(
        FunctionsUpdate(
            status="fail" if failed else "success",
            functions=updated,
            failFuncList=failed,
            errMsg="|".join(f"{f.model}: {f.err}" for f in failed),
        ),
        500 if failed else 200,
    )


async def delete_functions(request: web.Request) -> web.StreamResponse:
    """Back to defaults and to zero workers; the pool comes back on demand (serverless)."""
    res, _ = await require_admin(request, "manage functions")
    body = decode(await read_body(request), DeleteFunctionsRequest)
    models = {
        names.consumer_name(m["model_key"]): m
        for m in await res.models.list(ModelType.STABLE_DIFFUSION)
    }
    fails = [
        FunctionMissing(functionName=f, err="no such function")
        for f in body.functions
        if f not in models
    ]
    for function in body.functions:
        model = models.get(function)
        if model is not None:
            await res.models.reset_function(model)
    if fails:
        return respond(FunctionsDeleted(status="fail", fails=fails), 500)
    return respond(FunctionsDeleted(status="success"))


async def warm(request: web.Request) -> web.StreamResponse:
    """Pre-warm: start a checkpoint's worker ahead of traffic, with no task queued.

    It sets ``warm_until`` on the checkpoint; until then the scheduler keeps at least one
    worker (as ``minInstances`` 1 would), and afterwards the idle timeout applies.
    """
    res, _ = await require_admin(request, "warm models")
    raw = await request.read()
    body = decode(raw, WarmModelRequest) if raw.strip() else WarmModelRequest()
    name = request.match_info["model_name"]
    until = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=body.seconds)
    model = await res.models.update(name, ModelType.STABLE_DIFFUSION, {"warm_until": until})
    if model is None:
        raise ApiError(404, "model_not_found", f"checkpoint {name!r} is not registered")
    return respond(
        Warming(
            message="warming",
            model=name,
            functionName=names.consumer_name(model["model_key"]),
            warmUntil=until.isoformat(),
            coldStartSeconds=model.get("cold_start_s"),
        ),
        202,
    )


async def restart(request: web.Request) -> web.StreamResponse:
    """The seed's ``POST /restart``: a rolling restart of every worker, losing no task.

    Each worker finishes (or hands back) its task and steps down, one after another
    within its pool; the scheduler starts fresh ones, which read the current settings.
    """
    res, user = await require_admin(request, "restart workers")
    await res.nc.publish(names.RESTART_SUBJECT, user.encode())
    await res.nc.flush()
    return respond(Message(message="success"))


async def dead_letters(request: web.Request) -> web.StreamResponse:
    """Tasks JetStream gave up on (``services.storage.deadletters``), newest first."""
    res, _ = await require_admin(request, "list dead letters")
    limit = bounded_int(request.query.get("limit", "50"), "limit", 1, 500)
    return respond(
        [
            DeadLetter(
                id=doc["_id"],
                taskId=doc.get("task_id"),
                subject=doc["subject"],
                advisory=doc["advisory"],
                consumer=doc["consumer"],
                deliveries=doc["deliveries"],
                at=doc["at"].isoformat(),
            )
            for doc in await res.dead_letters.recent(limit)
        ]
    )
