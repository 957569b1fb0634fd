"""MongoDB connection (PyMongo's async API; Motor reached end of life in May 2026)."""

from __future__ import annotations

from typing import Any

from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

Document = dict[str, Any]


def open_client(url: str) -> AsyncMongoClient[Document]:
    # tz_aware: timestamps come back as aware UTC datetimes, never naive local ones.
    return AsyncMongoClient(url, tz_aware=True, serverSelectionTimeoutMS=5000)


def database(client: AsyncMongoClient[Document], name: str) -> AsyncDatabase[Document]:
    return client[name]
