"""The caller's webhook signing secret and the deliveries that gave up (see
:mod:`services.storage.webhooks`)."""

from __future__ import annotations

from aiohttp import web

from proto.requests import Webhook
from services.gateway.auth import caller
from services.gateway.errors import ApiError
from services.gateway.openapi import WebhookFailure, WebhookSecret, respond
from services.gateway.resources import Resources, resources
from services.storage.webhooks import WebhookRefusedError, check_url

MAX_LISTED = 200


async def checked_webhook(res: Resources, webhook: Webhook | None) -> dict[str, object] | None:
    """What a task document keeps of its request's webhook, after the guard (422 if refused)."""
    if webhook is None:
        return None
    try:
        await check_url(webhook.url, res.settings)  # the same guard as at delivery
    except WebhookRefusedError as exc:
        raise ApiError(422, "invalid_field", f"`webhook.url`: {exc}", field="webhook.url") from exc
    return {"url": webhook.url, "events": sorted(set(webhook.events))}


async def secret(request: web.Request) -> web.StreamResponse:
    res = resources(request)
    user = await caller(request, res)
    return respond(WebhookSecret(secret=await res.webhooks.secret(user)))


async def failures(request: web.Request) -> web.StreamResponse:
    res = resources(request)
    user = await caller(request, res)
    return respond(
        [
            WebhookFailure(
                deliveryId=doc["_id"],
                taskId=doc["task_id"],
                url=doc["url"],
                event=doc["event"],
                attempts=doc["attempts"],
                error=doc["error"],
                at=doc["at"].isoformat(),
            )
            for doc in await res.webhooks.list_failures(user, MAX_LISTED)
        ]
    )
