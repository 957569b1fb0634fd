"""Checkpoints in the A1111 models layout are registered with family, hash and errors."""

import hashlib
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.storage.models import ModelStore
from services.storage.mongo import database, open_client
from services.storage.scan import register_checkpoints

pytestmark = pytest.mark.integration


@pytest.fixture
async def store(mongo_server: Any) -> AsyncIterator[ModelStore]:
    client = open_client(mongo_server.url)
    name = f"scan_{secrets.token_hex(4)}"
    store = ModelStore(database(client, name))
    await store.ensure_indexes()
    yield store
    await client.drop_database(name)
    await client.close()


async def test_register_a1111_layout(
    store: ModelStore, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    root = tmp_path / "Stable-diffusion"
    (root / "anime").mkdir(parents=True)
    shutil.copy(tiny_checkpoint, root / "Ünïcode name.safetensors")
    shutil.copy(tiny_checkpoint, root / "anime" / "Ünïcode name.safetensors")
    (root / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (root / "notes.txt").write_text("ignored")

    names = await register_checkpoints(tmp_path, store)
    assert [
        "anime/Ünïcode name.safetensors",
        "broken.safetensors",
        "Ünïcode name.safetensors",
    ] == sorted(names, key=str.lower)
    models = {m["_id"]: m for m in await store.list()}
    first, second = models["Ünïcode name.safetensors"], models["anime/Ünïcode name.safetensors"]
    assert first["model_key"] != second["model_key"], "same file name, two folders"
    expected = hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()  # noqa: ASYNC240
    assert (expected, "sd1", "unloaded") == (first["sha256"], first["family"], first["status"])
    broken = models["broken.safetensors"]
    assert "failed" == broken["status"]
    assert "header" in broken["error"] or "JSON" in broken["error"]

    # A rescan keeps the registration time and reuses the hash of an unchanged file.
    again = await register_checkpoints(tmp_path, store)
    assert sorted(names) == sorted(again)
    assert (
        first["registered_at"]
        == (await store.get("Ünïcode name.safetensors") or {})["registered_at"]
    )


async def test_v_prediction_is_read_from_the_a1111_yaml(
    store: ModelStore, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    root = tmp_path / "Stable-diffusion"
    root.mkdir()
    shutil.copy(tiny_checkpoint, root / "v768.safetensors")
    (root / "v768.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    shutil.copy(tiny_checkpoint, root / "eps.safetensors")
    await register_checkpoints(tmp_path, store)
    assert "v_prediction" == (await store.get("v768.safetensors") or {})["prediction_type"]
    assert None is (await store.get("eps.safetensors") or {})["prediction_type"]
