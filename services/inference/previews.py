"""Live previews: latents → a small RGB image without running the VAE.

A fixed linear map from the 4 latent channels to RGB approximates the decoder well
enough to watch an image form (A1111's "Approx cheap" previews use the same idea); it
costs a 4×3 matrix product instead of a VAE decode. The factors are the widely used
published approximations for the SD1/SD2 and SDXL latent spaces.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

SD_FACTORS = [
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
]
SDXL_FACTORS = [
    [0.3651, 0.4232, 0.4341],
    [-0.2533, -0.0042, 0.1068],
    [0.1076, 0.1111, -0.0362],
    [-0.3165, -0.2492, -0.2188],
]
MAX_SIDE = 256


def latent_preview(latents: torch.Tensor, *, xl: bool = False) -> bytes:
    """PNG of the first image of a latent batch (shape B×4×h×w), at most 256 px wide."""
    factors = torch.tensor(SDXL_FACTORS if xl else SD_FACTORS, dtype=torch.float32)
    latent = latents[0, :4].detach().to("cpu", torch.float32)
    rgb = torch.einsum("chw,cr->hwr", latent, factors)
    pixels = ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    image = Image.fromarray(np.ascontiguousarray(pixels), "RGB")
    # Latents are 1/8 of the image; scale up for viewing, never beyond MAX_SIDE.
    scale = max(1, min(8, MAX_SIDE // max(image.size)))
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
