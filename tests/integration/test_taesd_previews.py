"""Live previews drawn by a TAESD decoder: both file layouts give the same decoder, the
preview is the decoder's image of the latents, and a decoder that will not load falls
back to the latent approximation instead of failing a task."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from services.inference.previews import PreviewRenderer, latent_preview, load_taesd_decoder
from services.inference.tiny import build_taesd_decoder


def test_a_taesd_preview_is_the_decoders_image(tmp_path: Path) -> None:
    released = build_taesd_decoder(tmp_path / "taesd_decoder.safetensors")
    diffusers = build_taesd_decoder(tmp_path / "diffusers.safetensors", released=False)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    renderer = PreviewRenderer(decoder_path=str(released))
    preview = Image.open(io.BytesIO(renderer.render(latents)))
    assert renderer.uses_decoder
    assert (64, 64) == preview.size, "TAESD decodes ×8, like the VAE"
    with torch.no_grad():
        for path in (released, diffusers):
            rgb = load_taesd_decoder(path, "cpu", torch.float32)(latents[:1])[0]
            expected = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            got = torch.from_numpy(np.array(preview.convert("RGB"))).permute(2, 0, 1)
            assert torch.equal(expected, got), f"{path.name}: the same decoder, the same image"


def test_an_unusable_decoder_falls_back_to_the_approximation(tmp_path: Path) -> None:
    broken = tmp_path / "taesd_decoder.safetensors"
    broken.write_bytes(b"not a safetensors file")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    renderer = PreviewRenderer(decoder_path=str(broken))
    assert latent_preview(latents) == renderer.render(latents)
    assert not renderer.uses_decoder
    assert latent_preview(latents) == renderer.render(latents), "tried once, not per step"
