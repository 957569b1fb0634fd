"""The converted-weights cache: an A1111 single file is converted to the diffusers layout
once per node and saved (safetensors) under ``<cache_dir>/converted``; later starts load
that copy directly, skipping the key renaming and reshaping of the single-file path.

- **Key**: the checkpoint's SHA-256 (the registry's ``SDSWARM_MODEL_SHA256``) and the
  dtype, plus :data:`VERSION`. A copy is only ever stored under the SHA-256 computed from
  the file it was converted from, so a stale registry hash can cost a miss, never a copy of
  other weights.
- **Validity**: each copy records the size and mtime of the file it came from; a file with
  another identity (replaced, or copied to this node) is hashed once before its copy is
  used, and the copy is dropped when the hash differs.
- **Atomic**: a copy is written in a private staging folder and renamed into place; the
  first writer wins, a reader never sees a half-written copy.
- **Bounded**: least recently used copies are removed beyond ``max_bytes``; a copy larger
  than the bound is not kept.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from services.storage.scan import sha256_of

log = logging.getLogger(__name__)
VERSION = "1"
"""Bump when the saved layout changes, so older copies are no longer used."""
SOURCE_FILE = "source.json"
"""Written last: a folder without it is incomplete and never loaded."""


def root(cache_dir: Path) -> Path:
    return cache_dir / "converted"


def entry(cache_dir: Path, sha256: str, dtype: str) -> Path:
    return root(cache_dir) / f"{sha256.lower()}-{dtype}-v{VERSION}"


def _identity(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _write_source(folder: Path, sha256: str, identity: dict[str, int]) -> None:
    staged = folder / f".{SOURCE_FILE}.{os.getpid()}"
    staged.write_text(json.dumps({"sha256": sha256, **identity}))
    staged.replace(folder / SOURCE_FILE)


def lookup(cache_dir: Path, checkpoint: Path, sha256: str, dtype: str) -> Path | None:
    """The converted copy of ``checkpoint``, or None (a miss)."""
    folder = entry(cache_dir, sha256, dtype)
    try:
        source = json.loads((folder / SOURCE_FILE).read_text())
        identity = _identity(checkpoint)
    except (OSError, ValueError):
        return None
    if {k: source.get(k) for k in identity} != identity:
        # Another file than the one converted (replaced, or a copy on this node): its
        # content decides, once; the copy then remembers this file's identity.
        if sha256_of(checkpoint) != sha256.lower():
            log.info("converted copy %s is of another file; converting again", folder.name)
            shutil.rmtree(folder, ignore_errors=True)
            return None
        _write_source(folder, sha256.lower(), identity)
    os.utime(folder)  # most recently used
    return folder


def store(pipe: Any, cache_dir: Path, checkpoint: Path, dtype: str, max_bytes: int) -> Path | None:
    """Save ``pipe`` (just converted from ``checkpoint``) as its cached copy; None when it
    is not kept (larger than ``max_bytes``, or the disk refused it)."""
    identity = _identity(checkpoint)
    sha256 = sha256_of(checkpoint)
    folder = entry(cache_dir, sha256, dtype)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        if _size(staging) > max_bytes:
            log.info("converted copy of %s exceeds the cache bound; not kept", checkpoint.name)
            shutil.rmtree(staging, ignore_errors=True)
            return None
        _write_source(staging, sha256, identity)
        staging.rename(folder)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if (folder / SOURCE_FILE).is_file():
            return folder  # another worker of the same checkpoint won the rename
        log.warning("cannot keep a converted copy of %s: %s", checkpoint.name, exc)
        return None
    evict(cache_dir, max_bytes, keep=folder)
    return folder


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def evict(cache_dir: Path, max_bytes: int, *, keep: Path) -> list[Path]:
    """Remove least recently used copies until the cache fits ``max_bytes``."""
    copies = sorted(
        (p for p in root(cache_dir).iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.stat().st_mtime,
    )
    sizes = {p: _size(p) for p in copies}
    total = sum(sizes.values())
    removed = []
    for folder in copies:
        if total <= max_bytes:
            break
        if folder == keep:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        total -= sizes[folder]
        removed.append(folder)
    return removed
