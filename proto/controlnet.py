"""ControlNet units as A1111's ControlNet extension takes them, and as a task carries them.

Clients put units in ``alwayson_scripts.controlnet.args`` (the seed's example does);
:class:`ControlNetUnitRequest` is one of those, field for field. The gateway resolves the
model, moves the image to the object store and publishes a :class:`ControlUnit`: names
and images are settled, the worker only preprocesses and runs.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from msgspec import Meta, Struct

from proto.extra_networks import AdapterRef

RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
"""The extension's ``resize_mode`` names; clients may also send their index (0–2)."""
HR_OPTIONS = ("Both", "Low res only", "High res only")
"""Which passes of a hires-fix request a unit guides (the extension's ``hr_option``)."""
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
"""The extension's ``control_mode`` names; clients may also send their index (0–2)."""
_LEGACY_RESIZE = {"Inner Fit (Scale to Fit)": 1, "Outer Fit (Shrink to Fit)": 2}
_LEGACY_SCRIPT_KEYS = ("controlnet", "ControlNet")

BUILTIN_MODULES: dict[str, tuple[float | None, float | None]] = {
    "none": (None, None),
    "canny": (100, 200),
    "invert": (None, None),
    "threshold": (127, None),
    "scribble_xdog": (32, None),
    "lineart_standard": (None, None),
    "tile_resample": (1.0, None),
    "blur_gaussian": (9.0, None),
    "recolor_luminance": (1.0, None),
    "recolor_intensity": (1.0, None),
}
"""Preprocessors that need no downloaded weights, with the extension's defaults for
``threshold_a`` and ``threshold_b`` (used when a client sends -1)."""

WEIGHTED_MODULE_PREFIXES = (
    "openpose",
    "dw_openpose",
    "depth",
    "normal",
    "lineart_anime",
    "lineart_coarse",
    "lineart_realistic",
    "lineart",
    "softedge",
    "scribble_hed",
    "scribble_pidinet",
    "hed",
    "pidinet",
    "mlsd",
    "seg",
    "segmentation",
    "mediapipe",
    "clip_vision",
    "ip-adapter",
    "reference",
    "inpaint",
    "shuffle",
    "t2ia",
    "revision",
    "densepose",
    "anime_face",
    "instant_id",
    "facexlib",
    "recolor",
    "tile_colorfix",
    "color",
)
"""Preprocessors of the extension that sdswarm does not run (most need annotator weights):
a unit naming one is refused with a 422 that says so."""

_ALIASES = {
    "invert (from white bg & black line)": "invert",
    "lineart_standard (from white bg & black line)": "lineart_standard",
    "pidinet_scribble": "scribble_pidinet",
    "fake_scribble": "scribble_hed",
    "binary": "threshold",
}


def module_name(name: str) -> str:
    """The canonical preprocessor name for what a client sent (case and aliases)."""
    key = name.strip().lower()
    return _ALIASES.get(key, key)


_HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]{6,64}\]$")


def model_name(name: str) -> str:
    """The registered name of a unit's ``model``: the extension lists models as
    ``control_v11p_sd15_canny [d14c016b]`` and clients send that string back."""
    return _HASH_SUFFIX.sub("", name.strip())


class ControlNetUnitRequest(Struct, kw_only=True, frozen=True):
    """One unit of ``alwayson_scripts.controlnet.args`` (the extension's API fields)."""

    enabled: bool = True
    image: str | dict[str, Any] | None = None
    """Base64 (``data:`` prefix optional) or an object key of the caller's; the extension's
    ``{"image": …, "mask": …}`` form is read too (its ``image``)."""
    input_image: str | None = None
    """Older name of ``image``."""
    module: str = "none"
    model: str = "None"
    weight: Annotated[float, Meta(ge=0, le=2)] = 1.0
    resize_mode: str | int = "Crop and Resize"
    low_vram: bool = False
    """Accepted; sdswarm keeps the ControlNet on the worker's device."""
    processor_res: Annotated[int, Meta(ge=-1, le=2048)] = -1
    threshold_a: Annotated[float, Meta(ge=-1, le=1024)] = -1
    threshold_b: Annotated[float, Meta(ge=-1, le=1024)] = -1
    guidance_start: Annotated[float, Meta(ge=0, le=1)] = 0.0
    guidance_end: Annotated[float, Meta(ge=0, le=1)] = 1.0
    pixel_perfect: bool = False
    control_mode: str | int = "Balanced"
    hr_option: str = "Both"
    # Batch-folder fields of the extension's UI: accepted, no meaning over an API.
    input_mode: str = "simple"
    batch_images: str | list[Any] = ""
    output_dir: str = ""
    loopback: bool = False

    def image_value(self) -> str | None:
        value = self.image if self.image is not None else self.input_image
        if isinstance(value, dict):
            value = value.get("image")
        return value if isinstance(value, str) and value else None


def _index(value: str | int, names: tuple[str, ...], legacy: dict[str, int]) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value if 0 <= value < len(names) else None
    if isinstance(value, str):
        if value in names:
            return names.index(value)
        return legacy.get(value)
    return None


def resize_mode_name(value: str | int) -> str | None:
    index = _index(value, RESIZE_MODES, _LEGACY_RESIZE)
    return None if index is None else RESIZE_MODES[index]


def control_mode_name(value: str | int) -> str | None:
    index = _index(value, CONTROL_MODES, {})
    return None if index is None else CONTROL_MODES[index]


def script_units(alwayson_scripts: dict[str, Any]) -> tuple[str, list[Any]] | None:
    """The raw ``args`` list of the request's ControlNet script and the key it was under."""
    for key in _LEGACY_SCRIPT_KEYS:
        script = alwayson_scripts.get(key)
        if script is not None:
            args = script.get("args") if isinstance(script, dict) else None
            return key, args if isinstance(args, list) else []
    return None


class ControlUnit(Struct, kw_only=True, frozen=True, omit_defaults=True):
    """A resolved, enabled ControlNet unit as a task carries it on the bus."""

    model: AdapterRef
    image_key: str
    """Object key of the unit's input image (an ``input_keys`` entry)."""
    module: str = "none"
    weight: float = 1.0
    resize_mode: str = "Crop and Resize"
    processor_res: int = 512
    threshold_a: float | None = None
    threshold_b: float | None = None
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    pixel_perfect: bool = False
    control_mode: str = "Balanced"
    hr_option: str = "Both"

    def guides(self, *, hires_pass: bool) -> bool:
        """Whether the unit guides this pass of a hires-fix request."""
        return self.hr_option != ("Low res only" if hires_pass else "High res only")

    def infotext(self) -> str:
        """The extension's per-unit infotext entry."""
        parts = [
            f"Module: {self.module}",
            f"Model: {self.model.name}"
            + (f" [{self.model.sha256[:8]}]" if self.model.sha256 else ""),
            f"Weight: {self.weight:g}",
            f"Resize Mode: {self.resize_mode}",
            f"Processor Res: {self.processor_res}",
            *([f"Threshold A: {self.threshold_a:g}"] if self.threshold_a is not None else []),
            *([f"Threshold B: {self.threshold_b:g}"] if self.threshold_b is not None else []),
            f"Guidance Start: {self.guidance_start:g}",
            f"Guidance End: {self.guidance_end:g}",
            f"Pixel Perfect: {self.pixel_perfect}",
            f"Control Mode: {self.control_mode}",
            *([f"Hr Option: {self.hr_option}"] if self.hr_option != "Both" else []),
        ]
        return ", ".join(parts)


class DetectRequest(Struct, kw_only=True, frozen=True):
    """The extension's ``POST /controlnet/detect``: run a preprocessor on images."""

    controlnet_module: str = "none"
    controlnet_input_images: list[str] = []
    """Base64 images (``data:`` prefix optional) or object keys of the caller's."""
    controlnet_images: list[str] = []
    """Older name of ``controlnet_input_images`` (some clients still send it)."""
    controlnet_processor_res: Annotated[int, Meta(ge=-1, le=2048)] = 512
    controlnet_threshold_a: Annotated[float, Meta(ge=-1, le=1024)] = -1
    controlnet_threshold_b: Annotated[float, Meta(ge=-1, le=1024)] = -1


class DetectResponse(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    images: list[str]
    """The maps as base64 PNGs, in order."""
    info: str = "Success"
