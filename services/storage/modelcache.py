"""A worker's local copy of a model that lives in the object store.

A GPU node that does not mount the shared models folder still serves a model registered
from the object store (the seed's ``ossPath``): its worker streams the object into
``<cache_dir>/models/<sha256><suffix>``, checks the SHA-256 the registry recorded, and
loads that. Copies are kept for the next worker and evicted least recently used first
once the folder holds more than ``max_bytes``; the copy in use is never evicted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from services.storage.intake import receive
from services.storage.objects import ObjectStore

log = logging.getLogger(__name__)


class ModelCacheError(Exception):
    pass


async def materialize(
    objects: ObjectStore,
    key: str,
    sha256: str,
    cache_dir: Path,
    *,
    suffix: str = ".safetensors",
    max_bytes: int,
) -> Path:
    """The local path of object ``key``, downloaded and verified unless already cached."""
    folder = cache_dir / "models"
    target = folder / f"{sha256}{suffix}"
    if await asyncio.to_thread(target.is_file):
        await asyncio.to_thread(os.utime, target)  # most recently used
        return target
    started = time.monotonic()
    received = await receive(objects.stream(key), target, max_bytes)
    if received.sha256 != sha256:
        await asyncio.to_thread(received.part.unlink, missing_ok=True)
        raise ModelCacheError(
            f"object {key} has sha256 {received.sha256}, the registry expects {sha256}"
        )
    await asyncio.to_thread(os.replace, received.part, target)
    log.info(
        "fetched %s (%d bytes) into the model cache in %.1f s",
        key,
        received.size,
        time.monotonic() - started,
    )
    await asyncio.to_thread(evict, folder, max_bytes, keep=target)
    return target


def evict(folder: Path, max_bytes: int, *, keep: Path) -> list[Path]:
    """Remove least recently used copies until the folder fits ``max_bytes``."""
    files = sorted(
        (p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")),
        key=lambda p: p.stat().st_mtime,
    )
    total = sum(p.stat().st_size for p in files)
    removed = []
    for path in files:
        if total <= max_bytes:
            break
        if path == keep:
            continue
        total -= path.stat().st_size
        path.unlink(missing_ok=True)
        removed.append(path)
        log.info("model cache: evicted %s", path.name)
    return removed
