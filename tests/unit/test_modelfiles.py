"""Model files are validated and classified from their header alone."""

import json
import struct
from pathlib import Path

import pytest

from proto import ModelFamily
from services.storage.modelfiles import (
    ModelFileError,
    TensorInfo,
    detect_family,
    inspect_checkpoint,
    read_safetensors_header,
)


def _write(path: Path, header: dict[str, object], data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _tensor(shape: list[int], start: int = 0) -> dict[str, object]:
    size = 4
    for d in shape:
        size *= d
    return {"dtype": "F32", "shape": shape, "data_offsets": [start, start + size]}


def test_reads_a_valid_header(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "a.safetensors",
        {"__metadata__": {"format": "pt"}, "w": _tensor([2, 2])},
        b"\0" * 16,
    )
    tensors, metadata = read_safetensors_header(path)
    assert {"w": TensorInfo("F32", (2, 2))} == tensors
    assert {"format": "pt"} == metadata


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"abc", "too short"),
        (struct.pack("<Q", 10**12) + b"{}", "exceeds"),
        (struct.pack("<Q", 100) + b"{}", "truncated"),
        (struct.pack("<Q", 4) + b"\xff\xfe{]", "not JSON"),
        (struct.pack("<Q", 2) + b"[]", "not an object"),
    ],
)
def test_refuses_broken_files(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=reason):
        read_safetensors_header(path)


def test_refuses_tensors_pointing_outside_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.safetensors", {"w": _tensor([1000])}, b"\0" * 8)
    with pytest.raises(ModelFileError, match="out-of-file"):
        read_safetensors_header(path)


def test_header_limit_is_configurable(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.safetensors", {"w": _tensor([1])}, b"\0" * 4)
    with pytest.raises(ModelFileError, match="limit"):
        read_safetensors_header(path, max_header_bytes=8)


def test_pickles_are_never_parsed(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelFileError, match=r"only \.safetensors"):
        inspect_checkpoint(path)


def _keys(*names: str, in_channels: int = 4) -> dict[str, TensorInfo]:
    tensors = {n: TensorInfo("F16", (1,)) for n in names}
    tensors["model.diffusion_model.input_blocks.0.0.weight"] = TensorInfo(
        "F16", (320, in_channels, 3, 3)
    )
    return tensors


SD1_TEXT = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
SD2_TEXT = "cond_stage_model.model.token_embedding.weight"
XL_TEXT = "conditioner.embedders.1.model.token_embedding.weight"


@pytest.mark.parametrize(
    ("tensors", "family"),
    [
        (_keys(SD1_TEXT), ModelFamily.SD1),
        (_keys(SD1_TEXT, in_channels=9), ModelFamily.SD1_INPAINT),
        (_keys(SD2_TEXT), ModelFamily.SD2),
        (_keys(SD2_TEXT, in_channels=9), ModelFamily.SD2_INPAINT),
        (_keys(XL_TEXT, "model.diffusion_model.label_emb.0.0.weight"), ModelFamily.SDXL),
        (_keys(XL_TEXT, in_channels=9), ModelFamily.SDXL_INPAINT),
        (_keys(), None),
        ({"lora_unet_down.weight": TensorInfo("F16", (4, 4))}, None),
    ],
)
def test_family_from_names_and_shapes(
    tensors: dict[str, TensorInfo], family: ModelFamily | None
) -> None:
    assert family == detect_family(tensors)


def test_file_name_is_never_used(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "sdxl_base_1.0.safetensors",
        {
            "cond_stage_model.transformer.x": _tensor([1]),
            "model.diffusion_model.input_blocks.0.0.weight": _tensor([1, 4, 1, 1], 4),
        },
        b"\0" * 20,
    )
    assert ModelFamily.SD1 == inspect_checkpoint(path).family
