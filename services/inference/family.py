"""What differs between checkpoint families, held in one object.

The worker asks a :class:`Traits` (made once per loaded checkpoint from its
:class:`~proto.ModelFamily`) instead of reading class names: how many text encoders it
has, which diffusers class runs txt2img / img2img / inpaint for it, the latent→RGB
factors of its previews, which tensors an embedding file carries for it. Pure data: no
torch, so the loader, the pipeline and their tests share it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from proto import ModelFamily
from services.storage.modelfiles import family_from_configs


class Variant(enum.StrEnum):
    """A pipeline variant over the same loaded components."""

    TXT2IMG = "Pipeline"
    IMG2IMG = "Img2ImgPipeline"
    INPAINT = "InpaintPipeline"


SD_PREVIEW_FACTORS = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
"""Latent channel → RGB, the widely published approximation for the SD1/SD2 latent space."""
SDXL_PREVIEW_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
"""The same for SDXL's latent space (its VAE was retrained)."""


@dataclass(frozen=True, kw_only=True)
class Traits:
    family: ModelFamily
    base: str
    """``sd1``, ``sd2`` or ``sdxl``: the family without its inpainting suffix."""
    inpaint: bool
    """A 9-channel UNet (latent + masked-image latent + mask)."""
    text_encoders: int
    """1 (SD1 CLIP, SD2 OpenCLIP) or 2 (SDXL: CLIP ViT-L + OpenCLIP ViT-bigG)."""
    class_prefix: str
    """diffusers' pipeline class names start with this."""
    preview_factors: tuple[tuple[float, float, float], ...]
    embedding_keys: tuple[str, ...]
    """The tensors of an A1111 embedding file for this family, one per text encoder
    (empty: SD1/SD2 files, loaded whole by diffusers)."""
    wide_heads: bool
    """64-channel attention heads (SD2, SDXL); SD1 uses 8 heads of any width."""
    open_clip_pad: bool
    """The (first) tokenizer pads with ``!`` (id 0) as OpenCLIP does (SD2)."""

    @property
    def xl(self) -> bool:
        return self.text_encoders == 2

    @property
    def takes_safety_checker(self) -> bool:
        """SD1/SD2 pipelines take a safety checker (sdswarm loads none); SDXL's have none."""
        return not self.xl

    def class_name(self, variant: Variant) -> str:
        """The diffusers pipeline class of ``variant`` for this family."""
        return self.class_prefix + variant.value

    @property
    def loaded_variant(self) -> Variant:
        """The variant a checkpoint of this family loads as."""
        return Variant.INPAINT if self.inpaint else Variant.TXT2IMG


def traits(family: ModelFamily) -> Traits:
    base = family.value.removesuffix("_inpaint")
    xl = base == "sdxl"
    return Traits(
        family=family,
        base=base,
        inpaint=family.value.endswith("_inpaint"),
        text_encoders=2 if xl else 1,
        class_prefix="StableDiffusionXL" if xl else "StableDiffusion",
        preview_factors=SDXL_PREVIEW_FACTORS if xl else SD_PREVIEW_FACTORS,
        embedding_keys=("clip_l", "clip_g") if xl else (),
        wide_heads=base != "sd1",
        open_clip_pad=base == "sd2",
    )


class UnknownFamilyError(ValueError):
    """The loaded components match no supported family."""


def detect_loaded(pipe: Any) -> ModelFamily:
    """The family of a loaded diffusers pipeline, from its components' configs (the rule
    the registry applies to a diffusers folder, so both agree)."""
    text_2 = getattr(pipe, "text_encoder_2", None)
    family = family_from_configs(
        dict(pipe.unet.config),
        pipe.text_encoder.config.to_dict(),
        text_2.config.to_dict() if text_2 is not None else None,
    )
    if family is None:
        raise UnknownFamilyError(
            f"{type(pipe).__name__}: its UNet and text encoders match no supported family"
        )
    return family
