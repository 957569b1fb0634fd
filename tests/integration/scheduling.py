"""Helpers of the scheduler's integration tests."""

from __future__ import annotations

import sys
from pathlib import Path

from proto import ModelType
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
