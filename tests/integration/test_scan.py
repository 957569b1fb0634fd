"""Models in the A1111 layout are registered with type, family, hash and errors."""

import hashlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from proto import ModelType
from services.storage.models import ModelStore
from services.storage.scan import register_checkpoints, register_models

pytestmark = pytest.mark.integration


@pytest.fixture
async def store(fresh_db: Any) -> ModelStore:
    store = ModelStore(fresh_db)
    await store.ensure_indexes()
    return store


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
    models = {m["name"]: m for m in await store.list()}
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


def _tensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.zeros(v, dtype=np.float16) for k, v in shapes.items()}, str(path))


async def test_every_type_folder_is_registered_by_a1111_names(
    store: ModelStore, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    lora = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    _tensors(
        tmp_path / "Lora" / "styles" / "ink.safetensors",
        {f"{lora}.lora_down.weight": (4, 768), f"{lora}.lora_up.weight": (320, 4)},
    )
    _tensors(tmp_path / "VAE" / "ft-mse.safetensors", {"decoder.conv_in.weight": (8, 4, 3, 3)})
    _tensors(tmp_path / "embeddings" / "bad-hands.safetensors", {"emb_params": (2, 1024)})
    shutil.copy(tiny_checkpoint, tmp_path / "Lora" / "actually_a_checkpoint.safetensors")
    (tmp_path / "ESRGAN").mkdir()
    (tmp_path / "ESRGAN" / "4x.pth").write_bytes(b"pickle: refused unless allowed")

    found = await register_models(tmp_path, store)
    assert {
        (ModelType.LORA, "ink"),
        (ModelType.LORA, "actually_a_checkpoint"),
        (ModelType.SD_VAE, "ft-mse.safetensors"),
        (ModelType.EMBEDDING, "bad-hands"),
    } == set(found)
    ink = await store.get("ink", ModelType.LORA)
    assert ink is not None
    assert ("unloaded", "sd1") == (ink["status"], ink["family"])
    assert await store.get("ink") is None, "names are scoped by type"
    embedding = await store.get("bad-hands", ModelType.EMBEDDING)
    assert "sd2" == (embedding or {})["family"]
    wrong = await store.get("actually_a_checkpoint", ModelType.LORA)
    assert wrong is not None
    assert "failed" == wrong["status"]
    assert "is a stableDiffusion" in wrong["error"]

    # A file removed from the folder is marked deleted on the next scan (kept for history).
    (tmp_path / "Lora" / "styles" / "ink.safetensors").unlink()
    await register_models(tmp_path, store)
    assert await store.get("ink", ModelType.LORA) is None
    assert "deleted" == (await store.get_any("ink", ModelType.LORA) or {})["status"]


def _hostile(path: Path, header: bytes, data: bytes = b"\0" * 4) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)


_LORA = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
_W = b'"w.lora_down.weight": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}'
HOSTILE = {
    "a_string_metadata": b'{"__metadata__": "x", ' + _W + b"}",
    "b_list_metadata": b'{"__metadata__": ["x"], ' + _W + b"}",
    "c_deep": b'{"__metadata__": ' + b"[" * 100_000 + b"]" * 100_000 + b", " + _W + b"}",
    "d_float_offsets": b'{"w.lora_down.weight": {"dtype": "U8", "shape": [4],'
    b' "data_offsets": [0.0, 4.0]}}',
}
"""Malformed LoRAs sorted before a good one (issue 15, item 7)."""


async def test_malformed_files_are_recorded_failed_and_the_scan_goes_on(
    store: ModelStore, tmp_path: Path
) -> None:
    for stem, header in HOSTILE.items():
        _hostile(tmp_path / "Lora" / f"{stem}.safetensors", header)
    _tensors(tmp_path / "Lora" / "z_good.safetensors", {f"{_LORA}.lora_down.weight": (4, 768)})

    found = await register_models(tmp_path, store, model_types=(ModelType.LORA,))
    assert {*HOSTILE, "z_good"} == {name for _, name in found}
    good = await store.get("z_good", ModelType.LORA)
    assert "unloaded" == (good or {}).get("status"), "files after a bad one are registered"
    reasons = {}
    for stem in HOSTILE:
        document = await store.get(stem, ModelType.LORA)
        assert document is not None
        assert "failed" == document["status"], stem
        reasons[stem] = document["error"]
    assert "__metadata__ must be an object" in reasons["a_string_metadata"]
    assert "__metadata__ must be an object" in reasons["b_list_metadata"]
    assert "nested too deeply" in reasons["c_deep"]
    assert "data_offsets must be two integers" in reasons["d_float_offsets"]
    # And again: a later scan is not stopped by them either.
    assert sorted(found) == sorted(
        await register_models(tmp_path, store, model_types=(ModelType.LORA,))
    )


async def test_nfc_and_nfd_spellings_of_one_name_are_one_model(
    store: ModelStore, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """Linux keeps both spellings as two files; they are one model, not two look-alikes."""
    import unicodedata

    nfc = unicodedata.normalize("NFC", "café.safetensors")
    nfd = unicodedata.normalize("NFD", "café.safetensors")
    root = tmp_path / "Stable-diffusion"
    root.mkdir()
    shutil.copy(tiny_checkpoint, root / nfd)
    shutil.copy(tiny_checkpoint, root / nfc)
    shutil.copy(tiny_checkpoint, root / "zero\u200bwidth.safetensors")

    names = await register_checkpoints(tmp_path, store)
    assert [nfc, "zero\u200bwidth.safetensors"] == sorted(names)
    models = await store.list()
    assert [nfc, "zero\u200bwidth.safetensors"] == sorted(m["name"] for m in models)
    assert (await store.get(nfd) or {}).get("name") == nfc, "either spelling finds it"
    look_alike = await store.get("zero\u200bwidth.safetensors")
    assert look_alike is not None
    assert ("failed", True) == (look_alike["status"], "U+200B" in look_alike["error"])

    # Whichever spelling the model was registered from (an upload writes the NFC one)
    # stays its file on every rescan: the other is ignored, not swapped in.
    for spelling in (nfc, nfd, nfc):
        path = str((root / spelling).resolve())
        await store.update(nfc, ModelType.STABLE_DIFFUSION, {"path": path})
        await register_checkpoints(tmp_path, store)
        assert path == (await store.get(nfc) or {}).get("path")
