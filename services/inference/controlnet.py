"""ControlNet on the worker: preprocessors, the extension's image geometry, control modes.

The behaviour follows A1111's ControlNet extension, reimplemented from its documented
semantics. Preprocessors and the image geometry are in
:mod:`services.inference.preprocessors` (no torch: the gateway's ``/controlnet/detect``
runs them too).

* **Control modes:** *Balanced* adds every residual at full weight; *My prompt is more
  important* scales the residuals down towards the shallow layers (× 0.825 per layer);
  *ControlNet is more important* does that too and applies the control to the
  conditional half of classifier-free guidance only.
* **Windows:** ``guidance_start``/``guidance_end`` are fractions of the sampling steps,
  as diffusers counts them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from proto.controlnet import ControlUnit
from services.inference.preprocessors import ControlNetError as ControlNetError
from services.inference.preprocessors import preprocess
from services.storage.modelfiles import ModelFileError, read_safetensors_header

MAX_LOADED = 2
"""ControlNet models kept loaded per worker (an SD1.5 one is ~720 MB in half precision)."""


# --- loading ----------------------------------------------------------------------------

CONFIG_VERSION = "2"


def _config_folder(unet: Any, cache_dir: Path) -> Path:
    """A diffusers ControlNet config matching ``unet`` (a ControlNet copies its base
    model's encoder), written once, so single files load offline."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel

    digest = hashlib.sha256(
        (json.dumps(dict(unet.config), sort_keys=True, default=str) + CONFIG_VERSION).encode()
    ).hexdigest()[:16]
    folder = cache_dir / "configs" / f"controlnet-{digest}"
    if not (folder / "config.json").is_file():
        with init_empty_weights():
            empty = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
        staging = folder.with_name(f".{folder.name}.{os.getpid()}")
        empty.save_config(staging)
        # An inpainting UNet takes 9 channels (latents, mask, masked image); its
        # ControlNets, like every ControlNet, see the 4 latent channels only.
        config_file = staging / "config.json"
        config = json.loads(config_file.read_text())
        config["in_channels"] = unet.config.out_channels
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
        try:
            staging.replace(folder)
        except OSError:  # another worker wrote it first
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def load_controlnet(path: Path, unet: Any, cache_dir: Path) -> Any:
    """An A1111 ControlNet file (LDM layout, with or without ``control_model.``) or a
    diffusers folder / single file, in the UNet's dtype."""
    from diffusers import ControlNetModel

    dtype = unet.dtype
    try:
        if path.is_dir():
            return ControlNetModel.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
        if path.suffix.lower() != ".safetensors":
            raise ControlNetError(f"{path.name}: only .safetensors ControlNet files are loaded")
        tensors, _ = read_safetensors_header(path)
        diffusers_layout = any(key.startswith("controlnet_cond_embedding.") for key in tensors)
        folder = _config_folder(unet, cache_dir)
        if diffusers_layout:
            from safetensors.torch import load_file

            model = ControlNetModel.from_config(ControlNetModel.load_config(folder))
            model.load_state_dict(load_file(str(path)))
            return model if dtype == torch.float32 else model.to(dtype)
        return ControlNetModel.from_single_file(
            str(path), config=str(folder), local_files_only=True, torch_dtype=dtype
        )
    except ControlNetError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, ModelFileError) as exc:
        raise ControlNetError(f"ControlNet {path.name} cannot be loaded: {exc}") from exc


class ControlNetCache:
    """Loaded ControlNets by file identity, least recently used dropped first."""

    def __init__(self, unet: Any, device: str, cache_dir: Path, size: int = MAX_LOADED) -> None:
        self.unet = unet
        self.device = device
        self.cache_dir = cache_dir
        self.size = size
        self._loaded: OrderedDict[str, Any] = OrderedDict()

    def get(self, unit: ControlUnit) -> Any:
        key = unit.model.sha256 or unit.model.path
        model = self._loaded.get(key)
        if model is None:
            model = load_controlnet(Path(unit.model.path), self.unet, self.cache_dir)
            model = model.to(self.device)
            model.eval()
            self._loaded[key] = model
            while len(self._loaded) > self.size:
                self._loaded.popitem(last=False)
        self._loaded.move_to_end(key)
        return model


def runs(unit: ControlUnit) -> bool:
    """A unit with an empty guidance window never steers a step: it is left out."""
    return unit.guidance_end > unit.guidance_start


@dataclass
class Control:
    """A task's ControlNet units, ready to run: models loaded, source images decoded."""

    units: list[ControlUnit]
    nets: list[Any]
    sources: list[Image.Image]

    def for_pass(self, *, hires: bool, hires_pass: bool = False) -> Control | None:
        """The units that guide this pass (``hr_option``); None if none does."""
        if not hires:
            return self
        keep = [i for i, u in enumerate(self.units) if u.guides(hires_pass=hires_pass)]
        if not keep:
            return None
        return Control(
            units=[self.units[i] for i in keep],
            nets=[self.nets[i] for i in keep],
            sources=[self.sources[i] for i in keep],
        )

    def images(self, width: int, height: int) -> list[Image.Image]:
        return [
            preprocess(source, unit, width, height)
            for source, unit in zip(self.sources, self.units, strict=True)
        ]

    def model(self, *, guided: bool) -> Any:
        """The units as one diffusers multi-ControlNet (:mod:`control_units`)."""
        # Imported here: diffusers' ControlNet modules (and what they pull in, OpenCV
        # among it) cost the worker's start a second and most tasks never use them.
        from services.inference.control_units import ControlUnits

        return ControlUnits(self.nets, [u.control_mode for u in self.units], guided=guided)

    def options(self, width: int, height: int, *, image_key: str) -> dict[str, Any]:
        """The ControlNet pipeline's arguments; ``image_key`` is ``image`` for txt2img and
        ``control_image`` for img2img/inpaint."""
        return {
            image_key: self.images(width, height),
            "controlnet_conditioning_scale": [u.weight for u in self.units],
            "control_guidance_start": [u.guidance_start for u in self.units],
            "control_guidance_end": [u.guidance_end for u in self.units],
        }


CONTROL_PIPELINES = {
    "StableDiffusionPipeline": "StableDiffusionControlNetPipeline",
    "StableDiffusionImg2ImgPipeline": "StableDiffusionControlNetImg2ImgPipeline",
    "StableDiffusionInpaintPipeline": "StableDiffusionControlNetInpaintPipeline",
    "StableDiffusionXLPipeline": "StableDiffusionXLControlNetPipeline",
    "StableDiffusionXLImg2ImgPipeline": "StableDiffusionXLControlNetImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline": "StableDiffusionXLControlNetInpaintPipeline",
}
"""The ControlNet pipeline for each pipeline the worker runs, sharing its components."""


def with_control(pipe: Any, control: Control, *, guided: bool) -> tuple[Any, str]:
    """A ControlNet pipeline over ``pipe``'s loaded components (no copy), and the name of
    its control-image argument."""
    import diffusers

    name = CONTROL_PIPELINES.get(type(pipe).__name__)
    if name is None:
        raise ControlNetError(f"ControlNet does not run with {type(pipe).__name__}")
    cls = getattr(diffusers, name)
    accepted = _init_parameters(cls)
    components = {k: v for k, v in pipe.components.items() if k in accepted}
    if "requires_safety_checker" in accepted:  # sdswarm never loads one: no warning per task
        components["requires_safety_checker"] = False
    controlled = cls(**components, controlnet=control.model(guided=guided))
    controlled.set_progress_bar_config(disable=True)
    controlled.scheduler = pipe.scheduler
    image_key = "image" if name.endswith("ControlNetPipeline") else "control_image"
    return controlled, image_key


def _init_parameters(cls: Any) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters)
