"""MongoDB connection (PyMongo's async API; Motor reached end of life in May 2026)."""

from __future__ import annotations

from typing import Any

from pymongo import AsyncMongoClient, WriteConcern
from pymongo.asynchronous.database import AsyncDatabase

Document = dict[str, Any]


def open_client(url: str) -> AsyncMongoClient[Document]:
    # tz_aware: timestamps come back as aware UTC datetimes, never naive local ones.
    return AsyncMongoClient(url, tz_aware=True, serverSelectionTimeoutMS=5000)


# Writes that precede an ack (a folded event, a dead letter, a task before its publish)
# must survive a primary failover: acknowledged by a majority and journaled. On a single
# server (SecantusDB, a standalone mongod) the majority is that server.
DURABLE = WriteConcern(w="majority", j=True)


def database(client: AsyncMongoClient[Document], name: str) -> AsyncDatabase[Document]:
    return client.get_database(name, write_concern=DURABLE)
