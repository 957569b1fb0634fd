"""Upscalers: A1111's built-in resamplers, and model upscalers run tile by tile.

Model files (ESRGAN, Real-ESRGAN, SwinIR … registered as type ``upscaler``) are loaded
with spandrel, which detects the architecture from the state dict; no network is
written here. spandrel imports torchvision at import time, and the registry's
torchvision does not load next to the CPU torch build this project pins (see
README, "Extras"): where ``import spandrel`` fails, a task naming a model upscaler
fails with that import error, and the built-in resamplers still work.

Tiling: the image is cut into ``tile`` × ``tile`` cores; each runs with ``overlap``
pixels of real context on every side (clamped at the borders), and only the core's
output is kept. For a network whose receptive field reaches at most ``overlap``
pixels, the tiled result equals the untiled one up to float rounding.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from PIL import Image

from services.inference.pipeline import GenerationError, TaskCancelledError

RESAMPLERS = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
MAX_MODEL_PASSES = 3
"""A1111 runs a model at most three times to reach the requested size."""

TensorFn = Callable[[torch.Tensor], torch.Tensor]
TileCallback = Callable[[], None]
"""Called after every tile (progress)."""


def to_tensor(image: Image.Image, device: str | torch.device = "cpu") -> torch.Tensor:
    """An RGB image as a ``1×3×H×W`` float tensor in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).to(device)


def to_image(tensor: torch.Tensor) -> Image.Image:
    array = tensor.squeeze(0).clamp(0, 1).permute(1, 2, 0).float().cpu().numpy()
    return Image.fromarray((array * 255.0).round().astype(np.uint8), "RGB")


def tile_boxes(height: int, width: int, tile: int) -> list[tuple[int, int, int, int]]:
    """``(y0, x0, y1, x1)`` cores covering the image; one box when ``tile`` is 0."""
    if tile <= 0:
        return [(0, 0, height, width)]
    return [
        (y, x, min(y + tile, height), min(x + tile, width))
        for y in range(0, height, tile)
        for x in range(0, width, tile)
    ]


def tiled(
    fn: TensorFn,
    image: torch.Tensor,
    scale: int,
    *,
    tile: int,
    overlap: int,
    on_tile: TileCallback = lambda: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> torch.Tensor:
    """``fn`` (an ×``scale`` network) applied to ``image`` tile by tile."""
    _, _, height, width = image.shape
    out: torch.Tensor | None = None
    for y0, x0, y1, x1 in tile_boxes(height, width, tile):
        if should_stop():
            raise TaskCancelledError
        py0, px0 = max(y0 - overlap, 0), max(x0 - overlap, 0)
        py1, px1 = min(y1 + overlap, height), min(x1 + overlap, width)
        with torch.inference_mode():
            result = fn(image[:, :, py0:py1, px0:px1])
        expected = ((py1 - py0) * scale, (px1 - px0) * scale)
        if tuple(result.shape[-2:]) != expected:
            raise GenerationError(
                "upscaler_failed",
                f"the upscaler returned {tuple(result.shape[-2:])} for a tile that should"
                f" become {expected} at ×{scale}",
            )
        if out is None:
            out = result.new_zeros((1, result.shape[1], height * scale, width * scale))
        s = scale
        out[:, :, y0 * s : y1 * s, x0 * s : x1 * s] = result[
            :, :, (y0 - py0) * s : (y1 - py0) * s, (x0 - px0) * s : (x1 - px0) * s
        ]
        on_tile()
    assert out is not None
    return out


@dataclass(frozen=True)
class ModelUpscaler:
    """A loaded upscaler network: ``fn`` maps ``1×3×h×w`` to ``1×3×(h·scale)×(w·scale)``."""

    name: str
    scale: int
    fn: TensorFn
    device: str


def spandrel_module() -> Any:
    try:
        import spandrel
    except (ImportError, RuntimeError, OSError) as exc:
        # Missing spandrel or torchvision (ImportError); a torchvision built for another
        # torch fails with RuntimeError ("operator torchvision::nms does not exist").
        raise GenerationError(
            "upscaler_unavailable",
            f"model upscalers need spandrel, which cannot be imported on this worker: {exc}",
        ) from exc
    return spandrel


def load_model_upscaler(name: str, path: Path, device: str) -> ModelUpscaler:
    """Load an upscaler file (``.pth``, ``.safetensors``) with spandrel's detection."""
    spandrel = spandrel_module()
    if not path.is_file():
        raise GenerationError("upscaler_not_found", f"upscaler {name!r}: no file {path}")
    try:
        # .pth files go through spandrel's restricted unpickler: tensors only, no code.
        descriptor = spandrel.ModelLoader(device=device).load_from_file(str(path))
    except spandrel.UnsupportedModelError as exc:
        raise GenerationError(
            "upscaler_unsupported", f"upscaler {name!r}: architecture not recognised: {exc}"
        ) from exc
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise GenerationError(
            "upscaler_load_failed", f"upscaler {name!r} cannot be loaded: {exc}"
        ) from exc
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.purpose != "SR":
        purpose = getattr(descriptor, "purpose", type(descriptor).__name__)
        raise GenerationError(
            "upscaler_unsupported", f"upscaler {name!r} is a {purpose} model, not an upscaler"
        )
    descriptor.eval()
    return ModelUpscaler(name=name, scale=int(descriptor.scale), fn=descriptor, device=device)


M = TypeVar("M")


class LoadedModels(Generic[M]):
    """Loaded models by path, least recently used evicted past ``capacity``; ``loader``
    makes one from ``(name, path, device)``. Thread-safe (pipeline threads share it)."""

    def __init__(self, device: str, capacity: int, loader: Callable[[str, Path, str], M]) -> None:
        self.device = device
        self.capacity = capacity
        self._loader = loader
        self._models: OrderedDict[str, M] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, name: str, path: str) -> M:
        with self._lock:
            model = self._models.get(path)
            if model is None:
                model = self._loader(name, Path(path), self.device)
                self._models[path] = model
            self._models.move_to_end(path)
            while len(self._models) > self.capacity:
                self._models.popitem(last=False)
            return model


class ModelCache(LoadedModels[ModelUpscaler]):
    """Loaded upscaler models by path."""

    def __init__(
        self,
        device: str,
        capacity: int = 2,
        loader: Callable[[str, Path, str], ModelUpscaler] = load_model_upscaler,
    ) -> None:
        super().__init__(device, capacity, loader)


def model_passes(size: tuple[int, int], target: tuple[int, int], scale: int) -> int:
    """How many times A1111 runs an ×``scale`` model to reach ``target`` (at most 3)."""
    width, height = size
    passes = 0
    while passes < MAX_MODEL_PASSES and (width < target[0] or height < target[1]):
        width, height, passes = width * scale, height * scale, passes + 1
        if scale <= 1:
            break
    return passes


def upscale_with_model(
    model: ModelUpscaler,
    image: Image.Image,
    target: tuple[int, int],
    *,
    tile: int,
    overlap: int,
    on_tile: TileCallback = lambda: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> Image.Image:
    """Run the model until the image covers ``target``, then Lanczos to exactly it."""
    for _ in range(model_passes(image.size, target, model.scale)):
        tensor = to_tensor(image, model.device)
        out = tiled(
            model.fn,
            tensor,
            model.scale,
            tile=tile,
            overlap=overlap,
            on_tile=on_tile,
            should_stop=should_stop,
        )
        image = to_image(out)
    if image.size != target:
        image = image.resize(target, Image.Resampling.LANCZOS)
    return image
