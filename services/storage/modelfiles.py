"""Read model files without executing them (torch-free: the gateway uses this too).

A ``.safetensors`` file is an 8-byte little-endian header length, a JSON header
mapping tensor names to dtype, shape and byte offsets, then raw data. Parsing the
header with a size bound is enough to validate a file and to detect its family from
tensor names and shapes — never from its file name.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proto import ModelFamily, ModelType

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
    """UNet input channels: 4, or 9 for inpainting models."""
    is_inpaint: bool = False
    cross_attention_dim: int | None = None
    """768 (SD1), 1024 (SD2), 2048 (SDXL) for real models; tiny test models are smaller."""
    is_diffusers_folder: bool = False
    metadata: dict[str, str] = field(default_factory=dict)


DTYPE_BITS = {
    "F64": 64, "I64": 64, "U64": 64, "C64": 64,
    "F32": 32, "I32": 32, "U32": 32,
    "F16": 16, "BF16": 16, "I16": 16, "U16": 16,
    "I8": 8, "U8": 8, "BOOL": 8,
    "F8_E4M3": 8, "F8_E4M3FNUZ": 8, "F8_E5M2": 8, "F8_E5M2FNUZ": 8, "F8_E8M0": 8,
    "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4,
}  # fmt: skip
"""Bits per element of each safetensors dtype (the format's own table)."""


def read_safetensors_header(
    path: Path, max_header_bytes: int = MAX_HEADER_BYTES
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor table and ``__metadata__`` of a safetensors file, validated.

    As strictly as the safetensors library itself checks a file before loading it, so a
    file accepted here never fails later in a worker: ``__metadata__`` is an object of
    strings; every tensor has a known dtype, a shape of non-negative integers and
    integer ``data_offsets`` whose span is exactly the tensor's size; the tensors,
    ordered by offset, cover the data without gap or overlap, to its last byte. Anything
    else raises :class:`ModelFileError` with the reason, never another exception.
    """
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
    except RecursionError as exc:
        raise ModelFileError(
            f"{path.name}: not a safetensors file (header nested too deeply)"
        ) from exc
    if not isinstance(header, dict):
        raise ModelFileError(f"{path.name}: not a safetensors file (header is not an object)")
    metadata = _metadata(path.name, header.pop("__metadata__", None))
    data_size = size - 8 - length
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        info, start, end = _tensor_info(path.name, name, entry, data_size)
        tensors[name] = info
        spans.append((start, end, name))
    _check_coverage(path.name, sorted(spans), data_size)
    return tensors, metadata


def _metadata(file_name: str, value: Any) -> dict[str, str]:
    """``__metadata__``: absent, or an object whose values are all strings (the format's rule)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ModelFileError(
            f"{file_name}: __metadata__ must be an object of strings, not {type(value).__name__}"
        )
    for key, item in value.items():
        if not isinstance(item, str):
            raise ModelFileError(
                f"{file_name}: __metadata__ value {key!r} must be a string, not"
                f" {type(item).__name__}"
            )
    return dict(value)


def _is_int(value: Any) -> bool:
    """A JSON integer (``true`` and ``1.0`` are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor_info(
    file_name: str, name: str, entry: Any, data_size: int
) -> tuple[TensorInfo, int, int]:
    """One tensor's entry, checked; with its byte span in the data section."""

    def refuse(rule: str) -> ModelFileError:
        return ModelFileError(f"{file_name}: tensor {name!r}: {rule}")

    if not isinstance(entry, dict):
        raise refuse("the entry must be an object with dtype, shape and data_offsets")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise refuse(f"unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise refuse("shape must be a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise refuse("data_offsets must be two integers [start, end]")
    start, end = offsets
    if not 0 <= start <= end <= data_size:
        raise refuse(
            f"data_offsets [{start}, {end}] are out-of-file (the data section has"
            f" {data_size} bytes)"
        )
    bits = DTYPE_BITS[dtype] * math.prod(shape)
    if bits % 8 or end - start != bits // 8:
        raise refuse(
            f"data_offsets span {end - start} bytes but a {dtype} tensor of shape {shape}"
            f" takes {bits / 8:g}"
        )
    return TensorInfo(dtype=dtype, shape=tuple(shape)), start, end


def _check_coverage(file_name: str, spans: list[tuple[int, int, str]], data_size: int) -> None:
    """Tensors ordered by offset must tile the data section exactly, as the library checks."""
    position = 0
    for start, end, name in spans:
        if start != position:
            gap = "overlaps the tensor before it" if start < position else "leaves a gap"
            raise ModelFileError(f"{file_name}: tensor {name!r} at offset {start} {gap}")
        position = end
    if position != data_size:
        raise ModelFileError(
            f"{file_name}: the tensors cover {position} of the {data_size} data bytes"
        )


def cross_attention_dim(tensors: dict[str, TensorInfo]) -> int | None:
    """Width of the text features the UNet attends to (``attn2.to_k`` input features)."""
    for name, info in tensors.items():
        if name.startswith(UNET) and name.endswith(".attn2.to_k.weight") and len(info.shape) == 2:
            return info.shape[1]
    return None


def _width(tensors: dict[str, TensorInfo], *names: str) -> int | None:
    """Embedding width of the first tensor present among ``names``."""
    for name in names:
        info = tensors.get(name)
        if info is not None and len(info.shape) == 2:
            return info.shape[1]
    return None


# Cross-attention widths of the released models, used only when a file has no text
# encoder to compare with (UNet-only exports); the loader then refuses it with a reason.
_CONTEXT_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def _base_family(tensors: dict[str, TensorInfo]) -> str | None:
    """``sd1`` / ``sd2`` / ``sdxl`` from the text encoder layout, checked against the UNet."""
    context = cross_attention_dim(tensors)
    # SD1: HF CLIP under cond_stage_model.transformer. (very old files lack "text_model.").
    sd1 = _width(
        tensors,
        SD1_TEXT + "text_model.embeddings.token_embedding.weight",
        SD1_TEXT + "embeddings.token_embedding.weight",
    )
    sd2 = _width(tensors, SD2_TEXT + "token_embedding.weight")  # OpenCLIP layout
    xl_1 = _width(tensors, SDXL_TEXT + "0.transformer.text_model.embeddings.token_embedding.weight")
    xl_2 = _width(tensors, SDXL_TEXT + "1.model.token_embedding.weight")
    # The UNet cross-attends to the text encoder's output, so the widths must agree: a
    # mismatch means a merged or damaged file no shipped config can describe. SDXL
    # concatenates its two encoders (768 + 1280 = 2048 for the base model). The SDXL
    # refiner (a single OpenCLIP encoder at embedders.0) is not supported and falls through.
    if xl_1 is not None and xl_2 is not None:
        return "sdxl" if context in (None, xl_1 + xl_2) else None
    if sd2 is not None:
        return "sd2" if context in (None, sd2) else None
    if sd1 is not None:
        return "sd1" if context in (None, sd1) else None
    if any(n.startswith(SDXL_TEXT) for n in tensors):
        return None
    if context is None:
        return None
    if UNET + "label_emb.0.0.weight" in tensors:
        return "sdxl" if context == 2048 else None
    return _CONTEXT_FAMILY.get(context)


def detect_family(tensors: dict[str, TensorInfo]) -> ModelFamily | None:
    """SD1 / SD2 / SDXL (and their inpainting variants) from tensor names and shapes.

    None for anything else (LoRAs, VAEs, refiners, inconsistent merges). Inpainting
    UNets take 9 input channels: 4 latent + 4 masked-image latent + 1 mask.
    """
    conv_in = tensors.get(UNET + "input_blocks.0.0.weight")
    if conv_in is None or len(conv_in.shape) != 4 or conv_in.shape[1] not in (4, 9):
        return None
    base = _base_family(tensors)
    if base is None:
        return None
    return ModelFamily(base + "_inpaint" if conv_in.shape[1] == 9 else base)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path.parent.name}/{path.name}: unreadable: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelFileError(f"{path.parent.name}/{path.name}: not a JSON object")
    return data


def _config_int(config: dict[str, Any], key: str) -> int | None:
    """An integer setting of a diffusers config; None when absent or of another type."""
    value = config.get(key)
    return value if _is_int(value) else None


def _family_from_diffusers(folder: Path) -> tuple[ModelFamily | None, dict[str, Any]]:
    """Family from the pipeline's configs (a diffusers folder names no LDM tensors)."""
    index = _read_json(folder / "model_index.json")
    unet = _read_json(folder / "unet" / "config.json")
    if unet.get("in_channels") not in (4, 9):
        return None, unet
    encoder = index.get("text_encoder")
    if not (isinstance(encoder, list) and encoder and encoder[0]):
        return None, unet  # e.g. the SDXL refiner (one OpenCLIP encoder): not supported
    text = _read_json(folder / "text_encoder" / "config.json")
    text_2 = None
    if "text_encoder_2" in index or unet.get("addition_embed_type") == "text_time":
        text_2 = _read_json(folder / "text_encoder_2" / "config.json")
    return family_from_configs(unet, text, text_2), unet


def family_from_configs(
    unet: dict[str, Any], text: dict[str, Any], text_2: dict[str, Any] | None
) -> ModelFamily | None:
    """The family of a diffusers pipeline from its UNet and text encoder configs (the
    second encoder's is None when it has none): the registry reads them from a folder,
    the worker from the loaded components."""
    in_channels = unet.get("in_channels")
    if in_channels not in (4, 9):
        return None
    suffix = "_inpaint" if in_channels == 9 else ""
    context = _config_int(unet, "cross_attention_dim")
    base: str | None
    if text_2 is not None:
        widths = (_config_int(text, "hidden_size"), _config_int(text_2, "hidden_size"))
        # SDXL concatenates both encoders' features (768 + 1280 for the base model).
        agree = context is None or None in widths or context == sum(w or 0 for w in widths)
        base = "sdxl" if agree else None
    elif context is not None and _config_int(text, "hidden_size") not in (None, context):
        base = None  # the UNet cannot attend to this text encoder's features
    else:
        # SD2's OpenCLIP text encoder uses exact GELU; SD1's CLIP uses quick GELU.
        base = "sd2" if text.get("hidden_act") == "gelu" else "sd1"
    return ModelFamily(base + suffix) if base else None


def inspect_checkpoint(path: Path, max_header_bytes: int = MAX_HEADER_BYTES) -> CheckpointInfo:
    """Validate a checkpoint (single file or diffusers folder) and detect its family."""
    if path.is_dir():
        family, unet = _family_from_diffusers(path)
        # Reading each component's safetensors header validates the weights too.
        count = sum(
            len(read_safetensors_header(weights, max_header_bytes)[0])
            for weights in sorted(path.glob("*/*.safetensors"))
        )
        in_channels = _config_int(unet, "in_channels")
        return CheckpointInfo(
            family=family,
            tensors=count,
            in_channels=in_channels,
            is_inpaint=in_channels == 9,
            cross_attention_dim=_config_int(unet, "cross_attention_dim"),
            is_diffusers_folder=True,
        )
    if path.suffix.lower() != ".safetensors":
        # Pickles are never parsed here: their family is only known once loaded.
        raise ModelFileError(f"{path.name}: only .safetensors files can be inspected safely")
    tensors, metadata = read_safetensors_header(path, max_header_bytes)
    conv_in = tensors.get(UNET + "input_blocks.0.0.weight")
    in_channels = conv_in.shape[1] if conv_in and len(conv_in.shape) == 4 else None
    return CheckpointInfo(
        family=detect_family(tensors),
        tensors=len(tensors),
        in_channels=in_channels,
        is_inpaint=in_channels == 9,
        cross_attention_dim=cross_attention_dim(tensors),
        metadata=metadata,
    )


# What each model type's tensors are called (A1111/kohya/diffusers layouts), so a file
# uploaded as a LoRA that is really a checkpoint is refused instead of failing a task.
_LORA_MARKERS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".hada_w1_a", ".lokr_w1")
_CONTROLNET_MARKERS = (
    "control_model.input_hint_block.",
    "input_hint_block.0.weight",
    "controlnet_cond_embedding.",
)
_EMBEDDING_KEYS = ("emb_params", "clip_l", "clip_g")
_FACE_RESTORER_KEYS = (
    ("toRGB.0.weight", "stylegan_decoder.style_mlp.1.weight"),  # GFPGAN (spandrel's test)
    ("quantize.embedding.weight", "quant_conv.weight"),  # RestoreFormer
)
_TAESD_BARE_KEY = re.compile(r"^\d+\.(?:conv\.\d+\.|skip\.)?(?:weight|bias)$")
"""A TAESD decoder as released (``taesd_decoder.safetensors``): a bare layer sequence."""
_TAESD_FIRST = (64, 4, 3, 3)
"""The first convolution of a TAESD decoder: 4 latent channels in, 64 out."""
_UPSCALER_MARKERS = ("conv_first.", "RRDB_trunk.", "model.0.weight", "body.0.", "layers.0.")
_CONTEXT_BY_TYPE = {768: ModelFamily.SD1, 1024: ModelFamily.SD2, 2048: ModelFamily.SDXL}


@dataclass(frozen=True)
class ModelInfo:
    model_type: ModelType | None
    """What the tensors say the file is; None when they match no known layout."""
    family: ModelFamily | None
    tensors: int
    metadata: dict[str, str] = field(default_factory=dict)
    unusable: str | None = None
    """Why a file of a known type still cannot be used here, e.g. a LoHa."""
    scale: int | None = None
    """An upscaler's factor where its layout tells (see :func:`upscaler_scale`)."""


_LYCORIS_ONLY = (".hada_w1_a", ".hada_w1_b", ".lokr_w1", ".lokr_w2")
"""LyCORIS LoHa/LoKr factors: diffusers (and PEFT's loading of A1111 files) takes LoRA and
LoCon layouts only, so such a file is refused at registration, not at the first task."""


def lora_unusable(tensors: dict[str, TensorInfo]) -> str | None:
    if any(marker in k for k in tensors for marker in _LYCORIS_ONLY):
        return (
            "a LyCORIS LoHa/LoKr file: diffusers applies LoRA and LoCon layouts"
            " (lora_down/lora_up) only"
        )
    return None


def detect_model_type(tensors: dict[str, TensorInfo]) -> ModelType | None:
    """Checkpoint, VAE, LoRA, ControlNet, embedding or upscaler, from tensor names."""
    keys = list(tensors)
    if any(k.startswith(UNET) for k in keys):
        return ModelType.STABLE_DIFFUSION
    if any(marker in k for k in keys for marker in _LORA_MARKERS):
        return ModelType.LORA
    if any(k.startswith(_CONTROLNET_MARKERS) or k in _CONTROLNET_MARKERS for k in keys):
        return ModelType.CONTROL_NET
    if any(k in _EMBEDDING_KEYS or k.startswith("string_to_param.") for k in keys):
        return ModelType.EMBEDDING
    if is_taesd(tensors):
        return ModelType.VAE_APPROX  # before upscalers: both are bare layer sequences
    if any(all(k in tensors for k in marks) for marks in _FACE_RESTORER_KEYS):
        return ModelType.FACE_RESTORER  # before the VAE: RestoreFormer has a VAE's decoder
    if any(
        k.startswith(prefix + "decoder.conv_in.")
        for k in keys
        for prefix in ("", "first_stage_model.", "vae.")
    ):
        return ModelType.SD_VAE
    if any(k.startswith(_UPSCALER_MARKERS) for k in keys):
        return ModelType.UPSCALER
    return None


def is_taesd(tensors: dict[str, TensorInfo]) -> bool:
    """A TAESD decoder: diffusers' ``AutoencoderTiny`` (``decoder.layers.*``, perhaps with
    its encoder) or the bare decoder as released (``1.weight`` … ``N.conv.0.weight``)."""
    if "decoder.layers.0.weight" in tensors:
        first = tensors["decoder.layers.0.weight"]
        layered = all(k.startswith(("decoder.layers.", "encoder.layers.")) for k in tensors)
        return layered and tuple(first.shape) == _TAESD_FIRST
    bare = tensors.get("1.weight")
    layered = all(_TAESD_BARE_KEY.match(k) for k in tensors)
    return layered and bare is not None and tuple(bare.shape) == _TAESD_FIRST


def _adapter_family(model_type: ModelType, tensors: dict[str, TensorInfo]) -> ModelFamily | None:
    """The base family an adapter was trained for, where its shapes tell (real sizes only)."""
    width: int | None = None
    if model_type is ModelType.LORA:
        if any("lora_te2_" in k or "text_encoder_2." in k for k in tensors):
            return ModelFamily.SDXL
        for name, info in tensors.items():
            if "attn2" in name and "to_k" in name and ("lora_down" in name or "lora_A" in name):
                width = info.shape[-1] if info.shape else None
                break
    elif model_type is ModelType.EMBEDDING:
        if "clip_g" in tensors:
            return ModelFamily.SDXL
        vectors = tensors.get("emb_params") or next(
            (v for k, v in tensors.items() if k.startswith("string_to_param.")), None
        )
        width = vectors.shape[-1] if vectors and vectors.shape else None
    elif model_type is ModelType.CONTROL_NET:
        for name, info in tensors.items():
            if name.endswith("attn2.to_k.weight") and len(info.shape) == 2:
                width = info.shape[1]
                break
    return _CONTEXT_BY_TYPE.get(width) if width is not None else None


def inspect_model(path: Path, max_header_bytes: int = MAX_HEADER_BYTES) -> ModelInfo:
    """Validate any model file (or diffusers folder) and say what it is."""
    if path.is_dir():
        checkpoint = inspect_checkpoint(path, max_header_bytes)
        return ModelInfo(ModelType.STABLE_DIFFUSION, checkpoint.family, checkpoint.tensors)
    if path.suffix.lower() != ".safetensors":
        raise ModelFileError(f"{path.name}: only .safetensors files can be inspected safely")
    tensors, metadata = read_safetensors_header(path, max_header_bytes)
    if not tensors:
        raise ModelFileError(f"{path.name}: holds no tensors")
    model_type = detect_model_type(tensors)
    if model_type is ModelType.STABLE_DIFFUSION:
        family = detect_family(tensors)
    elif model_type is not None:
        family = _adapter_family(model_type, tensors)
    else:
        family = None
    unusable = lora_unusable(tensors) if model_type is ModelType.LORA else None
    scale = upscaler_scale(tensors) if model_type is ModelType.UPSCALER else None
    return ModelInfo(model_type, family, len(tensors), metadata, unusable, scale)


_UPCONV = re.compile(r"(?:upconv|conv_up)(\d+)\.weight$")
_SEQUENCE = re.compile(r"^(model|body)\.(\d+)\.")


def _last_index(tensors: dict[str, TensorInfo], prefix: str) -> int:
    found = [int(m.group(2)) for k in tensors if (m := _SEQUENCE.match(k)) and m.group(1) == prefix]
    return max(found, default=-1)


def upscaler_scale(tensors: dict[str, TensorInfo]) -> int | None:
    """The factor an upscaler enlarges by, read from its shapes the way spandrel reads
    them: ESRGAN (old ``model.N`` and new ``conv_first`` layouts, Real-ESRGAN's pixel
    unshuffle for ×2 and ×1) and Real-ESRGAN's Compact net (``body.N``, the last
    convolution's ``3·scale²`` channels). None for other layouts."""
    if "conv_first.weight" in tensors and "conv_last.weight" in tensors:
        ups = {m.group(1) for k in tensors if (m := _UPCONV.match(k))}
        scale: int = 2 ** len(ups)
        first, last = tensors["conv_first.weight"], tensors["conv_last.weight"]
    elif "model.0.weight" in tensors:
        length = _last_index(tensors, "model") + 1
        if f"model.{length - 1}.weight" not in tensors:
            return None
        scale = int(2 ** ((length - 5) // 3))
        first, last = tensors["model.0.weight"], tensors[f"model.{length - 1}.weight"]
    elif "body.0.weight" in tensors:
        final = tensors.get(f"body.{_last_index(tensors, 'body')}.weight")
        if final is None or len(final.shape) != 4 or final.shape[0] % 3:
            return None
        root = math.isqrt(final.shape[0] // 3)
        return root if root * root * 3 == final.shape[0] else None
    else:
        return None
    if len(first.shape) != 4 or len(last.shape) != 4:
        return None
    in_nc, out_nc = int(first.shape[1]), int(last.shape[0])
    if in_nc in (out_nc * 4, out_nc * 16):  # pixel unshuffle before the net
        scale //= math.isqrt(in_nc // out_nc)
    return max(scale, 1)
