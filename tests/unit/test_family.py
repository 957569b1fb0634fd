"""The model family of a loaded pipeline, and what each family does differently."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from proto import ModelFamily
from services.inference.family import (
    SD_PREVIEW_FACTORS,
    SDXL_PREVIEW_FACTORS,
    UnknownFamilyError,
    Variant,
    detect_loaded,
    traits,
)


class _Config(dict[str, Any]):
    """A transformers config as the detection reads it."""

    def to_dict(self) -> dict[str, Any]:
        return dict(self)


def _pipe(
    *, in_channels: int = 4, context: int = 768, act: str = "quick_gelu", second: int = 0
) -> Any:
    """A loaded pipeline's component configs (the unit boundary: no weights)."""
    unet = SimpleNamespace(config=_Config(in_channels=in_channels, cross_attention_dim=context))
    first = context - second if second else context
    parts: dict[str, Any] = {
        "unet": unet,
        "text_encoder": SimpleNamespace(config=_Config(hidden_size=first, hidden_act=act)),
    }
    if second:
        parts["text_encoder_2"] = SimpleNamespace(
            config=_Config(hidden_size=second, hidden_act="gelu")
        )
    return SimpleNamespace(**parts)


@pytest.mark.parametrize(
    ("pipe", "expected"),
    [
        (_pipe(), ModelFamily.SD1),
        (_pipe(in_channels=9), ModelFamily.SD1_INPAINT),
        (_pipe(context=1024, act="gelu"), ModelFamily.SD2),
        (_pipe(context=1024, act="gelu", in_channels=9), ModelFamily.SD2_INPAINT),
        (_pipe(context=2048, second=1280), ModelFamily.SDXL),
        (_pipe(context=2048, second=1280, in_channels=9), ModelFamily.SDXL_INPAINT),
        # The tiny test checkpoints: widths other than the real ones, same rule.
        (_pipe(context=32), ModelFamily.SD1),
        (_pipe(context=96, second=64), ModelFamily.SDXL),
    ],
)
def test_family_detected_from_loaded_components(pipe: Any, expected: ModelFamily) -> None:
    assert expected == detect_loaded(pipe)


def test_unknown_components_are_refused_with_a_reason() -> None:
    with pytest.raises(UnknownFamilyError, match="no supported family"):
        detect_loaded(_pipe(in_channels=8))
    mismatched = _pipe(context=2048, second=1280)
    mismatched.unet.config["cross_attention_dim"] = 1024  # the encoders give 768 + 1280
    with pytest.raises(UnknownFamilyError):
        detect_loaded(mismatched)


def test_traits_of_each_family() -> None:
    sd1, sd2, xl = traits(ModelFamily.SD1), traits(ModelFamily.SD2), traits(ModelFamily.SDXL)
    assert (1, 1, 2) == (sd1.text_encoders, sd2.text_encoders, xl.text_encoders)
    assert (False, True, True) == (sd1.wide_heads, sd2.wide_heads, xl.wide_heads)
    assert (False, True, False) == (sd1.open_clip_pad, sd2.open_clip_pad, xl.open_clip_pad)
    assert ((), ("clip_l", "clip_g")) == (sd1.embedding_keys, xl.embedding_keys)
    assert (SD_PREVIEW_FACTORS, SDXL_PREVIEW_FACTORS) == (sd2.preview_factors, xl.preview_factors)
    assert (True, False) == (sd1.takes_safety_checker, xl.takes_safety_checker)


@pytest.mark.parametrize(
    ("family", "variant", "expected"),
    [
        (ModelFamily.SD1, Variant.TXT2IMG, "StableDiffusionPipeline"),
        (ModelFamily.SD2, Variant.IMG2IMG, "StableDiffusionImg2ImgPipeline"),
        (ModelFamily.SD1_INPAINT, Variant.INPAINT, "StableDiffusionInpaintPipeline"),
        (ModelFamily.SDXL, Variant.TXT2IMG, "StableDiffusionXLPipeline"),
        (ModelFamily.SDXL, Variant.IMG2IMG, "StableDiffusionXLImg2ImgPipeline"),
        (ModelFamily.SDXL_INPAINT, Variant.INPAINT, "StableDiffusionXLInpaintPipeline"),
    ],
)
def test_variant_class_names(family: ModelFamily, variant: Variant, expected: str) -> None:
    assert expected == traits(family).class_name(variant)


def test_a_checkpoint_loads_as_its_own_variant() -> None:
    assert Variant.INPAINT == traits(ModelFamily.SDXL_INPAINT).loaded_variant
    assert Variant.TXT2IMG == traits(ModelFamily.SD2).loaded_variant
    assert all(traits(f).family == f for f in ModelFamily)
