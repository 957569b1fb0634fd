"""Register the models found in an A1111-layout models folder.

Each model type has its folder (``Stable-diffusion/``, ``VAE/``, ``Lora/``, …). Files
are ``.safetensors``; pickles (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) only when the
operator allows them, and then they are never opened here. Checkpoints may also be
diffusers folders (a directory with ``model_index.json``).

Names follow A1111: a checkpoint or VAE is named by its path relative to its folder
with ``/`` separators (so two files of the same name in different sub-folders stay
distinct); a LoRA, embedding, ControlNet, upscaler or face restorer by its file stem, which is what
prompts and ControlNet units name. Each file's type and family are detected from its
tensors; a file that cannot be read, or whose tensors say it is another type than its
folder, is registered ``failed`` with the reason and never loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from proto import ModelStatus, ModelType
from services.storage.modelfiles import ModelFileError, inspect_model
from services.storage.models import ModelStore, canonical_name, model_document, name_problem
from services.storage.tasks import TaskStore

log = logging.getLogger(__name__)
CHECKPOINT_DIR = "Stable-diffusion"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_V_PARAMETERIZATION = re.compile(r"^\s*parameterization:\s*[\"']?v[\"']?\s*$", re.MULTILINE)

FOLDERS: dict[ModelType, tuple[str, ...]] = {
    ModelType.STABLE_DIFFUSION: (CHECKPOINT_DIR,),
    ModelType.SD_VAE: ("VAE",),
    ModelType.LORA: ("Lora", "LyCORIS"),
    ModelType.EMBEDDING: ("embeddings",),
    ModelType.CONTROL_NET: ("ControlNet",),
    ModelType.UPSCALER: ("ESRGAN", "RealESRGAN", "SwinIR", "DAT", "ScuNET"),
    # A1111's Codeformer/ folder is left out: CodeFormer is not supported (licence, README).
    ModelType.FACE_RESTORER: ("GFPGAN",),
    ModelType.VAE_APPROX: ("VAE-approx",),
}
"""Where A1111 (and its ControlNet extension) keeps each type, under the models folder."""

DRAIN_CHECK_S = 2.0
NAMED_BY_PATH = frozenset({ModelType.STABLE_DIFFUSION, ModelType.SD_VAE})


def upload_folder(model_type: ModelType) -> str:
    """The folder new files of ``model_type`` are written to."""
    return FOLDERS[model_type][0]


def model_name(model_type: ModelType, relative: Path) -> str:
    """A1111's name of a file, in its canonical spelling (NFC: one model per spelling)."""
    return canonical_name(relative.as_posix() if model_type in NAMED_BY_PATH else relative.stem)


def allowed_suffixes(model_type: ModelType, allow_pickle: bool) -> set[str]:
    if not allow_pickle:
        return {".safetensors"}
    if model_type is ModelType.STABLE_DIFFUSION:
        return {".safetensors", ".ckpt"}
    return {".safetensors", *PICKLE_SUFFIXES}


def find_models(
    models_dir: Path, model_type: ModelType, allow_pickle: bool = False
) -> list[tuple[Path, Path]]:
    """``(path, path relative to its type folder)`` of each model file of ``model_type``."""
    suffixes = allowed_suffixes(model_type, allow_pickle)
    found: list[tuple[Path, Path]] = []
    for folder in FOLDERS[model_type]:
        root = models_dir / folder
        if not root.is_dir():
            continue
        taken: list[Path] = []
        for path in sorted(root.rglob("*")):
            if any(parent in taken for parent in path.parents):
                continue  # a file inside a diffusers folder
            if any(part.startswith(".") for part in path.relative_to(root).parts):
                continue  # hidden: uploads in progress, editor and OS files
            diffusers_folder = (
                model_type is ModelType.STABLE_DIFFUSION
                and path.is_dir()
                and (path / "model_index.json").is_file()
            )
            if diffusers_folder or (path.is_file() and path.suffix.lower() in suffixes):
                taken.append(path)
                found.append((path, path.relative_to(root)))
    return found


def find_checkpoints(models_dir: Path, allow_pickle: bool = False) -> list[Path]:
    return [path for path, _ in find_models(models_dir, ModelType.STABLE_DIFFUSION, allow_pickle)]


@dataclass(frozen=True)
class Inspection:
    family: str | None
    error: str | None
    scale: int | None = None
    """An upscaler's factor, read from its shapes (None: not known until loaded)."""


def inspect_as(path: Path, model_type: ModelType) -> Inspection:
    """Check that ``path`` holds a ``model_type`` this server can use (blocking)."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        # An allowed pickle is only ever opened by a worker, weights-only.
        return Inspection(family=None, error=None)
    try:
        info = inspect_model(path)
    except ModelFileError as exc:
        return Inspection(family=None, error=str(exc))
    except OSError as exc:
        return Inspection(family=None, error=f"{path.name}: unreadable: {exc}")
    except Exception as exc:  # a file the parser did not foresee: refuse it, never crash
        log.exception("inspecting %s failed", path)
        return Inspection(family=None, error=f"{path.name}: cannot be read ({exc!r})")
    family = info.family.value if info.family else None
    if info.model_type is not None and info.model_type is not model_type:
        return Inspection(
            family, f"registered as {model_type.value} but the file is a {info.model_type.value}"
        )
    if info.unusable is not None:
        return Inspection(family, info.unusable)
    if model_type is ModelType.STABLE_DIFFUSION and family is None:
        return Inspection(
            None, "not a Stable Diffusion checkpoint this server can run (unknown layout)"
        )
    return Inspection(family=family, error=None, scale=info.scale)


async def register_file(
    store: ModelStore,
    model_type: ModelType,
    name: str,
    path: Path,
    *,
    sha256: str | None = None,
    source: str | None = None,
) -> str | None:
    """Inspect and register one model file; returns the error it was registered with.

    ``sha256`` is computed when not given (reused while size and mtime are unchanged).
    """
    resolved, size, mtime = await asyncio.to_thread(_stat, path)
    if sha256 is None:
        sha256 = await _file_sha256(store, model_type, name, path, size, mtime)
    found = await asyncio.to_thread(inspect_as, path, model_type)
    if problem := name_problem(name):
        found = Inspection(found.family, problem)
    document = model_document(
        name=name,
        model_type=model_type,
        path=str(resolved),
        family=found.family,
        size_bytes=size,
        sha256=sha256,
        mtime=mtime,
        prediction_type=prediction_type_of(path),
        source=source,
    )
    if model_type is ModelType.UPSCALER:
        document["scale"] = found.scale
    if found.error:
        log.warning("cannot use %s %s: %s", model_type.value, name, found.error)
        document |= {"status": ModelStatus.FAILED.value, "error": found.error}
    elif model_type is ModelType.STABLE_DIFFUSION:
        known = await store.get(name, model_type)
        if known and known["status"] in (ModelStatus.LOADING.value, ModelStatus.LOADED.value):
            document["status"] = known["status"]  # the scheduler owns a checkpoint's load state
    await store.upsert(document)
    return found.error


async def register_models(
    models_dir: Path,
    store: ModelStore,
    allow_pickle: bool = False,
    model_types: tuple[ModelType, ...] = tuple(FOLDERS),
) -> list[tuple[ModelType, str]]:
    """Register every model found; models whose files are gone are marked deleted.

    Returns ``(type, name)`` of each model found.
    """
    found: list[tuple[ModelType, str]] = []
    for model_type in model_types:
        files: dict[str, list[Path]] = {}
        for path, relative in find_models(models_dir, model_type, allow_pickle):
            files.setdefault(model_name(model_type, relative), []).append(path)
        for name, paths in files.items():
            path = await _one_file(store, model_type, name, paths)
            found.append((model_type, name))
            try:
                await register_file(store, model_type, name, path, source="scan")
            except OSError as exc:  # removed mid-scan: the next scan sees it gone
                log.warning("%s %s: skipped, %s", model_type.value, path, exc)
        for document in await store.list(model_type):
            gone = not await asyncio.to_thread(Path(document["path"]).exists)
            if gone and document["status"] != ModelStatus.REGISTERING.value:
                log.info("%s %s: file removed, marking deleted", model_type, document["name"])
                await store.mark_deleted(document["name"], model_type)
    return found


async def _one_file(store: ModelStore, model_type: ModelType, name: str, paths: list[Path]) -> Path:
    """The file a model name stands for when several spell it (``x`` in NFC and in NFD, or
    two stems with other suffixes): the one registered already, else the first."""
    if len(paths) == 1:
        return paths[0]
    known = await store.get(name, model_type)
    resolved = [await asyncio.to_thread(p.resolve) for p in paths]
    chosen = (
        paths[resolved.index(Path(known["path"]))]
        if known and Path(known["path"]) in resolved
        else paths[0]
    )
    for path in paths:
        if path != chosen:
            log.warning(
                "%s %s: another file named %r is used; this one is ignored",
                model_type.value,
                path,
                name,
            )
    return chosen


async def register_checkpoints(
    models_dir: Path, store: ModelStore, allow_pickle: bool = False
) -> list[str]:
    """Register the checkpoints found; returns their names."""
    found = await register_models(models_dir, store, allow_pickle, (ModelType.STABLE_DIFFUSION,))
    return [name for _, name in found]


async def run_scanner(
    models_dir: Path,
    store: ModelStore,
    stop: asyncio.Event,
    interval_s: float,
    allow_pickle: bool = False,
) -> None:
    """Rescan the models folder every ``interval_s`` (0: never) until ``stop``."""
    while interval_s > 0 and not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
        if not stop.is_set():
            await register_models(models_dir, store, allow_pickle)


def remove_model_file(path: Path, models_dir: Path) -> None:
    """Remove a model's file or diffusers folder, never anything outside the models folder."""
    if not path.resolve().is_relative_to(models_dir.resolve()):
        return
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


async def finish_drains(models_dir: Path, store: ModelStore, tasks: TaskStore) -> int:
    """Delete each draining model whose last open task has ended; how many were deleted."""
    finished = 0
    for document in await store.list():
        if not document.get("draining"):
            continue
        if await tasks.count_open({"model_key": document["model_key"]}, limit=1):
            continue
        model_type = ModelType(document["type"])
        await store.mark_deleted(document["name"], model_type)
        await asyncio.to_thread(remove_model_file, Path(document["path"]), models_dir)
        log.info("%s %s drained and deleted", model_type.value, document["name"])
        finished += 1
    return finished


async def run_drains(
    models_dir: Path, store: ModelStore, tasks: TaskStore, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), DRAIN_CHECK_S)
        if not stop.is_set():
            await finish_drains(models_dir, store, tasks)


async def _file_sha256(
    store: ModelStore, model_type: ModelType, name: str, path: Path, size: int, mtime: float
) -> str | None:
    """SHA-256 of a single file (A1111's model hash), reused while size and mtime match."""
    if not await asyncio.to_thread(path.is_file):
        return None
    known = await store.get(name, model_type)
    unchanged = known and known.get("size_bytes") == size and known.get("mtime") == mtime
    if known and unchanged and known.get("sha256"):
        return str(known["sha256"])
    try:
        return await asyncio.to_thread(sha256_of, path)
    except OSError:
        return None  # unreadable: the inspection that follows records why


def _stat(path: Path) -> tuple[Path, int, float]:
    """Absolute path, size (0 for a diffusers folder) and mtime."""
    stat = path.stat()
    return path.resolve(), stat.st_size if path.is_file() else 0, stat.st_mtime


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
