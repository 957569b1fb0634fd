"""Live previews: latents → a small RGB image without running the VAE.

A fixed linear map from the 4 latent channels to RGB approximates the decoder well
enough to watch an image form (A1111's "Approx cheap" previews use the same idea); it
costs a 4×3 matrix product instead of a VAE decode. The factors are the widely used
published approximations for the SD1/SD2 and SDXL latent spaces (in :mod:`family`).

With a TAESD decoder registered (type ``vaeApprox``), previews are drawn by it instead:
a ~1 M-parameter network that decodes the latents at full size, close to the final
image, for a fraction of the VAE's cost. The approximation stays the fallback.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from services.inference.family import SD_PREVIEW_FACTORS

log = logging.getLogger(__name__)
MAX_SIDE = 256
_BARE_LAYER = re.compile(r"^(\d+)\.(.+)$")


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


def taesd_decoder_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A TAESD decoder's weights as diffusers' ``DecoderTiny`` names them (``layers.N.…``),
    from diffusers' ``AutoencoderTiny`` file (``decoder.layers.N.…``) or the decoder as
    released, whose bare sequence starts with a parameterless clamp (``N+1.…``)."""
    if any(key.startswith("decoder.") for key in state):
        prefix = "decoder."
        return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    weights: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _BARE_LAYER.match(key)
        if match is None:
            raise ValueError(f"not a TAESD decoder tensor: {key!r}")
        weights[f"layers.{int(match.group(1)) - 1}.{match.group(2)}"] = value
    return weights


def load_taesd_decoder(path: Path, device: str, dtype: torch.dtype) -> Any:
    """The decoder of a TAESD file, ready to run (weights checked strictly)."""
    from diffusers import AutoencoderTiny
    from safetensors.torch import load_file

    decoder: Any = AutoencoderTiny().decoder  # type: ignore[attr-defined]
    decoder.load_state_dict(taesd_decoder_weights(load_file(str(path))), strict=True)
    return decoder.to(device, dtype).eval().requires_grad_(False)


class PreviewRenderer:
    """Draws a task's live previews: with its checkpoint's TAESD decoder when the worker
    was given one (loaded at the first preview), else with the linear approximation; a
    decoder that will not load is logged once and the approximation used from then on."""

    def __init__(
        self,
        factors: Sequence[Sequence[float]] = SD_PREVIEW_FACTORS,
        decoder_path: str = "",
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.factors = factors
        self.decoder_path = decoder_path
        self.device, self.dtype = device, dtype
        self._decoder: Any = None
        self._unusable = not decoder_path

    @property
    def uses_decoder(self) -> bool:
        return self._decoder is not None

    def render(self, latents: torch.Tensor) -> bytes:
        """PNG of the first image of a latent batch (B×4×h×w), at most MAX_SIDE wide."""
        decoder = self._load()
        if decoder is None:
            return latent_preview(latents, self.factors)
        with torch.no_grad():
            rgb = decoder(latents[:1, :4].to(self.device, self.dtype))[0]
        pixels = ((rgb.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        image = Image.fromarray(np.ascontiguousarray(pixels.permute(1, 2, 0).cpu().numpy()))
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    def _load(self) -> Any:
        if self._decoder is None and not self._unusable:
            try:
                self._decoder = load_taesd_decoder(Path(self.decoder_path), self.device, self.dtype)
            except Exception as exc:  # a preview is a nicety: never fail a task on it
                self._unusable = True
                log.warning("TAESD decoder %s unusable, approximating: %s", self.decoder_path, exc)
        return self._decoder
