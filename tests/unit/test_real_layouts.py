"""Detection and config derivation on the real SD1.5 layout, built on the meta device.

The real-size UNet, VAE and text encoder are instantiated without memory from the
shipped configs, converted to A1111 key names, and must (1) be detected as SD1 and
(2) yield derived configs equal to the shipped ones — the property that lets one
loading path serve real checkpoints and the tiny test ones.
"""

import json

import pytest

torch = pytest.importorskip("torch")

from proto import ModelFamily  # noqa: E402
from services.inference.ldm import to_ldm_state_dict  # noqa: E402
from services.inference.loader import (  # noqa: E402
    CONFIGS,
    SD1_TEXT,
    derive_clip,
    derive_unet,
    derive_vae,
)
from services.storage.modelfiles import TensorInfo, detect_family  # noqa: E402


def _sd15_tensors(in_channels: int) -> dict[str, TensorInfo]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = CONFIGS / "sd1"
    unet_config = json.loads((root / "unet" / "config.json").read_text())
    unet_config["in_channels"] = in_channels
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(json.loads((root / "vae" / "config.json").read_text()))
        text = CLIPTextModel(
            CLIPTextConfig(**json.loads((root / "text_encoder" / "config.json").read_text()))
        )
    state = to_ldm_state_dict(unet, vae, text)
    return {k: TensorInfo("F16", tuple(v.shape)) for k, v in state.items()}


@pytest.fixture(scope="module")
def sd15() -> dict[str, TensorInfo]:
    return _sd15_tensors(4)


def test_real_sd15_layout_is_detected(sd15: dict[str, TensorInfo]) -> None:
    assert 1000 < len(sd15)
    assert ModelFamily.SD1 == detect_family(sd15)


def test_real_sd15_inpaint_layout_is_detected() -> None:
    assert ModelFamily.SD1_INPAINT == detect_family(_sd15_tensors(9))


@pytest.mark.parametrize(
    ("component", "derive"),
    [
        ("unet", lambda t, c: derive_unet(t, c, ModelFamily.SD1)),
        ("vae", derive_vae),
        ("text_encoder", lambda t, c: derive_clip(t, SD1_TEXT, c)),
    ],
)
def test_derived_configs_equal_shipped_ones(
    sd15: dict[str, TensorInfo], component: str, derive: object
) -> None:
    shipped = json.loads((CONFIGS / "sd1" / component / "config.json").read_text())
    derived = dict(shipped)
    derive(sd15, derived)  # type: ignore[operator]
    assert shipped == derived
