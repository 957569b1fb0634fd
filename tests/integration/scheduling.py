"""Helpers of the scheduler's integration tests."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from proto import ModelType
from services.scheduler.settings import SchedulerSettings
from services.storage.models import model_document
from services.storage.mongo import Document


def checkpoint(name: str) -> Document:
    """A registered checkpoint whose file no worker will load (stand-in workers)."""
    return model_document(
        name=name,
        model_type=ModelType.STABLE_DIFFUSION,
        path="/nonexistent.safetensors",
        family="sd1",
        size_bytes=1,
    )


def stand_in_worker(folder: Path, name: str, source: str) -> list[str]:
    """The command line of a stand-in worker process running ``source``."""
    script = folder / f"{name}.py"
    script.write_text(source)
    return [sys.executable, str(script)]


def scheduler_settings(
    nats_url: str, mongo_url: str, db: Any, folder: Path, **overrides: Any
) -> SchedulerSettings:
    """A scheduler's settings on these servers and database, its files under ``folder``."""
    return SchedulerSettings(
        nats_url=nats_url,
        mongodb_url=mongo_url,
        mongodb_db=db.name,
        worker_log_dir=str(folder / "logs"),
        cache_dir=str(folder / "cache"),
        **overrides,
    )
