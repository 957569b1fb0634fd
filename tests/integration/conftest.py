"""Integration fixtures beyond the session servers of tests/conftest.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.common.servers import NatsServer


@pytest.fixture
async def private_nats_url(tmp_path: Path) -> AsyncIterator[str]:
    """A nats-server of the test's own: schedulers set consumer limits and pause
    consumers, which must never meet another test's consumers on the shared server."""
    async with NatsServer(tmp_path / "nats") as server:
        yield server.url
