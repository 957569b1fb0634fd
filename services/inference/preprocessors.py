"""ControlNet preprocessors and the extension's image geometry (numpy, OpenCV, Pillow;
no torch, so the gateway's ``/controlnet/detect`` can run them too).

* **Preprocessors** that need no downloaded weights (:data:`BUILTIN_MODULES`); the input
  is scaled so its short side is ``processor_res`` first (``pixel_perfect`` computes that
  resolution from the generation size instead).
* **Geometry** (``resize_mode``): *Just Resize* stretches the map to the generation
  size, *Crop and Resize* scales it to cover and crops the centre, *Resize and Fill*
  scales it to fit and pads with black (no control).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from proto.controlnet import BUILTIN_MODULES, ControlUnit


class ControlNetError(Exception):
    """A unit cannot run (unreadable model or image); the message names it."""


# --- preprocessors --------------------------------------------------------------------


def _cv2() -> Any:
    import cv2

    return cv2


def _rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _threshold(unit: ControlUnit, which: str) -> float:
    default_a, default_b = BUILTIN_MODULES[unit.module]
    value = unit.threshold_a if which == "a" else unit.threshold_b
    default = default_a if which == "a" else default_b
    if value is None or value < 0:
        return float(default if default is not None else 0)
    return float(value)


def run_module(image: np.ndarray, unit: ControlUnit) -> np.ndarray:
    """``unit.module`` on an RGB ``uint8`` array (H × W × 3); the map, same layout."""
    cv2 = _cv2()
    module = unit.module
    if module == "none":
        return image
    if module == "invert":
        return 255 - image
    if module == "canny":
        edges = cv2.Canny(image, _threshold(unit, "a"), _threshold(unit, "b"))
        return _rgb(edges)
    if module == "threshold":
        out = np.where(image.min(axis=2) > _threshold(unit, "a"), 255, 0).astype(np.uint8)
        return _rgb(out)
    pixels = image.astype(np.float32)
    if module == "scribble_xdog":
        # Difference of Gaussians, darkest channel, binarised at threshold_a.
        fine = cv2.GaussianBlur(pixels, (0, 0), 0.5)
        coarse = cv2.GaussianBlur(pixels, (0, 0), 5.0)
        dog = np.clip(np.min(coarse - fine, axis=2), 0, 255)
        return _rgb(np.where(2 * dog > _threshold(unit, "a"), 255, 0).astype(np.uint8))
    if module == "lineart_standard":
        # Lines are what is darker than its blurred surroundings, normalised by the
        # median line strength.
        blurred = cv2.GaussianBlur(pixels, (0, 0), 6.0)
        intensity = np.clip(np.min(blurred - pixels, axis=2), 0, 255)
        strong = intensity[intensity > 8]
        scale = max(16.0, float(np.median(strong))) if strong.size else 16.0
        return _rgb(np.clip(intensity / scale * 127, 0, 255).astype(np.uint8))
    if module == "tile_resample":
        rate = max(_threshold(unit, "a"), 1.0)
        height, width = image.shape[:2]
        size = (max(1, round(width / rate)), max(1, round(height / rate)))
        return np.asarray(cv2.resize(image, size, interpolation=cv2.INTER_AREA))
    if module == "blur_gaussian":
        sigma = max(_threshold(unit, "a"), 0.01)
        return np.asarray(cv2.GaussianBlur(image, (0, 0), sigma))
    if module == "recolor_luminance":
        lab = cv2.cvtColor(pixels / 255.0, cv2.COLOR_RGB2LAB)
        gray = (np.clip(lab[:, :, 0] / 100.0, 0, 1) ** _threshold(unit, "a")) * 255
        return _rgb(gray.astype(np.uint8))
    if module == "recolor_intensity":
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        gray = ((hsv[:, :, 2] / 255.0) ** _threshold(unit, "a")) * 255
        return _rgb(gray.astype(np.uint8))
    raise ControlNetError(f"ControlNet module {module!r} is not built in")


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    cv2 = _cv2()
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image
    shrink = width * height < w * h
    return np.asarray(
        cv2.resize(
            image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC
        )
    )


def processor_resolution(unit: ControlUnit, size: tuple[int, int], width: int, height: int) -> int:
    """The short side the preprocessor works at: ``processor_res``, or with
    ``pixel_perfect`` the one whose map lands on the generation size 1:1."""
    if not unit.pixel_perfect:
        return unit.processor_res
    raw_w, raw_h = size
    ratios = (height / raw_h, width / raw_w)
    factor = min(ratios) if unit.resize_mode == "Resize and Fill" else max(ratios)
    return max(64, round(factor * min(raw_w, raw_h)))


def fit(image: np.ndarray, mode: str, width: int, height: int) -> np.ndarray:
    """The extension's ``resize_mode`` geometry from a map to ``width`` × ``height``."""
    h, w = image.shape[:2]
    if mode == "Just Resize":
        return _resize(image, width, height)
    if mode == "Crop and Resize":
        factor = max(width / w, height / h)
        scaled_w, scaled_h = max(width, round(w * factor)), max(height, round(h * factor))
        scaled = _resize(image, scaled_w, scaled_h)
        left, top = (scaled_w - width) // 2, (scaled_h - height) // 2
        return scaled[top : top + height, left : left + width]
    factor = min(width / w, height / h)  # Resize and Fill
    scaled_w, scaled_h = min(width, round(w * factor)), min(height, round(h * factor))
    scaled = _resize(image, max(scaled_w, 1), max(scaled_h, 1))
    out = np.zeros((height, width, 3), dtype=np.uint8)
    left, top = (width - scaled.shape[1]) // 2, (height - scaled.shape[0]) // 2
    out[top : top + scaled.shape[0], left : left + scaled.shape[1]] = scaled
    return out


def detect(source: Image.Image, unit: ControlUnit, resolution: int) -> np.ndarray:
    """The module's map of ``source``, worked out with its short side at ``resolution``."""
    image = np.asarray(source.convert("RGB"))
    if unit.module == "none":
        return image
    h, w = image.shape[:2]
    factor = resolution / min(w, h)
    image = _resize(image, max(1, round(w * factor)), max(1, round(h * factor)))
    return run_module(image, unit)


def preprocess(source: Image.Image, unit: ControlUnit, width: int, height: int) -> Image.Image:
    """The control image for one unit at the generation size."""
    resolution = processor_resolution(unit, source.size, width, height)
    image = detect(source, unit, resolution)
    return Image.fromarray(fit(image, unit.resize_mode, width, height))
