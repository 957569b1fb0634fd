"""A tiny random-weight SD1.x checkpoint: the demo model and the tests' fixture.

SD1.5-shaped (CLIP text encoder, cross-attention UNet, a 4-level VAE that downsamples
×8 like the real one) but a few MB, seeded so it is the same everywhere. Saved the two
ways users upload checkpoints: an A1111 single ``.safetensors`` file and a diffusers
folder. It draws noise — it exists to exercise the real loading and diffusers code.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEMO_NAME = "sdswarm-demo.safetensors"


@dataclass(frozen=True)
class TinyModel:
    single_file: Path
    diffusers_dir: Path


def tiny_vae(**overrides: Any) -> Any:
    """A 4-level VAE (×8 like the real one) with 32 channels per level."""
    from diffusers import AutoencoderKL

    options: dict[str, Any] = {
        "block_out_channels": (32, 32, 32, 32),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 32,
        "sample_size": 64,
    }
    return AutoencoderKL(**(options | overrides))


def tiny_scheduler() -> Any:
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )


def build_pipeline(seed: int = 0) -> object:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from services.inference.tokenizer import write_tokenizer_files

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        sample_size=8,
        norm_num_groups=32,
    )
    vae = tiny_vae()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=1,  # hidden // 64, floored at 1: what the loader derives
            vocab_size=49408,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        )
    )
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer_files(Path(folder)))
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=tiny_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sd1(out_dir: Path, seed: int = 0) -> TinyModel:
    from safetensors.torch import save_file

    from services.inference.ldm import to_ldm_state_dict

    pipe: object = build_pipeline(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    diffusers_dir = out_dir / "tiny-diffusers"
    pipe.save_pretrained(diffusers_dir, safe_serialization=True)  # type: ignore[attr-defined]
    single = out_dir / "tiny.safetensors"
    state = to_ldm_state_dict(pipe.unet, pipe.vae, pipe.text_encoder)  # type: ignore[attr-defined]
    save_file(state, str(single), metadata={"format": "pt", "sdswarm": "tiny random-weight SD1"})
    return TinyModel(single_file=single, diffusers_dir=diffusers_dir)


def build_taesd_decoder(path: Path, *, released: bool = True, seed: int = 0) -> Path:
    """A random-weight TAESD decoder (the real architecture, ~1 M parameters) at ``path``:
    laid out as released (a bare layer sequence after a parameterless clamp) or, with
    ``released=False``, as diffusers' ``AutoencoderTiny`` saves it (``decoder.layers.*``)."""
    from diffusers import AutoencoderTiny
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    decoder = AutoencoderTiny().decoder  # type: ignore[attr-defined]
    state = {k: v.contiguous() for k, v in decoder.state_dict().items()}
    if released:
        state = {f"{int(k.split('.')[1]) + 1}.{k.split('.', 2)[2]}": v for k, v in state.items()}
    else:
        state = {f"decoder.{k}": v for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def write_demo_checkpoint(models_dir: Path) -> Path:
    """Write the demo checkpoint into ``<models_dir>/Stable-diffusion/`` (idempotent)."""
    target = models_dir / "Stable-diffusion" / DEMO_NAME
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory() as folder:
        tiny = build_tiny_sd1(Path(folder))
        target.parent.mkdir(parents=True, exist_ok=True)
        tiny.single_file.replace(target)
    return target
