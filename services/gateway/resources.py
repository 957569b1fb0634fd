"""Typed application keys for the resources the gateway opens at start."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import web
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from pymongo import AsyncMongoClient

from services.common import metrics
from services.gateway.settings import GatewaySettings
from services.storage.deadletters import DeadLetterStore
from services.storage.deliveries import WebhookStore
from services.storage.idempotency import IdempotencyStore
from services.storage.models import ModelStore
from services.storage.mongo import Document
from services.storage.objects import ObjectStore
from services.storage.options import OptionStore
from services.storage.quotas import LoginThrottle, QuotaStore
from services.storage.tasks import TaskStore
from services.storage.users import UserStore


class StreamSlots:
    """Counts this gateway's open event streams; refuses one beyond a limit."""

    def __init__(self, total: int, per_user: int) -> None:
        self.total, self.per_user = total, per_user
        self.open: dict[str, int] = {}

    def take(self, user: str) -> str | None:
        """Hold a slot for ``user``; None, or which limit is reached."""
        if self.total and sum(self.open.values()) >= self.total:
            return f"this gateway holds its limit of {self.total} open event streams"
        if self.per_user and self.open.get(user, 0) >= self.per_user:
            return f"you have {self.per_user} open event streams, the limit; close one"
        self.open[user] = self.open.get(user, 0) + 1
        metrics.SSE_CLIENTS.inc()
        return None

    def give_back(self, user: str) -> None:
        left = self.open.get(user, 0) - 1
        metrics.SSE_CLIENTS.dec()
        if left > 0:
            self.open[user] = left
        else:
            self.open.pop(user, None)


@dataclass(frozen=True)
class Resources:
    settings: GatewaySettings
    nc: Client
    js: JetStreamContext
    mongo: AsyncMongoClient[Document]
    tasks: TaskStore
    options: OptionStore
    idempotency: IdempotencyStore
    quotas: QuotaStore
    models: ModelStore
    objects: ObjectStore
    cancels: KeyValue
    """Cancellation flags: a queued task whose id is here is skipped when fetched."""
    api_keys: dict[str, str]
    users: UserStore
    webhooks: WebhookStore
    dead_letters: DeadLetterStore
    logins: LoginThrottle
    streams: StreamSlots
    """Open SSE streams, per user and in all (``settings.max_sse_streams*``)."""
    password_checks: asyncio.Semaphore
    """Bounds the Argon2 checks running at once (``settings.password_checks``)."""
    auth: bool
    """Whether requests must carry credentials (see :mod:`services.gateway.auth`)."""
    """API key → user."""


SETTINGS = web.AppKey("settings", GatewaySettings)
RESOURCES = web.AppKey("resources", Resources)


def resources(request: web.Request) -> Resources:
    return request.app[RESOURCES]
