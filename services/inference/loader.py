"""Load a checkpoint offline: A1111 single files and diffusers folders.

Single files go through ``from_single_file(config=<folder>, local_files_only=True)``;
without ``config`` diffusers would ask the Hub. The folder is the shipped config of the
checkpoint's family (``configs/<family>``) with the component configs *patched with the
dimensions read from the tensors* and the tokenizer files added, materialised once per
checkpoint in a cache folder. For a real checkpoint the patched values equal the shipped
ones; the same path also loads the tiny checkpoints the tests build.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from proto import ModelFamily
from services.inference import converted
from services.inference.coldstart import Phases
from services.inference.family import traits
from services.inference.tokenizer import EOS, write_tokenizer_files
from services.storage.modelfiles import (
    UNET,
    ModelFileError,
    TensorInfo,
    detect_family,
    inspect_checkpoint,
    read_safetensors_header,
)

log = logging.getLogger(__name__)
CONFIGS = Path(__file__).parent / "configs"
SD1_TEXT = "cond_stage_model.transformer.text_model."
SD2_TEXT = "cond_stage_model.model."
XL_TEXT_1 = "conditioner.embedders.0.transformer.text_model."
XL_TEXT_2 = "conditioner.embedders.1.model."
VAE = "first_stage_model."
CONFIG_VERSION = "1"
"""Bump when the derivation changes, so cached config folders are rebuilt."""


class CheckpointError(Exception):
    """The checkpoint cannot be loaded; the message says why, for the task's ``message``."""


def _count(tensors: dict[str, TensorInfo], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m[1] for name in tensors if (m := regex.match(name))})


def _shape(tensors: dict[str, TensorInfo], name: str) -> tuple[int, ...]:
    info = tensors.get(name)
    if info is None:
        raise CheckpointError(f"missing tensor {name}: the file is not a complete checkpoint")
    return info.shape


def derive_unet(tensors: dict[str, TensorInfo], base: dict[str, Any], family: ModelFamily) -> None:
    inputs = _count(tensors, re.escape(UNET) + r"input_blocks\.(\d+)\.")
    downsamplers = sorted(
        int(m[1])
        for name in tensors
        if (m := re.match(re.escape(UNET) + r"input_blocks\.(\d+)\.0\.op\.weight", name))
    )
    per = downsamplers[0] if downsamplers else inputs
    blocks = inputs // per
    layers = per - 1
    channels, down_types, depth = [], [], []
    for b in range(blocks):
        first = f"{UNET}input_blocks.{1 + b * per}"
        channels.append(_shape(tensors, f"{first}.0.in_layers.2.weight")[0])
        depth.append(_count(tensors, re.escape(first) + r"\.1\.transformer_blocks\.(\d+)\.") or 1)
        has_attention = f"{first}.1.proj_in.weight" in tensors
        down_types.append("CrossAttnDownBlock2D" if has_attention else "DownBlock2D")
    attn_key = next((n for n in tensors if n.endswith("attn2.to_k.weight")), None)
    proj_in = next((n for n in tensors if n.endswith(".proj_in.weight")), None)
    base.update(
        in_channels=_shape(tensors, UNET + "input_blocks.0.0.weight")[1],
        out_channels=_shape(tensors, UNET + "out.2.weight")[0],
        block_out_channels=channels,
        layers_per_block=layers,
        down_block_types=down_types,
        up_block_types=[t.replace("Down", "Up") for t in reversed(down_types)],
    )
    if attn_key:
        base["cross_attention_dim"] = tensors[attn_key].shape[1]
    if proj_in:
        base["use_linear_projection"] = len(tensors[proj_in].shape) == 2
    if traits(family).wide_heads:
        # SD2 and SDXL use 64-channel attention heads (SD1 uses 8 heads of any width).
        base["attention_head_dim"] = [max(1, c // 64) for c in channels]
    if any(d != 1 for d in depth) or "transformer_layers_per_block" in base:
        # SDXL stacks 1/2/10 transformer blocks per level; SD1/SD2 have one everywhere
        # (diffusers' default), so their shipped configs do not name it.
        base["transformer_layers_per_block"] = depth
    if UNET + "label_emb.0.0.weight" in tensors:
        # SDXL's micro-conditioning input: the pooled text embedding (encoder 2's
        # projection width) + 6 size/crop numbers, each a sinusoidal embedding of
        # addition_time_embed_dim (1280 + 6 × 256 = 2816 for the base model).
        pooled_and_times = _shape(tensors, UNET + "label_emb.0.0.weight")[1]
        base["projection_class_embeddings_input_dim"] = pooled_and_times
        projection = tensors.get(XL_TEXT_2 + "text_projection")
        if projection is not None and len(projection.shape) == 2:
            times, rest = divmod(pooled_and_times - projection.shape[1], 6)
            if rest or times <= 0:
                raise CheckpointError(
                    f"SDXL conditioning width {pooled_and_times} does not fit a pooled"
                    f" text embedding of {projection.shape[1]} plus 6 time embeddings"
                )
            base["addition_time_embed_dim"] = times


def derive_vae(tensors: dict[str, TensorInfo], base: dict[str, Any]) -> None:
    blocks = _count(tensors, re.escape(VAE) + r"encoder\.down\.(\d+)\.")
    channels = [
        _shape(tensors, f"{VAE}encoder.down.{i}.block.0.conv1.weight")[0] for i in range(blocks)
    ]
    base.update(
        block_out_channels=channels,
        layers_per_block=_count(tensors, re.escape(VAE) + r"encoder\.down\.0\.block\.(\d+)\."),
        latent_channels=_shape(tensors, VAE + "post_quant_conv.weight")[0],
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
    )


def derive_clip(tensors: dict[str, TensorInfo], prefix: str, base: dict[str, Any]) -> None:
    """HF-layout CLIP text encoders (SD1, SDXL's first)."""
    vocab, hidden = _shape(tensors, prefix + "embeddings.token_embedding.weight")
    base.update(
        vocab_size=vocab,
        hidden_size=hidden,
        max_position_embeddings=_shape(tensors, prefix + "embeddings.position_embedding.weight")[0],
        num_hidden_layers=_count(tensors, re.escape(prefix) + r"encoder\.layers\.(\d+)\."),
        intermediate_size=_shape(tensors, prefix + "encoder.layers.0.mlp.fc1.weight")[0],
        num_attention_heads=max(1, hidden // 64),
    )


def derive_open_clip(
    tensors: dict[str, TensorInfo], prefix: str, base: dict[str, Any], *, penultimate: bool
) -> None:
    """OpenCLIP-layout text encoders (SD2, SDXL's second)."""
    vocab, hidden = _shape(tensors, prefix + "token_embedding.weight")
    layers = _count(tensors, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    base.update(
        vocab_size=vocab,
        hidden_size=hidden,
        max_position_embeddings=_shape(tensors, prefix + "positional_embedding")[0],
        # SD2 conditions on the penultimate layer; diffusers' converter drops the last.
        num_hidden_layers=layers - 1 if penultimate else layers,
        intermediate_size=_shape(tensors, prefix + "transformer.resblocks.0.mlp.c_fc.weight")[0],
        num_attention_heads=max(1, hidden // 64),
    )
    if not penultimate and prefix + "text_projection" in tensors:
        # Only SDXL's second encoder (CLIPTextModelWithProjection) uses the projection;
        # SD2 files carry one too, but its CLIPTextModel has none to size.
        base["projection_dim"] = _shape(tensors, prefix + "text_projection")[1]


def _patch(folder: Path, component: str, name: str, derive: Any) -> None:
    path = folder / component / name
    config = json.loads(path.read_text())
    derive(config)
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def materialise_config(
    checkpoint: Path, tensors: dict[str, TensorInfo], family: ModelFamily, cache_dir: Path
) -> Path:
    """A config folder for this checkpoint (cached by its header)."""
    digest = hashlib.sha256(
        json.dumps({k: v.shape for k, v in sorted(tensors.items())}).encode()
        + CONFIG_VERSION.encode()
    ).hexdigest()[:16]
    folder = cache_dir / "configs" / f"{family.value}-{digest}"
    if (folder / "model_index.json").is_file():
        return folder
    # Workers of checkpoints with the same layout share the folder and may build it at
    # the same time: each builds in a private staging folder, the first rename wins.
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    shutil.copytree(CONFIGS / family.value, staging, dirs_exist_ok=True)
    _patch(staging, "unet", "config.json", lambda c: derive_unet(tensors, c, family))
    _patch(staging, "vae", "config.json", lambda c: derive_vae(tensors, c))
    kind = traits(family)
    if kind.xl:
        _patch(staging, "text_encoder", "config.json", lambda c: derive_clip(tensors, XL_TEXT_1, c))
        _patch(
            staging,
            "text_encoder_2",
            "config.json",
            lambda c: derive_open_clip(tensors, XL_TEXT_2, c, penultimate=False),
        )
        write_tokenizer_files(staging / "tokenizer_2", pad_token="!")
    elif kind.open_clip_pad:  # SD2's OpenCLIP encoder
        _patch(
            staging,
            "text_encoder",
            "config.json",
            lambda c: derive_open_clip(tensors, SD2_TEXT, c, penultimate=True),
        )
    else:
        _patch(staging, "text_encoder", "config.json", lambda c: derive_clip(tensors, SD1_TEXT, c))
    # OpenCLIP pads with id 0, which is "!"
    write_tokenizer_files(staging / "tokenizer", pad_token="!" if kind.open_clip_pad else EOS)
    try:
        staging.rename(folder)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process won; same content
    return folder


def _pipeline_class(family: ModelFamily) -> Any:
    import diffusers

    kind = traits(family)
    return getattr(diffusers, kind.class_name(kind.loaded_variant))


def _pipeline_options(family: ModelFamily) -> dict[str, Any]:
    """No safety checker is ever loaded (its weights are not shipped with a checkpoint)."""
    return {"safety_checker": None} if traits(family).takes_safety_checker else {}


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def _dtype_option(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """diffusers ≥ 0.42 renamed ``torch_dtype`` to ``dtype`` (the old name warns); older
    releases only know ``torch_dtype`` and would silently ignore ``dtype``."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def _pickle_tensors(checkpoint: Path) -> dict[str, TensorInfo]:
    """Names and shapes of a pickled checkpoint, loaded with ``weights_only=True``.

    The restricted unpickler only rebuilds tensors and plain containers, so a file that
    smuggles code (or Lightning callback objects) is refused instead of run. mmap keeps
    the weights on disk: diffusers loads the file again, the same restricted way.
    """
    try:
        try:
            state: Any = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            # Legacy (pre-zip) torch files cannot be memory-mapped.
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{checkpoint.name}: refused: the pickle holds more than tensors ({exc})"
        ) from exc
    except Exception as exc:  # an untrusted file can fail in any way (zip, EOF, …)
        raise CheckpointError(f"{checkpoint.name}: not a readable torch checkpoint: {exc}") from exc
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # Lightning-era checkpoints nest the weights
    if not isinstance(state, dict):
        raise CheckpointError(f"{checkpoint.name}: not a state dict")
    return {
        str(k): TensorInfo(str(v.dtype), tuple(v.shape))
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
    }


def load_pipeline(
    checkpoint: Path,
    *,
    cache_dir: Path,
    family: ModelFamily | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
    prediction_type: str | None = None,
    sha256: str = "",
    converted_cache_bytes: int = 0,
    phases: Phases | None = None,
) -> Any:
    """A ready diffusers pipeline on ``device``; never contacts a model hub.

    ``family`` skips detection (the registry may already know it). ``prediction_type``
    ("epsilon" / "v_prediction") is a per-model setting: SD2 768-v models need
    "v_prediction", and the weights cannot tell (the ML notes). With the file's
    ``sha256`` and ``converted_cache_bytes`` > 0, a single file is converted once and
    later loaded from the converted-weights cache (:mod:`services.inference.converted`).
    ``phases`` receives the ``config`` and ``weights`` laps.
    """
    if dtype is None:
        # fp16 on CPU is ~100x slower than fp32 (ML notes); GPUs get fp16.
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    phases = phases or Phases()
    dtype_name = str(dtype).removeprefix("torch.")
    try:
        pipe = None
        use_cache = bool(sha256) and converted_cache_bytes > 0 and checkpoint.is_file()
        if use_cache:
            cached = converted.lookup(cache_dir, checkpoint, sha256, dtype_name)
            if cached is not None:
                phases.lap("config")
                pipe = _load_cached(cached, family, dtype)
            phases.weights_cached = pipe is not None
        if pipe is None and checkpoint.is_dir():
            phases.lap("config")
            pipe = _load_folder(checkpoint, family, dtype)
        elif pipe is None:
            pipe = _load_single_file(checkpoint, family, dtype, cache_dir, allow_pickle, phases)
            if use_cache:
                converted.store(pipe, cache_dir, checkpoint, dtype_name, converted_cache_bytes)
        if prediction_type is not None:
            # from_config keeps every other setting of the shipped scheduler.
            pipe.scheduler = type(pipe.scheduler).from_config(
                pipe.scheduler.config, prediction_type=prediction_type
            )
        pipe = pipe.to(device)
        phases.lap("weights")
        return pipe
    except CheckpointError:
        raise
    except (ModelFileError, OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{checkpoint.name}: cannot load: {exc}") from exc


def _load_cached(folder: Path, family: ModelFamily | None, dtype: torch.dtype) -> Any:
    """The converted copy, or None when it cannot be loaded (damaged, or removed under us
    by another worker's eviction): the copy is dropped and the single file loads instead."""
    try:
        return _load_folder(folder, family, dtype)
    except (CheckpointError, ModelFileError, OSError, ValueError, KeyError, RuntimeError) as exc:
        log.warning("converted copy %s cannot be loaded (%s); using the file", folder.name, exc)
        shutil.rmtree(folder, ignore_errors=True)
        return None


def _load_folder(folder: Path, family: ModelFamily | None, dtype: torch.dtype) -> Any:
    if family is None:
        family = inspect_checkpoint(folder).family
    if family is None:
        raise CheckpointError(f"{folder.name}: unknown diffusers pipeline")
    return _pipeline_class(family).from_pretrained(
        folder, local_files_only=True, **_dtype_option(dtype), **_pipeline_options(family)
    )


def _load_single_file(
    checkpoint: Path,
    family: ModelFamily | None,
    dtype: torch.dtype,
    cache_dir: Path,
    allow_pickle: bool,
    phases: Phases,
) -> Any:
    if checkpoint.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise CheckpointError(
                f"{checkpoint.name}: pickle checkpoints can run code when loaded and are"
                " refused; convert it to .safetensors or set SDSWARM_ALLOW_PICKLE=true"
            )
        tensors = _pickle_tensors(checkpoint)
    elif checkpoint.suffix.lower() == ".safetensors":
        tensors, _ = read_safetensors_header(checkpoint)
    else:
        raise CheckpointError(f"{checkpoint.name}: not a .safetensors (or allowed .ckpt) file")
    if family is None:
        family = detect_family(tensors)
    if family is None:
        raise CheckpointError(
            f"{checkpoint.name}: not a Stable Diffusion 1.x, 2.x or XL checkpoint"
        )
    config = materialise_config(checkpoint, tensors, family, cache_dir)
    phases.lap("config")
    return _pipeline_class(family).from_single_file(
        str(checkpoint),
        config=str(config),
        local_files_only=True,
        **_dtype_option(dtype),
        **_pipeline_options(family),
    )


def load_vae(path: Path, dtype: torch.dtype, cache_dir: Path) -> Any:
    """A standalone A1111 VAE file (``VAE/*.safetensors``, LDM layout with or without the
    ``first_stage_model.`` prefix), loaded offline with a config sized from its tensors."""
    from diffusers import AutoencoderKL

    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path.name}: only .safetensors VAE files are loaded")
    tensors, _ = read_safetensors_header(path)
    if not any(name.startswith(VAE) for name in tensors):
        tensors = {VAE + name: info for name, info in tensors.items()}
    if VAE + "post_quant_conv.weight" not in tensors:
        raise CheckpointError(f"{path.name}: not a VAE (no post_quant_conv)")
    digest = hashlib.sha256(
        json.dumps({k: v.shape for k, v in sorted(tensors.items())}).encode()
        + CONFIG_VERSION.encode()
    ).hexdigest()[:16]
    folder = cache_dir / "configs" / f"vae-{digest}"
    if not (folder / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        config = json.loads((CONFIGS / "sd1" / "vae" / "config.json").read_text())
        derive_vae(tensors, config)
        staged = folder / f".config.{os.getpid()}.json"
        staged.write_text(json.dumps(config, indent=2, sort_keys=True))
        staged.replace(folder / "config.json")
    try:
        return AutoencoderKL.from_single_file(
            str(path), config=str(folder), local_files_only=True, **_dtype_option(dtype)
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path.name}: cannot be loaded as a VAE: {exc}") from exc
