"""Which checkpoint file a worker loads, and whether the registry's hash is that file's.

The scheduler starts a worker from the registry's record as it read it: the path, the
SHA-256 (shown as A1111's ``Model hash`` and keying the converted-weights cache) and the
size and mtime of the file that hash was computed from. A re-upload renames a new file
over the path; a worker started from a record read just before that would load the new
weights and report the old hash. So before loading, the worker compares the file with the
record, and hashes a file that is not the one described (once, only then).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import msgspec

from services.inference.settings import WorkerSettings
from services.storage.scan import sha256_of

log = logging.getLogger(__name__)

FileIdentity = tuple[int, int, int]
"""Inode, size and mtime (ns): a rename over the file (an upload) changes them."""

ATTEMPTS = 3
"""Hashes of a file that keeps changing while it is read, before giving up on a hash."""


def file_identity(path: Path) -> FileIdentity | None:
    try:
        return _identity(path.stat())
    except OSError:
        return None


def _identity(found: os.stat_result) -> FileIdentity:
    return found.st_ino, found.st_size, found.st_mtime_ns


def described(settings: WorkerSettings) -> tuple[WorkerSettings, FileIdentity | None]:
    """``settings`` with a hash that is true of the checkpoint file now at its path, and
    that file's identity (what the worker then watches for a replacement). Unchanged when
    the file is the one the record describes, when the record describes none (a diffusers
    folder, an older record) or when the file is missing (loading it reports why)."""
    path = Path(settings.checkpoint_path)
    for _ in range(ATTEMPTS):
        try:
            before = path.stat()
        except OSError:
            return settings, None
        identity = _identity(before)
        if not stat.S_ISREG(before.st_mode) or settings.model_mtime <= 0:
            return settings, identity
        if (before.st_size, before.st_mtime) == (settings.model_size, settings.model_mtime):
            return settings, identity
        digest = sha256_of(path)
        if file_identity(path) == identity:
            log.warning(
                "checkpoint %s is not the file its registry record describes (replaced "
                "since); its own hash is %s",
                path,
                digest[:10],
            )
            return msgspec.structs.replace(
                settings, model_hash=digest[:10], model_sha256=digest
            ), identity
    log.warning("checkpoint %s kept changing while it was hashed; its hash is unknown", path)
    return msgspec.structs.replace(settings, model_hash="", model_sha256=""), file_identity(path)
