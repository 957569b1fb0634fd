"""The e2e tier's shared system: one per module, on a local folder and on S3."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.system import System, SystemFactory, s3_store


@pytest.fixture(scope="module", params=["local", "s3"])
async def system(
    request: pytest.FixtureRequest, make_system: SystemFactory, s3_server: Any
) -> AsyncIterator[System]:
    store = s3_store(s3_server) if request.param == "s3" else None
    async with make_system(store=store) as system:
        yield system
