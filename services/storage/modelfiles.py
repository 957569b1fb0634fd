"""Read model files without executing them (torch-free: the gateway uses this too).

A ``.safetensors`` file is an 8-byte little-endian header length, a JSON header
mapping tensor names to dtype, shape and byte offsets, then raw data. Parsing the
header with a size bound is enough to validate a file and to detect its family from
tensor names and shapes — never from its file name.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proto import ModelFamily

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""Real checkpoints have headers of a few hundred KB; anything near this is hostile."""

UNET = "model.diffusion_model."
SD1_TEXT = "cond_stage_model.transformer."
SD2_TEXT = "cond_stage_model.model."
SDXL_TEXT = "conditioner.embedders."


class ModelFileError(ValueError):
    """The file is not a model this server can read; the message says why."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class CheckpointInfo:
    family: ModelFamily | None
    tensors: int
    in_channels: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def read_safetensors_header(
    path: Path, max_header_bytes: int = MAX_HEADER_BYTES
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor table and ``__metadata__`` of a safetensors file, validated."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ModelFileError(f"{path.name}: too short to be a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > max_header_bytes:
            raise ModelFileError(
                f"{path.name}: header of {length} bytes exceeds the {max_header_bytes} byte limit"
            )
        if 8 + length > size:
            raise ModelFileError(f"{path.name}: truncated (header runs past the end of the file)")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path.name}: not a safetensors file (header is not JSON)") from exc
    if not isinstance(header, dict):
        raise ModelFileError(f"{path.name}: not a safetensors file (header is not an object)")
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - length
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(path.name, name, entry, data_size)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _tensor_info(file_name: str, name: str, entry: Any, data_size: int) -> TensorInfo:
    try:
        dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        valid = (
            isinstance(dtype, str)
            and all(isinstance(d, int) and d >= 0 for d in shape)
            and 0 <= start <= end <= data_size
        )
    except (KeyError, TypeError, ValueError):
        valid = False
    if not valid:
        raise ModelFileError(f"{file_name}: tensor {name!r} has an invalid or out-of-file entry")
    return TensorInfo(dtype=dtype, shape=tuple(shape))


def detect_family(tensors: dict[str, TensorInfo]) -> ModelFamily | None:
    """SD1 / SD2 / SDXL (and their inpainting variants) from tensor names and shapes."""
    conv_in = tensors.get(UNET + "input_blocks.0.0.weight")
    if conv_in is None or len(conv_in.shape) != 4:
        return None
    inpaint = conv_in.shape[1] == 9
    names = tensors.keys()
    if any(n.startswith(SDXL_TEXT) for n in names) or UNET + "label_emb.0.0.weight" in tensors:
        return ModelFamily.SDXL_INPAINT if inpaint else ModelFamily.SDXL
    if any(n.startswith(SD2_TEXT) for n in names):
        return ModelFamily.SD2_INPAINT if inpaint else ModelFamily.SD2
    if any(n.startswith(SD1_TEXT) for n in names):
        return ModelFamily.SD1_INPAINT if inpaint else ModelFamily.SD1
    return None


def _family_from_diffusers(folder: Path) -> ModelFamily | None:
    try:
        index = json.loads((folder / "model_index.json").read_text())
        unet = json.loads((folder / "unet" / "config.json").read_text())
        text = json.loads((folder / "text_encoder" / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{folder.name}: unreadable diffusers folder: {exc}") from exc
    inpaint = unet.get("in_channels") == 9
    if "XL" in str(index.get("_class_name", "")) or "text_encoder_2" in index:
        return ModelFamily.SDXL_INPAINT if inpaint else ModelFamily.SDXL
    # SD2's OpenCLIP text encoder uses exact GELU; SD1's CLIP uses quick GELU.
    if text.get("hidden_act") == "gelu":
        return ModelFamily.SD2_INPAINT if inpaint else ModelFamily.SD2
    return ModelFamily.SD1_INPAINT if inpaint else ModelFamily.SD1


def inspect_checkpoint(path: Path) -> CheckpointInfo:
    """Validate a checkpoint (single file or diffusers folder) and detect its family."""
    if path.is_dir():
        return CheckpointInfo(family=_family_from_diffusers(path), tensors=0)
    if path.suffix.lower() != ".safetensors":
        # Pickles are never parsed here: their family is only known once loaded.
        raise ModelFileError(f"{path.name}: only .safetensors files can be inspected safely")
    tensors, metadata = read_safetensors_header(path)
    conv_in = tensors.get(UNET + "input_blocks.0.0.weight")
    return CheckpointInfo(
        family=detect_family(tensors),
        tensors=len(tensors),
        in_channels=conv_in.shape[1] if conv_in and len(conv_in.shape) == 4 else None,
        metadata=metadata,
    )
