"""Live previews: latents → a small RGB image without running the VAE.

A fixed linear map from the 4 latent channels to RGB approximates the decoder well
enough to watch an image form (A1111's "Approx cheap" previews use the same idea); it
costs a 4×3 matrix product instead of a VAE decode. The factors are the widely used
published approximations for the SD1/SD2 and SDXL latent spaces (in :mod:`family`).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from services.inference.family import SD_PREVIEW_FACTORS

MAX_SIDE = 256


def latent_preview(
    latents: torch.Tensor, factors: Sequence[Sequence[float]] = SD_PREVIEW_FACTORS
) -> bytes:
    """PNG of the first image of a latent batch (shape B×4×h×w), at most 256 px wide;
    ``factors`` map the 4 latent channels to RGB (the family's, see :mod:`family`)."""
    matrix = torch.tensor(factors, dtype=torch.float32)
    latent = latents[0, :4].detach().to("cpu", torch.float32)
    rgb = torch.einsum("chw,cr->hwr", latent, matrix)
    pixels = ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    image = Image.fromarray(np.ascontiguousarray(pixels), "RGB")
    # Latents are 1/8 of the image; scale up for viewing, never beyond MAX_SIDE.
    scale = max(1, min(8, MAX_SIDE // max(image.size)))
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
