"""A worker's model hash is true of the file it loads (identity.py): the registry's record
reaches the worker's settings (the local backend's environment), and a file renamed over
the path after the record was read is hashed by the worker, not reported with the old
hash. Real files in a temporary folder."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from proto import ModelType
from services.common.settings import from_environ
from services.inference.identity import described, file_identity
from services.inference.settings import WorkerSettings
from services.scheduler.local import worker_environ
from services.scheduler.settings import SchedulerSettings
from services.storage.models import model_document
from services.storage.mongo import Document


def _registered(path: Path) -> Document:
    """The record the storage service writes for ``path`` (scan.register's values: a
    diffusers folder has no size and no hash)."""
    found = path.stat()
    folder = path.is_dir()
    return model_document(
        name=path.name,
        model_type=ModelType.STABLE_DIFFUSION,
        path=str(path.resolve()),
        family="sd1",
        size_bytes=0 if folder else found.st_size,
        sha256=None if folder else hashlib.sha256(path.read_bytes()).hexdigest(),
        mtime=found.st_mtime,
    )


def _worker_settings(model: Document) -> WorkerSettings:
    return from_environ(WorkerSettings, worker_environ(SchedulerSettings(), model))


def _replace(path: Path, content: bytes) -> None:
    """An upload's way: a new file renamed over the old one."""
    staged = path.with_name(f".{path.name}.part")
    staged.write_bytes(content)
    os.utime(staged, ns=(path.stat().st_mtime_ns + 10**9,) * 2)
    staged.replace(path)


def test_the_file_the_record_describes_keeps_the_records_hash(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"first weights")
    model = _registered(path)
    settings = _worker_settings(model)
    assert model["mtime"] == settings.model_mtime  # exactly, through the environment
    checked, identity = described(settings)
    assert checked is settings
    assert file_identity(path) == identity
    assert model["sha256"][:10] == checked.model_hash


def test_a_file_renamed_over_the_path_since_is_hashed(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"first weights")
    settings = _worker_settings(_registered(path))  # read before the re-upload
    _replace(path, b"second weights")
    checked, identity = described(settings)
    digest = hashlib.sha256(b"second weights").hexdigest()
    assert (digest, digest[:10]) == (checked.model_sha256, checked.model_hash)
    assert file_identity(path) == identity
    # A replacement of the recorded size is told by its mtime.
    assert len(b"first weights") == len(b"other weights")
    _replace(path, b"other weights")
    checked, _ = described(settings)
    assert hashlib.sha256(b"other weights").hexdigest() == checked.model_sha256


def test_no_described_file_leaves_the_settings_alone(tmp_path: Path) -> None:
    folder = tmp_path / "diffusers-folder"
    folder.mkdir()
    as_folder = _worker_settings(_registered(folder))
    assert (as_folder, file_identity(folder)) == described(as_folder)
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"weights")
    unknown = WorkerSettings(model_name="m", model_key="m", checkpoint_path=str(path))
    assert (unknown, file_identity(path)) == described(unknown)  # an older record
    path.unlink()
    missing = _worker_settings(
        model_document(
            name="m.safetensors",
            model_type=ModelType.STABLE_DIFFUSION,
            path=str(path),
            family="sd1",
            size_bytes=7,
            sha256="ab" * 32,
            mtime=1.5,
        )
    )
    assert (missing, None) == described(missing)  # loading it reports why
