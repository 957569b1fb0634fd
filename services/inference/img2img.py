"""img2img and inpainting inputs the way AUTOMATIC1111 prepares them (own implementation).

* ``resize_mode``: 0 *Just resize* stretches to ``width`` × ``height``; 1 *Crop and
  resize* scales to cover and crops the centre; 2 *Resize and fill* scales to fit and
  fills the bands by stretching the edge rows (or columns); 3 *Just resize (latent
  upscale)* encodes the image at its own size and resizes the latents (bilinear).
  The mask gets the image's geometry (mode 3: just resize, as the latents).
* ``mask_blur_x`` / ``mask_blur_y``: separate horizontal and vertical Gaussian blurs
  (kernel ``2·int(2.5σ + 0.5) + 1``, mirrored borders); ``mask_blur`` sets both.
* ``inpainting_fill``: 0 *fill* (the masked area painted from the surrounding colours
  before encoding), 1 *original*, 2 *latent noise* (seeded unit noise under the mask in
  latent space), 3 *latent nothing* (zero latents under the mask); 2 and 3 are painted
  too before encoding, as A1111 does (it shows at the mask's edge and in the
  inpainting model's conditioning).
* ``inpaint_full_res`` (*Only masked*): the mask's bounding box plus
  ``inpaint_full_res_padding``, widened to the target aspect ratio, is inpainted at
  ``width`` × ``height`` and pasted back into the original, which keeps its size.
* The original is pasted back outside the (blurred) mask after decoding.
* ``initial_noise_multiplier`` scales the starting noise through a one-shot hook on
  the pipeline's ``prepare_latents``.
"""

from __future__ import annotations

import inspect
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from proto.requests import Img2ImgRequest
from services.inference.family import Variant
from services.inference.presentation import (
    CROP_AND_RESIZE,
    LATENT_NOISE,
    LATENT_NOTHING,
    LATENT_RESIZE,
    ORIGINAL,
    RESIZE_AND_FILL,
)

LANCZOS = Image.Resampling.LANCZOS

Box = tuple[int, int, int, int]
"""``(left, top, right, bottom)``, right and bottom exclusive (PIL's crop box)."""


class InputError(Exception):
    """An input image is missing or unusable; ``code`` is the task's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# --- geometry ------------------------------------------------------------------------


def resize_image(image: Image.Image, mode: int, width: int, height: int) -> Image.Image:
    """``image`` at ``width`` × ``height`` with A1111's ``resize_mode`` geometry.

    Mode 3 is a plain resize here: its latent resize happens after encoding.
    """
    if mode not in (CROP_AND_RESIZE, RESIZE_AND_FILL):
        return image.resize((width, height), LANCZOS)
    wider = width * image.height > image.width * height  # the target's aspect is wider
    # Crop: cover the target (match the dimension the source is short in); fill: fit it.
    match_width = wider if mode == CROP_AND_RESIZE else not wider
    if match_width:
        scaled = (width, image.height * width // image.width)
    else:
        scaled = (image.width * height // image.height, height)
    resized = image.resize((max(scaled[0], 1), max(scaled[1], 1)), LANCZOS)
    left, top = width // 2 - resized.width // 2, height // 2 - resized.height // 2
    canvas = Image.new(image.mode, (width, height))
    canvas.paste(resized, (left, top))
    if mode == RESIZE_AND_FILL:
        _stretch_edges(canvas, resized, left, top)
    return canvas


def _stretch_edges(canvas: Image.Image, inner: Image.Image, left: int, top: int) -> None:
    """Fill the bands around ``inner`` (pasted at ``left, top``) with its edge pixels."""
    width, height = canvas.size
    right, bottom = left + inner.width, top + inner.height
    if top > 0:
        canvas.paste(inner.crop((0, 0, inner.width, 1)).resize((inner.width, top)), (left, 0))
    if bottom < height:
        edge = inner.crop((0, inner.height - 1, inner.width, inner.height))
        canvas.paste(edge.resize((inner.width, height - bottom)), (left, bottom))
    if left > 0:
        canvas.paste(inner.crop((0, 0, 1, inner.height)).resize((left, inner.height)), (0, top))
    if right < width:
        edge = inner.crop((inner.width - 1, 0, inner.width, inner.height))
        canvas.paste(edge.resize((width - right, inner.height)), (right, top))


def mask_box(mask: Image.Image, padding: int) -> Box | None:
    """The bounding box of the mask's non-zero pixels grown by ``padding`` (clamped to
    the image); None for an empty mask."""
    box = mask.point(lambda v: 255 if v > 0 else 0).getbbox()
    if box is None:
        return None
    left, top, right, bottom = box
    return (
        max(left - padding, 0),
        max(top - padding, 0),
        min(right + padding, mask.width),
        min(bottom + padding, mask.height),
    )


def widen_to_aspect(box: Box, width: int, height: int, image_w: int, image_h: int) -> Box:
    """``box`` grown on its short side to the ``width`` : ``height`` aspect ratio,
    centred, shifted back inside the ``image_w`` × ``image_h`` image where possible."""
    left, top, right, bottom = box
    box_w, box_h = right - left, bottom - top
    if box_w * height > box_h * width:  # too wide: grow the height
        top, bottom = _grow(top, bottom, int(box_w * height / width) - box_h, image_h)
    else:
        left, right = _grow(left, right, int(box_h * width / height) - box_w, image_w)
    return left, top, right, bottom


def _grow(start: int, end: int, extra: int, limit: int) -> tuple[int, int]:
    start -= extra // 2
    end += extra - extra // 2
    if end > limit:  # shift back inside, then clamp
        start -= end - limit
        end = limit
    if start < 0:
        end = min(end - start, limit)
        start = 0
    return start, end


# --- masks ---------------------------------------------------------------------------


def binary_mask(image: Image.Image, *, round_alpha: bool = True) -> Image.Image:
    """The mask as ``L``: a transparent RGBA image's alpha channel (thresholded at half
    with ``mask_round``), anything else its luminance (A1111)."""
    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        alpha = image.getchannel("A")
        return alpha.point(lambda v: 255 if v > 128 else 0) if round_alpha else alpha
    return image.convert("L")


def _gaussian(values: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """A Gaussian of σ ``sigma`` along one axis, borders mirrored (OpenCV's default).

    The kernel is OpenCV's size for σ (``2·int(2.5σ + 0.5) + 1`` taps), cut at twice the
    image's extent each side: beyond that a wider one changes nothing visible. OpenCV
    filters long kernels through a DFT, so any σ costs about the same."""
    size = values.shape[1 - axis]
    radius = min(int(2.5 * sigma + 0.5), 2 * size)
    kernel = cv2.getGaussianKernel(2 * radius + 1, sigma)
    kernel = kernel.reshape(1, -1) if axis == 0 else kernel
    blurred: np.ndarray = cv2.filter2D(values, -1, kernel, borderType=cv2.BORDER_REFLECT_101)
    return blurred


def blur_mask(mask: Image.Image, blur_x: float, blur_y: float) -> Image.Image:
    """A1111's mask blur: a horizontal Gaussian of σ ``blur_x``, then a vertical one of
    σ ``blur_y`` (0 = none)."""
    if blur_x <= 0 and blur_y <= 0:
        return mask
    values = np.asarray(mask.convert("L"), dtype=np.float32)
    if blur_x > 0:
        values = _gaussian(values, blur_x, axis=0)
    if blur_y > 0:
        values = _gaussian(values, blur_y, axis=1)
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


FILL_LAYERS = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))
"""``inpainting_fill`` 0's blur radii, widest first, and how often each is laid on."""


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """``inpainting_fill`` 0: the masked area painted from the colours around it.

    The unmasked pixels, premultiplied by their visibility, are blurred at falling radii
    (Pillow's Gaussian costs the same at any radius); un-premultiplied, each blur is the
    local average of the visible colours, and each is composited over the last, so far
    pixels get the broad average and near ones the local colour. The last layer is the
    unblurred image: the unmasked pixels stay as they were.
    """
    visible = Image.new("RGBa", image.size)
    visible.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    canvas = Image.new("RGBA", image.size)
    for radius, times in FILL_LAYERS:
        layer = visible.filter(ImageFilter.GaussianBlur(radius)) if radius else visible
        layer = layer.convert("RGBA")
        for _ in range(times):
            canvas.alpha_composite(layer)
    return canvas.convert("RGB")


def flatten(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """RGB, transparent parts over ``background`` (A1111's default background is white)."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        canvas = Image.new("RGBA", image.size, (*background, 255))
        canvas.alpha_composite(image.convert("RGBA"))
        return canvas.convert("RGB")
    return image.convert("RGB")


# --- the task's inputs ---------------------------------------------------------------


@dataclass
class PreparedImage:
    """One init image, ready to encode, and how its output goes back together."""

    source: Image.Image
    """Pixels to encode: ``width`` × ``height`` (mode 3: the original, a multiple of 8)."""
    mask: Image.Image | None
    """The blurred mask at the generation size (what the sampler regenerates)."""
    source_mask: Image.Image | None
    """The mask at the source's size (the 9-channel model's masked image)."""
    overlay: Image.Image | None
    """The original as RGBA, opaque where it is kept: composited over the output."""
    paste_box: Box | None = None
    """``inpaint_full_res``: where the output goes in the original."""


@dataclass
class ImageInputs:
    """Decoded img2img inputs, shaped the way A1111 shapes them (see the module)."""

    images: list[PreparedImage]
    request: Img2ImgRequest

    @property
    def mask(self) -> Image.Image | None:
        return self.images[0].mask

    @classmethod
    def load(cls, request: Img2ImgRequest, inputs: dict[str, bytes]) -> ImageInputs:
        def open_image(key: str) -> Image.Image:
            try:
                data = inputs[key]
            except KeyError as exc:
                raise InputError("input_missing", f"input image {key} is missing") from exc
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                return image.copy()

        if not request.init_images:
            raise InputError("invalid_request", "img2img needs at least one init image")
        mask = None
        if request.mask:
            mask = binary_mask(open_image(request.mask), round_alpha=request.mask_round)
            if request.inpainting_mask_invert:
                mask = ImageOps.invert(mask)
            blur_x, blur_y = request.mask_blur_x, request.mask_blur_y
            if request.mask_blur is not None:
                blur_x = blur_y = request.mask_blur
            mask = blur_mask(mask, blur_x, blur_y)
        images = [prepare(flatten(open_image(key)), mask, request) for key in request.init_images]
        return cls(images=images, request=request)

    def batch(self, count: int) -> list[PreparedImage]:
        # A1111 cycles through the init images over the batch.
        return [self.images[i % len(self.images)] for i in range(count)]

    def finish(self, outputs: list[Image.Image]) -> list[Image.Image]:
        """Decoded outputs back into the originals: pasted into the crop's place
        (``inpaint_full_res``) and the original kept outside the mask."""
        return [
            _apply_overlay(output, prepared)
            for output, prepared in zip(outputs, self.batch(len(outputs)), strict=True)
        ]


def prepare(image: Image.Image, mask: Image.Image | None, request: Img2ImgRequest) -> PreparedImage:
    width, height, mode = request.width, request.height, request.resize_mode
    if mask is not None and mask.size != image.size:
        mask = mask.resize(image.size, LANCZOS)
    box = mask_box(mask, request.inpaint_full_res_padding) if mask is not None else None
    if mask is None or box is None:  # an empty mask inpaints nothing: plain img2img
        return PreparedImage(_sized(image, mode, width, height), None, None, None)
    if request.inpaint_full_res:
        box = widen_to_aspect(box, width, height, image.width, image.height)
        source = resize_image(image.crop(box), RESIZE_AND_FILL, width, height)
        work_mask = resize_image(mask.crop(box), RESIZE_AND_FILL, width, height)
        overlay = _overlay(image, mask)
        return _filled(source, work_mask, work_mask, overlay, request, box)
    work_mask = resize_image(mask, mode, width, height)
    # Outside the full-res mode, A1111 keeps the original only where the blurred
    # mask is under one half (the overlay's mask is doubled).
    doubled = work_mask.point(lambda v: min(2 * v, 255))
    if mode == LATENT_RESIZE:
        source = _sized(image, mode, width, height)
        source_mask = mask.resize(source.size, LANCZOS)
        overlay = _overlay(image.resize((width, height), LANCZOS), doubled)
        return _filled(source, work_mask, source_mask, overlay, request, None)
    source = resize_image(image, mode, width, height)
    return _filled(source, work_mask, work_mask, _overlay(source, doubled), request, None)


def _filled(
    source: Image.Image,
    mask: Image.Image,
    source_mask: Image.Image,
    overlay: Image.Image,
    request: Img2ImgRequest,
    box: Box | None,
) -> PreparedImage:
    if request.inpainting_fill != ORIGINAL:  # A1111 paints it for the latent modes too
        source = fill_masked(source, source_mask)
    return PreparedImage(source, mask, source_mask, overlay, box)


def _sized(image: Image.Image, mode: int, width: int, height: int) -> Image.Image:
    if mode == LATENT_RESIZE:  # encoded at its own size (the VAE needs multiples of 8)
        size = (max(8, round(image.width / 8) * 8), max(8, round(image.height / 8) * 8))
        return image if image.size == size else image.resize(size, LANCZOS)
    return resize_image(image, mode, width, height)


def _overlay(image: Image.Image, mask: Image.Image) -> Image.Image:
    overlay = image.convert("RGBA")
    overlay.putalpha(ImageOps.invert(mask.convert("L")))
    return overlay


def _apply_overlay(output: Image.Image, prepared: PreparedImage) -> Image.Image:
    if prepared.overlay is None:
        return output
    base = output.convert("RGBA")
    if prepared.paste_box is not None:
        left, top, right, bottom = prepared.paste_box
        base = Image.new("RGBA", prepared.overlay.size)
        patch = resize_image(output, CROP_AND_RESIZE, right - left, bottom - top)
        base.paste(patch.convert("RGBA"), (left, top))
    base.alpha_composite(prepared.overlay)
    return base.convert("RGB")


# --- latents -------------------------------------------------------------------------


def _to_tensor(images: list[Image.Image]) -> torch.Tensor:
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def encode(pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
    """VAE latents of ``pixels`` in [-1, 1] (the posterior's mean: nothing is drawn)."""
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    if upcast:  # SDXL's VAE overflows in fp16, as in diffusers
        vae.to(torch.float32)
    try:
        pixels = pixels.to(device=vae.device, dtype=vae.dtype)
        with torch.inference_mode():
            latents = torch.cat([vae.encode(row[None]).latent_dist.mean for row in pixels])
    finally:
        if upcast:
            vae.to(torch.float16)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    scaled: torch.Tensor = (latents - shift) * vae.config.scaling_factor
    return scaled.to(pipe.unet.dtype)


def latent_mask(mask: Image.Image, size: tuple[int, int], round_it: bool) -> torch.Tensor:
    """The mask at latent ``size`` (h, w), 1 where the sampler regenerates."""
    small = mask.convert("L").resize((size[1], size[0]), Image.Resampling.BILINEAR)
    values = np.asarray(small, dtype=np.float32) / 255.0
    if round_it:
        values = np.around(values)
    return torch.from_numpy(values)[None, None]


def _resized(latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if latents.shape[-2:] == size:
        return latents
    return torch.nn.functional.interpolate(latents, size=size, mode="bilinear")


def initial_latents(
    pipe: Any, inputs: ImageInputs, seeds: list[int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The init latents for the batch, and the 9-channel model's masked-image latents.

    Resize mode 3 resizes the latents; ``inpainting_fill`` 2 and 3 replace them under
    the mask with the seed's unit noise (the draw the sampler's noise starts from too,
    as in A1111) or zeros.
    """
    request = inputs.request
    prepared = inputs.batch(len(seeds))
    size = (request.height // pipe.vae_scale_factor, request.width // pipe.vae_scale_factor)
    pixels = [_to_tensor([p.source]) for p in prepared]
    latents = torch.cat([_resized(encode(pipe, x), size) for x in pixels])
    fill = request.inpainting_fill
    for i, (item, seed) in enumerate(zip(prepared, seeds, strict=True)):
        if item.mask is None or fill not in (LATENT_NOISE, LATENT_NOTHING):
            continue
        under = latent_mask(item.mask, size, request.mask_round).to(latents)
        replacement = torch.zeros_like(latents[i : i + 1])
        if fill == LATENT_NOISE:
            generator = torch.Generator("cpu").manual_seed(seed)
            replacement = torch.randn(replacement.shape, generator=generator).to(latents)
        latents[i : i + 1] = latents[i : i + 1] * (1 - under) + replacement * under
    if pipe.unet.config.in_channels != 9:
        return latents, None
    masked = []
    for item, x in zip(prepared, pixels, strict=True):
        # What the inpainting model sees of the image: 0 (grey) where it regenerates;
        # all of it for img2img without a mask (A1111's full mask).
        keep = torch.zeros(1, 1, *x.shape[-2:])
        if item.source_mask is not None:
            regenerate = np.asarray(item.source_mask, dtype=np.float32) >= 127.5
            keep = torch.from_numpy(~regenerate).float()[None, None]
        masked.append(_resized(encode(pipe, x * keep), size))
    return latents, torch.cat(masked)


INPAINT, IMG2IMG = Variant.INPAINT, Variant.IMG2IMG


def call_options(
    pipe: Any, inputs: ImageInputs, seeds: list[int], *, latents: bool = True
) -> tuple[Variant, dict[str, Any]]:
    """The pipeline variant to run and its image arguments.

    With ``latents`` the init image goes in as latents prepared here (resize mode 3,
    latent fills, the inpainting model's conditioning); without (ControlNet pipelines
    mix the image with the pixel mask) as pixels, where those three fall back to a
    plain resize and *fill* content (listed by :func:`warnings`).
    """
    request = inputs.request
    strength = request.strength
    prepared = inputs.batch(len(seeds))
    size = {"width": request.width, "height": request.height}
    masks = [p.mask for p in prepared]
    nine = pipe.unet.config.in_channels == 9
    if not latents:
        images = [p.source.resize((request.width, request.height), LANCZOS) for p in prepared]
        if masks[0] is None:
            return IMG2IMG, {"image": images, "strength": strength}
        return INPAINT, {"image": images, "mask_image": masks, "strength": strength} | size
    init, masked = initial_latents(pipe, inputs, seeds)
    options: dict[str, Any] = {"image": init, "strength": strength}
    if masks[0] is None and not nine:
        return IMG2IMG, options
    white = Image.new("L", (request.width, request.height), 255)
    return INPAINT, options | size | {
        "mask_image": [m if m is not None else white for m in masks],
        # Unused by 4-channel models, but keeps diffusers from mixing latents and pixels.
        "masked_image_latents": masked if masked is not None else init,
    }


def scale_initial_noise(pipe: Any, scheduler: Any, multiplier: float) -> None:
    """``initial_noise_multiplier``: the next ``prepare_latents`` of ``pipe`` starts from
    noise × ``multiplier``. One shot, and bound to ``scheduler`` (built per job), so it
    cannot reach another call even if this one fails before preparing latents."""
    original: Callable[..., Any] = type(pipe).prepare_latents.__get__(pipe)
    signature = inspect.signature(original)

    def hooked(*args: Any, **kwargs: Any) -> Any:
        pipe.__dict__.pop("prepare_latents", None)
        out = original(*args, **kwargs)
        if pipe.scheduler is not scheduler:
            return out
        bound = signature.bind(*args, **kwargs).arguments
        latents = out[0] if isinstance(out, tuple) else out
        init = bound.get("image")
        timestep = bound.get("timestep")
        if bound.get("is_strength_max", False) or init is None or init.shape[1] != 4:
            base = torch.zeros_like(latents)
        else:  # add_noise is linear: the image's share, then the noise's share scaled
            init = init.to(latents).repeat(latents.shape[0] // init.shape[0], 1, 1, 1)
            base = scheduler.add_noise(init, torch.zeros_like(init), timestep)
        latents = base + multiplier * (latents - base)
        return (latents, *out[1:]) if isinstance(out, tuple) else latents

    pipe.prepare_latents = hooked
