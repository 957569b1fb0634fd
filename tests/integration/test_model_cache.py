"""A worker on a node without the models folder fetches a registered object into its
cache, verified by SHA-256, reused, and evicted least recently used first."""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

import msgspec
import pytest

from services.inference.__main__ import local_checkpoint
from services.inference.settings import WorkerSettings
from services.storage.modelcache import ModelCacheError, materialize
from services.storage.objects import LocalObjectStore

pytestmark = pytest.mark.integration


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "objects", "http://127.0.0.1", secrets.token_hex(8))


async def test_fetch_verify_reuse_and_evict(store: LocalObjectStore, tmp_path: Path) -> None:
    blobs = {f"models/m{n}.safetensors": os.urandom(1000 + n) for n in range(3)}
    for key, data in blobs.items():
        await store.put(key, data, "application/octet-stream")
    digests = {key: hashlib.sha256(data).hexdigest() for key, data in blobs.items()}
    cache = tmp_path / "cache"
    keys = list(blobs)

    first = await materialize(store, keys[0], digests[keys[0]], cache, max_bytes=2500)
    assert blobs[keys[0]] == first.read_bytes()
    # Cached: the object is not read again.
    await store.put(keys[0], b"changed in the store", "application/octet-stream")
    assert first == await materialize(store, keys[0], digests[keys[0]], cache, max_bytes=2500)
    assert blobs[keys[0]] == first.read_bytes()

    second = await materialize(store, keys[1], digests[keys[1]], cache, max_bytes=2500)
    assert first.exists()  # 2001 bytes fit
    assert second.exists()
    third = await materialize(store, keys[2], digests[keys[2]], cache, max_bytes=2500)
    assert third.exists()
    assert not first.exists(), "least recently used copy evicted"

    with pytest.raises(ModelCacheError, match="sha256"):
        await materialize(store, keys[1], "0" * 64, cache, max_bytes=10_000)
    assert not (cache / "models" / ("0" * 64 + ".safetensors")).exists()
    assert not [p for p in (cache / "models").iterdir() if p.name.startswith(".")]


async def test_worker_uses_the_folder_file_else_the_fetched_copy(
    store: LocalObjectStore, tmp_path: Path
) -> None:
    data = os.urandom(2048)
    await store.put("models/ckpt.safetensors", data, "application/octet-stream")
    settings = WorkerSettings(
        model_name="ckpt.safetensors",
        model_key="ckpt-000000",
        checkpoint_path=str(tmp_path / "not-on-this-node" / "ckpt.safetensors"),
        cache_dir=str(tmp_path / "cache"),
        model_object="models/ckpt.safetensors",
        model_sha256=hashlib.sha256(data).hexdigest(),
    )
    fetched = await local_checkpoint(settings, store)
    assert data == Path(fetched.checkpoint_path).read_bytes()  # noqa: ASYNC240

    shared = tmp_path / "shared.safetensors"
    shared.write_bytes(b"present")
    local = msgspec.structs.replace(settings, checkpoint_path=str(shared))
    assert str(shared) == (await local_checkpoint(local, store)).checkpoint_path
