"""Fixtures shared by every test tier: real servers and the tiny checkpoint."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from services.common.servers import MongoServer, NatsServer, SeaweedS3
from tests import servers
from tests.servers import MongoInfo, NatsInfo, S3Info

if TYPE_CHECKING:  # the whole system's imports stay out of unit-test runs
    from tests.system import SystemFactory


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        for server in servers.STARTED:
            report.sections.append((f"{server.name} log (tail)", server.tail_log(60)))
    return report


@pytest.fixture(scope="session")
async def nats_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[NatsInfo]:
    external = servers.external_nats()
    if external:
        yield external
        return
    async with NatsServer(tmp_path_factory.mktemp("nats")) as server:
        servers.STARTED.append(server)
        yield NatsInfo(server.url)


@pytest.fixture(scope="session")
async def mongo_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[MongoInfo]:
    external = servers.external_mongo()
    if external:
        yield external
        return
    async with MongoServer(tmp_path_factory.mktemp("mongo")) as server:
        servers.STARTED.append(server)
        yield MongoInfo(server.url)


@pytest.fixture(scope="session")
async def s3_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[S3Info]:
    external = servers.external_s3()
    if external:
        yield external
        return
    async with SeaweedS3(tmp_path_factory.mktemp("seaweedfs")) as server:
        servers.STARTED.append(server)
        yield S3Info(
            endpoint_url=server.endpoint_url,
            access_key=server.access_key,
            secret_key=server.secret_key,
            region=server.region,
        )


@pytest.fixture
async def fresh_db(mongo_server: MongoInfo) -> AsyncIterator[Any]:
    """A database of the test's own on the session's MongoDB server, dropped after."""
    from services.storage.mongo import database, open_client

    client = open_client(mongo_server.url)
    name = f"t_{secrets.token_hex(4)}"
    try:
        yield database(client, name)
    finally:
        await client.drop_database(name)
        await client.close()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight SD1.x checkpoint as an A1111 single-file ``.safetensors``."""
    from services.inference.tiny import build_tiny_sd1

    return build_tiny_sd1(tmp_path_factory.mktemp("tiny")).single_file


@pytest.fixture(scope="session")
def make_system(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, mongo_server: MongoInfo
) -> SystemFactory:
    """``async with make_system(**overrides) as system``: the whole system, stopped after."""
    from tests.system import SystemFactory

    return SystemFactory(tmp_path_factory, tiny_checkpoint, mongo_server.url)


@pytest.fixture(scope="session")
def models_dir(make_system: SystemFactory) -> Path:
    """The tiny checkpoint as ``Stable-diffusion/tiny.safetensors``: shared, never change it."""
    return make_system.default_models
