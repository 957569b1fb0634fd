"""Which parts the storage service runs (nothing is started: the parts are factories)."""

from __future__ import annotations

import asyncio
from unittest import mock

from services.common.settings import StoreSettings
from services.storage.service import storage_parts


def _parts(settings: StoreSettings) -> set[str]:
    return set(storage_parts(settings, mock.MagicMock(), mock.MagicMock(), asyncio.Event()))


def test_no_webhook_dispatcher_while_webhooks_are_off() -> None:
    """Webhooks off (the default): no task can name one, and a dispatcher would fetch,
    decode and ack every event of every task for nothing."""
    assert "webhooks" not in _parts(StoreSettings())
    assert "storage sink" in _parts(StoreSettings())


def test_the_webhook_dispatcher_runs_once_a_host_is_allowed() -> None:
    assert "webhooks" in _parts(StoreSettings(webhook_allow_hosts=["hooks.example.com"]))
