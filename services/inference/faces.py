"""Face restoration: faces found by OpenCV's Haar cascade, restored one by one by a
registered GFPGAN-style network, pasted back with a feathered mask.

- **Detector.** OpenCV's frontal-face Haar cascade, which ships inside
  ``opencv-python-headless`` 4.x (``cv2.data``): it runs offline, on the CPU, in
  milliseconds. OpenCV 5 dropped ``CascadeClassifier`` and the cascade files, hence the
  ``<5`` pin. ``SDSWARM_FACE_DETECTOR_PATH`` names another cascade file.
- **Restorer.** A file registered as type ``faceRestorer`` (A1111's ``GFPGAN/`` folder),
  loaded by spandrel's architecture detection (GFPGAN v1 "clean", RestoreFormer): no
  network is written here. CodeFormer is not supported: its code and weights are under
  the S-Lab licence (non-commercial), and spandrel keeps it out of its main package.
- **Alignment.** The cascade gives a box, no landmarks: a square of
  :data:`CROP_SCALE` × the box around its centre (GFPGAN was trained on FFHQ crops, which
  hold the whole head) is scaled to the network's 512 × 512. It is not rotated: the
  frontal cascade finds upright faces only (it missed the test face tilted by 8°), and
  OpenCV's eye cascade did not find drawn eyes reliably enough to level by them.
- **Paste-back.** The restored square is warped back and blended in through a mask that
  is 1 inside and falls off over the outer :data:`FEATHER` of the square; pixels outside
  every face's square are never touched.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from services.inference.pipeline import GenerationError, TaskCancelledError
from services.inference.upscalers import LoadedModels, TensorFn, spandrel_module

FACE_SIZE = 512
"""Side of the square the restorers work on (GFPGAN's ``out_size``)."""
CROP_SCALE = 1.6
"""Crop side ÷ detected box side: the cascade's box spans brows to mouth."""
FEATHER = 0.1
"""Fraction of the crop's side over which the paste-back mask falls from 1 to 0."""
DEFAULT_CASCADE = "haarcascade_frontalface_default.xml"

Box = tuple[int, int, int, int]
"""``(x, y, width, height)`` of a detected face, in image pixels."""


def _cv2() -> Any:
    import cv2

    return cv2


class FaceDetector:
    """OpenCV's frontal-face Haar cascade."""

    def __init__(self, cascade_path: str = "") -> None:
        cv2 = _cv2()
        if not hasattr(cv2, "CascadeClassifier"):
            raise GenerationError(
                "face_detector_unavailable",
                f"face restoration needs OpenCV's Haar cascades, which OpenCV {cv2.__version__}"
                " does not have: install opencv-python-headless<5 (the project's pin)",
            )
        data = Path(getattr(getattr(cv2, "data", None), "haarcascades", "") or ".")
        path = Path(cascade_path) if cascade_path else data / DEFAULT_CASCADE
        self._faces = self._load(cv2, path)
        self._lock = threading.Lock()

    @staticmethod
    def _load(cv2: Any, path: Path) -> Any:
        cascade = cv2.CascadeClassifier(str(path)) if path.is_file() else None
        if cascade is None or cascade.empty():
            raise GenerationError(
                "face_detector_unavailable", f"no usable Haar cascade file at {path}"
            )
        return cascade

    def detect(self, image: Image.Image) -> list[Box]:
        """Faces at least 1/16 of the shorter side (and 24 px), largest first."""
        cv2 = _cv2()
        gray = cv2.equalizeHist(cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY))
        least = max(24, min(image.size) // 16)
        with self._lock:  # a cascade object is not safe to share between threads
            found = self._faces.detectMultiScale(
                gray, scaleFactor=1.1, minNeighbors=5, minSize=(least, least)
            )
        boxes = [(int(x), int(y), int(w), int(h)) for x, y, w, h in found]
        return sorted(boxes, key=lambda b: b[2] * b[3], reverse=True)


@dataclass(frozen=True)
class FaceRestorer:
    """A loaded restorer: ``fn`` maps ``1×3×512×512`` in [0, 1] to the same."""

    name: str
    fn: TensorFn
    device: str


def load_face_restorer(name: str, path: Path, device: str) -> FaceRestorer:
    """Load a face-restoration file (``.pth``, ``.safetensors``) with spandrel."""
    spandrel = spandrel_module()
    if not path.is_file():
        raise GenerationError("face_restorer_not_found", f"face restorer {name!r}: no file {path}")
    try:
        descriptor = spandrel.ModelLoader(device=device).load_from_file(str(path))
    except spandrel.UnsupportedModelError as exc:
        raise GenerationError(
            "face_restorer_unsupported",
            f"face restorer {name!r}: architecture not recognised: {exc}",
        ) from exc
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise GenerationError(
            "face_restorer_load_failed", f"face restorer {name!r} cannot be loaded: {exc}"
        ) from exc
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.purpose != "FaceSR":
        purpose = getattr(descriptor, "purpose", type(descriptor).__name__)
        raise GenerationError(
            "face_restorer_unsupported",
            f"face restorer {name!r} is a {purpose} model, not a face restorer",
        )
    descriptor.eval()
    fn: TensorFn = descriptor
    if descriptor.architecture.id == "GFPGAN":
        network = descriptor.model

        def gfpgan(x: torch.Tensor) -> torch.Tensor:
            # GFPGAN works in [-1, 1] and spandrel's call leaves that to the caller; the
            # stored noise (not fresh noise per call) makes the result reproducible.
            out: torch.Tensor = network(x * 2 - 1, return_rgb=False, randomize_noise=False)[0]
            return ((out + 1) / 2).clamp(0, 1)

        fn = gfpgan
    return FaceRestorer(name=name, fn=fn, device=device)


class RestorerCache(LoadedModels[FaceRestorer]):
    """Loaded restorers by path (one kept: GFPGAN holds ~350 MB of weights)."""

    def __init__(
        self,
        device: str,
        capacity: int = 1,
        loader: Callable[[str, Path, str], FaceRestorer] = load_face_restorer,
    ) -> None:
        super().__init__(device, capacity, loader)


def crop_transform(box: Box) -> np.ndarray:
    """The 2×3 affine map from image pixels to the ``FACE_SIZE`` square of ``box``'s
    face: centred on the box, :data:`CROP_SCALE` × its side."""
    x, y, w, h = box
    scale = FACE_SIZE / (CROP_SCALE * max(w, h))
    centre_x, centre_y = x + w / 2, y + h / 2
    return np.array(
        [
            [scale, 0.0, FACE_SIZE / 2 - scale * centre_x],
            [0.0, scale, FACE_SIZE / 2 - scale * centre_y],
        ]
    )


def feather_mask() -> np.ndarray:
    """``FACE_SIZE``² weights: 1 inside, falling linearly to 0 over the outer FEATHER."""
    edge = FEATHER * FACE_SIZE
    ramp = np.clip((np.arange(FACE_SIZE) + 0.5) / edge, 0, 1)
    ramp = np.minimum(ramp, ramp[::-1])
    mask: np.ndarray = np.minimum.outer(ramp, ramp).astype(np.float32)
    return mask


def restore_faces(
    image: Image.Image,
    detector: FaceDetector,
    restorer: FaceRestorer,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    on_face: Callable[[], None] = lambda: None,
) -> tuple[Image.Image, list[Box]]:
    """``image`` with every detected face restored, and the faces' boxes."""
    cv2 = _cv2()
    rgb = image.convert("RGB")
    boxes = detector.detect(rgb)
    if not boxes:
        return rgb, []
    out = np.asarray(rgb, dtype=np.float32)
    size = (rgb.width, rgb.height)
    for box in boxes:
        if should_stop():
            raise TaskCancelledError
        matrix = crop_transform(box)
        face = cv2.warpAffine(
            out, matrix, (FACE_SIZE, FACE_SIZE), flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REFLECT_101,
        )  # fmt: skip
        tensor = torch.from_numpy(face / 255.0).permute(2, 0, 1).unsqueeze(0)
        with torch.inference_mode():
            restored = restorer.fn(tensor.to(restorer.device))
        restored_np = restored.squeeze(0).permute(1, 2, 0).float().cpu().numpy() * 255.0
        inverse = cv2.invertAffineTransform(matrix)
        back = cv2.warpAffine(restored_np, inverse, size, flags=cv2.INTER_LINEAR)
        weight = cv2.warpAffine(feather_mask(), inverse, size, flags=cv2.INTER_LINEAR)
        weight = weight[..., None]
        out = np.where(weight > 0, out * (1 - weight) + back * weight, out)
        on_face()
    result = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return Image.fromarray(result, "RGB"), boxes


def face_region(box: Box) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` bounding the pixels a restored face may change."""
    cv2 = _cv2()
    inverse = cv2.invertAffineTransform(crop_transform(box))
    corners = np.array([[0, 0, 1], [FACE_SIZE, 0, 1], [0, FACE_SIZE, 1], [FACE_SIZE, FACE_SIZE, 1]])
    points = corners @ inverse.T
    x0, y0 = np.floor(points.min(axis=0)).astype(int)
    x1, y1 = np.ceil(points.max(axis=0)).astype(int)
    return int(x0), int(y0), int(x1), int(y1)


class FaceRestoration:
    """What a worker keeps for face restoration: the detector and the loaded restorer,
    both made on first use (a worker that never restores a face loads neither)."""

    def __init__(self, device: str, detector_path: str = "") -> None:
        self.device = device
        self.detector_path = detector_path
        self._detector: FaceDetector | None = None
        self._restorers = RestorerCache(device)

    def restore(
        self,
        name: str,
        path: str,
        image: Image.Image,
        *,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> Image.Image:
        """``image`` with its faces restored by the restorer file ``path``."""
        if self._detector is None:
            self._detector = FaceDetector(self.detector_path)
        restorer = self._restorers.get(name, path)
        restored, _ = restore_faces(image, self._detector, restorer, should_stop=should_stop)
        return restored
