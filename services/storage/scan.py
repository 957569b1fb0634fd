"""Register checkpoints found in an A1111-layout models folder.

``<models>/Stable-diffusion/**`` holds single files (``.safetensors``; ``.ckpt`` only
when pickles are allowed) and diffusers folders (a directory with
``model_index.json``). A checkpoint's name is its path relative to that folder with
``/`` separators, as A1111 names them, so two files of the same name in different
sub-folders stay distinct. Each file's family is detected from its tensors; a file
that cannot be read is registered as ``failed`` with the reason, never loaded.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from pathlib import Path

from proto import ModelStatus, ModelType
from services.storage.modelfiles import ModelFileError, inspect_checkpoint
from services.storage.models import ModelStore, model_document

log = logging.getLogger(__name__)
CHECKPOINT_DIR = "Stable-diffusion"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_V_PARAMETERIZATION = re.compile(r"^\s*parameterization:\s*[\"']?v[\"']?\s*$", re.MULTILINE)


def find_checkpoints(models_dir: Path, allow_pickle: bool = False) -> list[Path]:
    root = models_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    suffixes = {".safetensors"} | ({".ckpt"} if allow_pickle else set())
    found: list[Path] = []
    for path in sorted(root.rglob("*")):
        if any(parent in found for parent in path.parents):
            continue  # a file inside a diffusers folder
        is_diffusers_folder = path.is_dir() and (path / "model_index.json").is_file()
        if is_diffusers_folder or (path.is_file() and path.suffix.lower() in suffixes):
            found.append(path)
    return found


async def register_checkpoints(
    models_dir: Path, store: ModelStore, allow_pickle: bool = False
) -> list[str]:
    """Upsert every checkpoint found; returns their names."""
    root = models_dir / CHECKPOINT_DIR
    registered = []
    for path in find_checkpoints(models_dir, allow_pickle):
        name = path.relative_to(root).as_posix()
        stat = path.stat()
        size = stat.st_size if path.is_file() else 0
        sha256 = await _file_sha256(store, name, path, size, stat.st_mtime)
        error: str | None = None
        family: str | None = None
        if path.suffix.lower() in PICKLE_SUFFIXES:
            pass  # allowed pickles are only inspected by the worker, weights-only
        else:
            try:
                info = await asyncio.to_thread(inspect_checkpoint, path)
                family = info.family.value if info.family else None
                if family is None:
                    error = "not a Stable Diffusion checkpoint this server can run (unknown layout)"
            except ModelFileError as exc:
                error = str(exc)
        document = model_document(
            name=name,
            model_type=ModelType.STABLE_DIFFUSION,
            path=str(path.resolve()),
            family=family,
            size_bytes=size,
            sha256=sha256,
            mtime=stat.st_mtime,
            prediction_type=prediction_type_of(path),
        )
        await store.upsert(document)
        if error:
            log.warning("cannot use checkpoint %s: %s", name, error)
            await store.set_status(name, ModelStatus.FAILED, error)
        registered.append(name)
    return registered


async def _file_sha256(
    store: ModelStore, name: str, path: Path, size: int, mtime: float
) -> str | None:
    """SHA-256 of a single file (A1111's model hash), reused while size and mtime match."""
    if not await asyncio.to_thread(path.is_file):
        return None
    known = await store.get(name)
    unchanged = known and known.get("size_bytes") == size and known.get("mtime") == mtime
    if known and unchanged and known.get("sha256"):
        return str(known["sha256"])
    return await asyncio.to_thread(sha256_of, path)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(8 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def prediction_type_of(path: Path) -> str | None:
    """A1111's convention: ``model.yaml`` beside ``model.safetensors`` with
    ``parameterization: "v"`` marks a v-prediction model (SD2.x 768-v); the weights
    cannot tell. Only that line is read; the YAML is never executed or fully parsed."""
    config = path.with_suffix(".yaml")
    try:
        text = config.read_text(errors="replace")[:65536]
    except OSError:
        return None
    return "v_prediction" if _V_PARAMETERIZATION.search(text) else None
