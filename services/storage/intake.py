"""Model files coming in: streamed to disk, hashed on the way, verified, then registered.

Every way in (an HTTP upload, a copy from the object store) hands :func:`receive` an
async stream of chunks, so a multi-GB file never sits in memory. The bytes land in a
hidden ``.part`` file beside the target; only a file that matches its expected digest
and whose tensors say it is the declared type is renamed into the models folder (an
atomic rename: a worker never sees half a file) and registered. Anything else is
removed, and the caller gets an :class:`IntakeError` that says why. Nothing in the
file is ever executed: safetensors headers are parsed with a size bound, and pickles
are accepted only when the operator allows them, unread.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from proto import ModelType
from services.storage.models import ModelStore, canonical_name, name_problem
from services.storage.scan import (
    NAMED_BY_PATH,
    allowed_suffixes,
    inspect_as,
    register_file,
    upload_folder,
)

MAX_NAME_CHARS = 255


class IntakeError(Exception):
    """A model file or name was refused; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field


def target_path(
    models_dir: Path, model_type: ModelType, name: str, allow_pickle: bool, suffix: str = ""
) -> Path:
    """Where the file of ``(type, name)`` lives, or an :class:`IntakeError` for a bad name.

    Checkpoints and VAEs are named by their path (``anime/model.safetensors``; sub-folders,
    spaces and Unicode allowed); other types by a bare stem (``<lora:ink>``), whose file
    gets ``suffix`` (default ``.safetensors``). The name is taken in its canonical
    spelling (NFC, no trailing or doubled ``/``); look-alike characters are refused.
    """
    if problem := name_problem(name):
        raise IntakeError(422, "invalid_field", problem, field="name")
    absolute = name.startswith("/")
    name = canonical_name(name)
    parts = PurePosixPath(name).parts
    bad = (
        not name
        or len(name) > MAX_NAME_CHARS
        or name != name.strip()
        or "\\" in name
        or absolute
        or any(part in (".", "..") or part.startswith(".") for part in name.split("/"))
    )
    if bad:
        raise IntakeError(
            422,
            "invalid_field",
            "`name` must be a relative path of at most 255 characters, without `..`, hidden"
            " parts, backslashes or control characters",
            field="name",
        )
    allowed = allowed_suffixes(model_type, allow_pickle)
    if model_type in NAMED_BY_PATH:
        if PurePosixPath(name).suffix.lower() not in allowed:
            raise IntakeError(
                422,
                "invalid_field",
                f"a {model_type.value} name must end with {' or '.join(sorted(allowed))}",
                field="name",
            )
        relative = name
    else:
        if len(parts) != 1:
            raise IntakeError(
                422,
                "invalid_field",
                f"a {model_type.value} is named by a bare file stem (no folders)",
                field="name",
            )
        suffix = (suffix or ".safetensors").lower()
        if suffix not in allowed:
            raise IntakeError(
                422,
                "invalid_field",
                f"{suffix} files are refused: only {' or '.join(sorted(allowed))}"
                " (pickles need the operator's SDSWARM_ALLOW_PICKLE)",
                field="ossPath",
            )
        relative = name + suffix
    return models_dir / upload_folder(model_type) / relative


@dataclass(frozen=True)
class Received:
    part: Path
    size: int
    sha256: str
    md5: str


async def receive(chunks: AsyncIterator[bytes], target: Path, max_bytes: int) -> Received:
    """Write ``chunks`` beside ``target`` while hashing them; nothing is kept on error."""
    await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
    # Hidden (the scanner skips it) and with the target's suffix (inspection reads it).
    part = target.with_name(f".{target.stem}.{secrets.token_hex(4)}.part{target.suffix}")
    sha256, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    size = 0
    handle = await asyncio.to_thread(part.open, "wb")
    try:
        async for chunk in chunks:
            size += len(chunk)
            if size > max_bytes:
                raise IntakeError(413, "too_large", f"model files are limited to {max_bytes} bytes")
            sha256.update(chunk)
            md5.update(chunk)
            await asyncio.to_thread(handle.write, chunk)
        await asyncio.to_thread(_close_synced, handle)
    except BaseException:
        handle.close()
        await asyncio.to_thread(part.unlink, missing_ok=True)
        raise
    return Received(part=part, size=size, sha256=sha256.hexdigest(), md5=md5.hexdigest())


def _close_synced(handle: BinaryIO) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()


def digest_matches(expected: str, received: Received, store_etag: str | None = None) -> bool:
    """The seed's ``etag``: the object store's ETag, the file's MD5 or its SHA-256."""
    wanted = expected.strip().strip('"').lower()
    known = {received.sha256, received.md5, (store_etag or "").strip('"').lower()}
    return wanted in known - {""}


async def install(
    store: ModelStore,
    model_type: ModelType,
    name: str,
    received: Received,
    target: Path,
    *,
    source: str,
    expected: str | None = None,
    store_etag: str | None = None,
) -> None:
    """Verify a received file, move it into place and register it (refused: removed)."""
    try:
        if expected and not digest_matches(expected, received, store_etag):
            raise IntakeError(
                422,
                "etag_mismatch",
                f"the file's digests (sha256 {received.sha256}, md5 {received.md5}) do not"
                f" match the expected etag {expected}",
                field="etag",
            )
        checked = await asyncio.to_thread(inspect_as, received.part, model_type)
        if checked.error:
            raise IntakeError(422, "invalid_model", checked.error)
        await asyncio.to_thread(os.replace, received.part, target)
    except BaseException:
        await asyncio.to_thread(received.part.unlink, missing_ok=True)
        raise
    await register_file(store, model_type, name, target, sha256=received.sha256, source=source)
