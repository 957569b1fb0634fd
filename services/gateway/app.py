"""The gateway: ``create_app(settings)`` and the routes it serves."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from nats.aio.msg import Msg

from proto import names
from services.common import bus, logs
from services.gateway import (
    observe,
    registry,
    routes,
)
from services.gateway.auth import announce, auth_enabled, parse_api_keys
from services.gateway.errors import error_middleware
from services.gateway.resources import RESOURCES, SETTINGS, Resources, StreamSlots
from services.gateway.settings import GatewaySettings
from services.storage.deadletters import DeadLetterStore
from services.storage.deliveries import WebhookStore
from services.storage.idempotency import IdempotencyStore
from services.storage.models import ModelStore
from services.storage.mongo import database, open_client
from services.storage.objects import open_object_store
from services.storage.options import OptionStore
from services.storage.quotas import LoginThrottle, QuotaStore
from services.storage.readcache import ReadCache
from services.storage.tasks import TaskStore
from services.storage.users import UserStore

log = logging.getLogger(__name__)


async def _open_resources(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    caches: list[ReadCache] = []

    async def forget(_: Msg | None = None) -> None:
        # A write anywhere (this gateway's own included), or a reconnect: notices sent
        # while this gateway was away from NATS are lost.
        for cache in caches:
            cache.forget()

    async with contextlib.AsyncExitStack() as stack:
        nc = await bus.connect(settings.nats_url, "sdswarm-gateway", settings, reconnected=forget)
        stack.push_async_callback(nc.drain)
        js = nc.jetstream()
        await bus.ensure_streams(js, settings)
        mongo = open_client(settings.mongodb_url)
        stack.push_async_callback(mongo.close)
        db = database(mongo, settings.mongodb_db)
        tasks, users = TaskStore(db), UserStore(db)
        stack.push_async_callback(tasks.drain)  # before MongoDB closes
        models = ModelStore(db, cache_s=settings.registry_cache_s)
        options = OptionStore(db, cache_s=settings.registry_cache_s)
        caches += (models.reads, options.reads)
        for cache in caches:
            cache.announce = bus.registry_notice(nc)
        await nc.subscribe(names.REGISTRY_CHANGED_SUBJECT, cb=forget)
        await users.ensure_indexes()
        idempotency = IdempotencyStore(db)
        await idempotency.ensure_indexes()
        quotas = QuotaStore(db)
        await quotas.ensure_indexes()
        logins = LoginThrottle(db)
        await logins.ensure_indexes()
        await tasks.ensure_indexes()
        await models.ensure_indexes()
        webhooks = WebhookStore(db)
        await webhooks.ensure_indexes()
        objects = await open_object_store(settings)
        stack.push_async_callback(objects.aclose)
        app[RESOURCES] = Resources(
            settings=settings,
            options=options,
            idempotency=idempotency,
            quotas=quotas,
            nc=nc,
            js=js,
            mongo=mongo,
            tasks=tasks,
            models=models,
            objects=objects,
            cancels=await bus.cancel_bucket(js, settings),
            api_keys=parse_api_keys(settings.api_keys),
            users=users,
            webhooks=webhooks,
            dead_letters=DeadLetterStore(db),
            logins=logins,
            password_checks=asyncio.Semaphore(max(settings.password_checks, 1)),
            streams=StreamSlots(settings.max_sse_streams, settings.max_sse_streams_per_user),
            auth=auth_enabled(settings),
        )
        yield


def create_app(settings: GatewaySettings) -> web.Application:
    announce(settings)
    app = web.Application(
        middlewares=[error_middleware, observe.observe_middleware],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_open_resources)
    registry.add_jobs(app)
    observe.add_listener(app)
    routes.add_routes(app)
    return app


def main() -> None:
    from services.common.settings import from_environ

    settings = from_environ(GatewaySettings)
    logs.setup(settings)
    web.run_app(create_app(settings), host=settings.host, port=settings.port)


if __name__ == "__main__":
    main()
