"""Extras (A1111 "postprocessing"): upscale each input image, as a task like any other.

An extras worker serves the pool keyed :data:`proto.names.EXTRAS_MODEL_KEY`; it loads
no checkpoint, only the upscaler models its tasks name (cached). It satisfies the
:class:`~services.inference.pipeline.Pipeline` protocol: one output PNG per input key,
progress per tile (built-in resamplers count one step per upscaler), cancellation
checked between images and tiles.

Geometry and the two-upscaler blend follow A1111's ``postprocessing_upscale``:
``upscaler_1`` ``None`` leaves the image as it is; otherwise both upscalers resize the
source to :meth:`ExtrasOptions.upscale_size`, ``upscaler_2``'s result is blended over
the first with ``extras_upscaler_2_visibility``, and ``resize_mode`` 1 with
``upscaling_crop`` centre-crops to the requested box.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from proto import GenerateImage
from proto.commands import AdapterRef, ExtrasTask
from proto.requests import BUILTIN_UPSCALERS, ExtrasOptions
from services.inference.faces import FaceRestoration
from services.inference.pipeline import (
    Generation,
    GenerationError,
    Inputs,
    StepCallback,
    TaskCancelledError,
    on_this_thread,
)
from services.inference.presentation import extras_infotext, second_upscaler
from services.inference.upscalers import (
    RESAMPLERS,
    ModelCache,
    model_passes,
    tile_boxes,
    upscale_with_model,
)


def crop_to(image: Image.Image, width: int, height: int) -> Image.Image:
    """Centre crop (A1111 pastes the image centred on a box of the target size)."""
    left = (image.width - width) // 2
    top = (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


@dataclass
class _Steps:
    """Progress of one image: steps done of the total planned for it."""

    job_no: int
    total: int
    on_step: StepCallback
    done: int = 0

    def advance(self) -> None:
        self.done += 1
        self.on_step(self.job_no, self.done, self.total, None)


class ExtrasRunner:
    """The extras worker's pipeline; blocking and not re-entrant, like the diffusers one."""

    def __init__(
        self,
        *,
        device: str,
        tile: int,
        overlap: int,
        models: ModelCache,
        faces: FaceRestoration | None = None,
    ) -> None:
        self.device = device
        self.tile = tile
        self.overlap = overlap
        self.models = models
        self.faces = faces or FaceRestoration(device)

    def generate(
        self,
        command: GenerateImage,
        inputs: Inputs,
        on_step: StepCallback,
        should_stop: Callable[[], bool],
        should_skip: Callable[[], bool] = lambda: False,
    ) -> Generation:
        # A1111's skip ends a job of a batch; an extras task has none to skip.
        if not isinstance(command, ExtrasTask):
            raise GenerationError("wrong_worker", "an extras worker got a task without extras")
        on_this_thread(self.device)
        options = command.request
        refusal = options.face_refusal(has_restorer=command.face_restorer is not None)
        if refusal is not None:
            raise GenerationError(refusal.code, refusal.message)
        text = extras_infotext(options)
        images: list[bytes] = []
        for job_no, key in enumerate(command.input_keys):
            if should_stop():
                raise TaskCancelledError
            source = _open(inputs[key], key)
            result = self.process(
                source,
                options,
                command.upscalers,
                job_no,
                on_step,
                should_stop,
                restorer=command.face_restorer,
            )
            images.append(_png(result, source, text))
        info = {"html_info": f"<p>{text}</p>" if text else "", "postprocessing": text}
        return Generation(images=images, seeds=[], info=info)

    def process(
        self,
        image: Image.Image,
        options: ExtrasOptions,
        upscalers: dict[str, str],
        job_no: int = 0,
        on_step: StepCallback = lambda *_: None,
        should_stop: Callable[[], bool] = lambda: False,
        *,
        restorer: AdapterRef | None = None,
    ) -> Image.Image:
        """One image through A1111's face restoration and upscale steps (in that order,
        or upscaling first with ``upscale_first``)."""
        image = image.convert("RGB")
        restore = restorer is not None and options.gfpgan_visibility > 0
        upscale = options.upscaler_1 != "None"
        if not upscale and not restore:
            on_step(job_no, 1, 1, None)
            return image
        target = options.upscale_size(image.width, image.height)
        names = [options.upscaler_1] + ([options.upscaler_2] if second_upscaler(options) else [])
        if not upscale:
            names = []
        total = sum(self._steps(n, image.size, target, upscalers) for n in names) + int(restore)
        steps = _Steps(job_no, total, on_step)

        def faces(source: Image.Image) -> Image.Image:
            if restorer is None or not restore:
                return source
            restored = self.faces.restore(
                restorer.name, restorer.path, source, should_stop=should_stop
            )
            steps.advance()
            return Image.blend(source, restored, options.gfpgan_visibility)

        if not options.upscale_first:
            image = faces(image)
        if upscale:
            results = [
                self._upscale(n, image, target, upscalers, steps, should_stop) for n in names
            ]
            image = results[0]
            if len(results) > 1:
                image = Image.blend(image, results[1], options.extras_upscaler_2_visibility)
            if options.resize_mode == 1 and options.upscaling_crop:
                image = crop_to(image, options.upscaling_resize_w, options.upscaling_resize_h)
        if options.upscale_first:
            image = faces(image)
        return image

    def _steps(
        self, name: str, size: tuple[int, int], target: tuple[int, int], upscalers: dict[str, str]
    ) -> int:
        if name in BUILTIN_UPSCALERS:
            return 1
        model = self.models.get(name, _path(name, upscalers))
        total, (width, height) = 0, size
        for _ in range(model_passes(size, target, model.scale)):
            total += len(tile_boxes(height, width, self.tile))
            width, height = width * model.scale, height * model.scale
        return max(total, 1)

    def _upscale(
        self,
        name: str,
        image: Image.Image,
        target: tuple[int, int],
        upscalers: dict[str, str],
        steps: _Steps,
        should_stop: Callable[[], bool],
    ) -> Image.Image:
        if name in RESAMPLERS:
            result = image.resize(target, RESAMPLERS[name])
            steps.advance()
            return result
        model = self.models.get(name, _path(name, upscalers))
        before = steps.done
        result = upscale_with_model(
            model,
            image,
            target,
            tile=self.tile,
            overlap=self.overlap,
            on_tile=steps.advance,
            should_stop=should_stop,
        )
        if steps.done == before:  # already at the size: no model pass ran
            steps.advance()
        return result


def _path(name: str, upscalers: dict[str, str]) -> str:
    path = upscalers.get(name)
    if path is None:
        known = ", ".join([*BUILTIN_UPSCALERS, *sorted(upscalers)])
        raise GenerationError("upscaler_not_found", f"no upscaler {name!r}; known: {known}")
    return path


def _open(data: bytes, key: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise GenerationError("invalid_image", f"input {key} is not a readable image") from exc
    return image


def _png(image: Image.Image, source: Image.Image, text: str) -> bytes:
    """The result as PNG; the source's generation parameters are kept (A1111 does too)."""
    meta = PngInfo()
    parameters = getattr(source, "text", {}).get("parameters")
    if parameters:
        meta.add_text("parameters", parameters)
    if text:
        meta.add_text("postprocessing", text)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=meta)
    return buffer.getvalue()
