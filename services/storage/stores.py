"""Open MongoDB with the task and model stores a service needs, indexes ensured."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from pymongo.asynchronous.database import AsyncDatabase

from services.common.settings import StoreSettings
from services.storage.models import ModelStore
from services.storage.mongo import Document, database, open_client
from services.storage.tasks import TaskStore


@dataclass(frozen=True)
class Stores:
    db: AsyncDatabase[Document]
    models: ModelStore
    tasks: TaskStore


async def open_stores(stack: contextlib.AsyncExitStack, settings: StoreSettings) -> Stores:
    """The database of ``settings``; the client closes with ``stack``."""
    mongo = open_client(settings.mongodb_url)
    stack.push_async_callback(mongo.close)
    db = database(mongo, settings.mongodb_db)
    stores = Stores(db=db, models=ModelStore(db), tasks=TaskStore(db))
    await stores.models.ensure_indexes()
    await stores.tasks.ensure_indexes()
    return stores
