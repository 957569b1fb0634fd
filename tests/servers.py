"""Session-wide real servers for integration and e2e tests.

Each is started lazily, the first time a test asks for it, on free loopback ports in
a temp dir, and stopped at the end of the session. ``SDSWARM_TEST_NATS_URL``,
``SDSWARM_TEST_MONGODB_URL`` and ``SDSWARM_TEST_S3_URL`` (with
``SDSWARM_TEST_S3_ACCESS_KEY`` / ``SDSWARM_TEST_S3_SECRET_KEY``) point the tests at
external servers instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from services.common.servers import ManagedServer


@dataclass(frozen=True)
class NatsInfo:
    url: str


@dataclass(frozen=True)
class MongoInfo:
    url: str


@dataclass(frozen=True)
class S3Info:
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"


STARTED: list[ManagedServer] = []
"""Servers this session started; their log tails are attached to failing tests."""


def external_nats() -> NatsInfo | None:
    url = os.environ.get("SDSWARM_TEST_NATS_URL")
    return NatsInfo(url) if url else None


def external_mongo() -> MongoInfo | None:
    url = os.environ.get("SDSWARM_TEST_MONGODB_URL")
    return MongoInfo(url) if url else None


def external_s3() -> S3Info | None:
    url = os.environ.get("SDSWARM_TEST_S3_URL")
    if not url:
        return None
    return S3Info(
        endpoint_url=url,
        access_key=os.environ.get("SDSWARM_TEST_S3_ACCESS_KEY", ""),
        secret_key=os.environ.get("SDSWARM_TEST_S3_SECRET_KEY", ""),
    )
