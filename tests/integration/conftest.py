"""Integration fixtures beyond the session servers of tests/conftest.py."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from services.common.servers import NatsServer
from services.storage.mongo import Document, database, open_client


@pytest.fixture
async def private_nats_url(tmp_path: Path) -> AsyncIterator[str]:
    """A nats-server of the test's own: schedulers set consumer limits and pause
    consumers, which must never meet another test's consumers on the shared server."""
    async with NatsServer(tmp_path / "nats") as server:
        yield server.url


@pytest.fixture
async def scratch_db(mongo_server: Any) -> AsyncIterator[AsyncDatabase[Document]]:
    """A database of the test's own on the session's MongoDB-wire server, dropped after."""
    client = open_client(mongo_server.url)
    name = f"test_{secrets.token_hex(4)}"
    yield database(client, name)
    await client.drop_database(name)
    await client.close()
