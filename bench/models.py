"""Models the benches build offline: a full-size SD1.5 with random weights, from the
configs sdswarm ships (no download), saved the way users upload checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parent.parent / "services" / "inference" / "configs" / "sd1"


def build_full_sd1(target: Path) -> Path:
    """A random-weight SD1.5 single file (fp16, ~2.1 GB) at ``target``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from services.inference.ldm import to_ldm_state_dict

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):  # initialising 1 B parameters is quicker on a GPU
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIGS / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIGS / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(CONFIGS / "text_encoder"))
    state = to_ldm_state_dict(unet, vae, text_encoder)
    state = {k: v.to(torch.float16).contiguous().cpu() for k, v in state.items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(target), metadata={"format": "pt", "sdswarm": "random-weight SD1.5"})
    return target
