"""Client request bodies: the seed's ``Txt2ImgRequest`` / ``Img2ImgRequest`` /
``ExtraImagesRequest``, field for field, typed the way AUTOMATIC1111 types them.

The seed typed ``eta``, ``s_*``, ``hr_scale`` and ``initial_noise_multiplier`` as integers
and rejected real clients sending ``0.5``; here they are floats. Unknown fields are
ignored (msgspec's default), so a newer A1111 client never gets a 4xx for a field we
do not know yet. Only structural rules live here (types, signs, multiples of 8);
operator-configurable limits (max pixels, steps, batch) are checked by the gateway.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Self

import msgspec
from msgspec import Meta, Struct

from proto.enums import ModelType

PositiveInt = Annotated[int, Meta(ge=1)]
NonNegInt = Annotated[int, Meta(ge=0)]
NonNegFloat = Annotated[float, Meta(ge=0)]
UnitFloat = Annotated[float, Meta(ge=0, le=1)]
Scale = Annotated[float, Meta(ge=0, le=100)]
"""Guidance scales: A1111's UI stops at 30; beyond 100 is no image anyone wants."""
SamplerFloat = Annotated[float, Meta(ge=0, le=1000)]
"""Sampler tuning knobs (``s_churn`` …): bounded so no value is absurd."""
# Latents are 1/8 of the image: A1111 and diffusers both need multiples of 8.
Dimension = Annotated[int, Meta(ge=8, multiple_of=8)]
# -1 means "pick one at random" (A1111).
Seed = Annotated[int, Meta(ge=-1, le=2**32 - 1)]
ModelName = Annotated[str, Meta(min_length=1, max_length=512)]


WEBHOOK_EVENTS = ("started", "progress", "completed")


class Webhook(Struct, kw_only=True, frozen=True):
    """sdswarm extension: where to POST a task's events, signed (Standard Webhooks)."""

    url: Annotated[str, Meta(min_length=1, max_length=2048)]
    events: list[Literal["started", "progress", "completed"]] = msgspec.field(
        default_factory=lambda: ["completed"]
    )
    """``completed`` covers succeeded, failed and cancelled."""


class _Processing(Struct, kw_only=True, frozen=True, omit_defaults=True):
    """Fields common to txt2img and img2img (A1111 ``StableDiffusionProcessing``)."""

    stable_diffusion_model: ModelName
    """Checkpoint name as registered (seed extension); picks the worker pool."""
    sd_vae: str | None = None
    """Seed extension: VAE name, copied into ``override_settings.sd_vae``."""
    save_dir: str | None = None
    """Seed extension, accepted for compatibility; outputs always go under ``images/{user}/``."""
    webhook: Webhook | None = None
    """sdswarm extension: callbacks for this task's events."""

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = []
    seed: Seed = -1
    subseed: Seed = -1
    subseed_strength: UnitFloat = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    """A1111 sampler name (``Euler a``, ``DPM++ 2M`` …); falls back to ``sampler_index``."""
    sampler_index: str = "Euler"
    """Legacy A1111 field, read when ``sampler_name`` is absent."""
    scheduler: str | None = None
    """A1111 >= 1.9 schedule type (``Automatic``, ``Karras``, ``Exponential`` …)."""
    batch_size: PositiveInt = 1
    n_iter: PositiveInt = 1
    steps: PositiveInt = 20
    cfg_scale: Scale = 7.0
    width: Dimension = 512
    height: Dimension = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: UnitFloat | None = None
    denoising_strength: UnitFloat | None = None
    s_min_uncond: SamplerFloat | None = None
    s_churn: SamplerFloat | None = None
    s_tmax: SamplerFloat | None = None
    s_tmin: SamplerFloat | None = None
    s_noise: SamplerFloat | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: UnitFloat | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list[Any] = []
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = {}
    force_task_id: str | None = None
    infotext: str | None = None

    @property
    def effective_sampler(self) -> str:
        return self.sampler_name or self.sampler_index

    def with_firstphase(self) -> Self:
        """Legacy fields in today's terms (only txt2img has any)."""
        return self


class Txt2ImgRequest(_Processing, kw_only=True, frozen=True, omit_defaults=True):
    enable_hr: bool = False
    firstphase_width: Annotated[int, Meta(ge=0, multiple_of=8)] = 0
    """Legacy hires fix (A1111 < 1.0): the first pass's size; see :meth:`with_firstphase`."""
    firstphase_height: Annotated[int, Meta(ge=0, multiple_of=8)] = 0
    hr_scale: Annotated[float, Meta(ge=0, le=8)] = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: NonNegInt = 0
    hr_resize_x: NonNegInt = 0
    hr_resize_y: NonNegInt = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    firstpass_image: str | None = None

    @property
    def hires_strength(self) -> float:
        """The hires pass's denoising strength (A1111's default 0.7)."""
        return 0.7 if self.denoising_strength is None else self.denoising_strength

    def with_firstphase(self) -> Self:
        """The legacy ``firstphase_width/height`` in today's fields, as A1111 maps them:
        the first pass at the first-phase size, the hires pass to ``width`` × ``height``."""
        if not self.enable_hr or not (self.firstphase_width or self.firstphase_height):
            return self
        return msgspec.structs.replace(
            self,
            width=self.firstphase_width or self.width,
            height=self.firstphase_height or self.height,
            hr_resize_x=self.width,
            hr_resize_y=self.height,
            firstphase_width=0,
            firstphase_height=0,
        )

    def hr_size(self) -> tuple[int, int]:
        """The hires-fix pass's size: ``hr_resize_x/y`` (one of them keeps the aspect
        ratio), else ``hr_scale`` × the first pass; multiples of 8 as A1111 makes them."""
        x, y = self.hr_resize_x, self.hr_resize_y
        if x and not y:
            y = round(x * self.height / self.width)
        elif y and not x:
            x = round(y * self.width / self.height)
        elif not x and not y:
            x, y = round(self.width * self.hr_scale), round(self.height * self.hr_scale)
        return max(8, x // 8 * 8), max(8, y // 8 * 8)


LATENT_UPSCALE_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
"""A1111's latent upscalers for hires fix: ``torch`` interpolation mode, antialias."""
HIRES_IMAGE_UPSCALERS = ("None", "Lanczos", "Nearest")


class Img2ImgRequest(_Processing, kw_only=True, frozen=True, omit_defaults=True):
    init_images: list[str] = []
    """Base64 images or object keys of earlier uploads."""
    resize_mode: Annotated[int, Meta(ge=0, le=3)] = 0
    image_cfg_scale: Scale | None = None
    mask: str | None = None
    mask_blur: NonNegInt | None = None
    mask_blur_x: NonNegInt = 4
    mask_blur_y: NonNegInt = 4
    mask_round: bool = True
    inpainting_fill: Annotated[int, Meta(ge=0, le=3)] = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: NonNegInt = 0
    inpainting_mask_invert: Annotated[int, Meta(ge=0, le=1)] = 0
    initial_noise_multiplier: Annotated[float, Meta(ge=0, le=10)] | None = None
    latent_mask: str | None = None
    include_init_images: bool = False

    @property
    def strength(self) -> float:
        """The denoising strength (A1111's default 0.75)."""
        return 0.75 if self.denoising_strength is None else self.denoising_strength


BUILTIN_UPSCALERS = ("None", "Lanczos", "Nearest")
"""A1111's upscalers that need no weights. ``None`` as ``upscaler_1`` leaves the image as
it is (A1111 >= 1.6); the latent modes exist only for hires fix, not here."""


def _floor8(value: float) -> int:
    # A1111's Upscaler.upscale floors the target to multiples of 8 (never below 8 here).
    return max(int(round(value, 6)) // 8 * 8, 8)


CODEFORMER_REFUSAL = (
    "CodeFormer is not supported: its code and weights are under the S-Lab licence, which"
    " forbids commercial use; use a GFPGAN restorer"
)
MISSING_RESTORER = (
    "needs a face-restoration model and none is registered: register a GFPGAN file"
    " (GFPGANv1.4 or another GFPGAN v1 'clean' or RestoreFormer network; .safetensors, or"
    " .pth with SDSWARM_ALLOW_PICKLE) as type `faceRestorer` (POST /models, or the models"
    " folder's GFPGAN/)"
)


class Refusal(Struct, frozen=True):
    """Why a request cannot be served: the field, a stable code, the message."""

    field: str
    code: str
    message: str


class ExtrasOptions(Struct, kw_only=True, frozen=True, omit_defaults=True):
    """A1111's extras (postprocessing) parameters, without the images.

    This is what an extras task carries on the bus; its images travel as object keys
    (``GenerateImage.input_keys``), one output per input, in order.
    """

    resize_mode: Annotated[int, Meta(ge=0, le=1)] = 0
    """0: scale by ``upscaling_resize``; 1: scale to ``upscaling_resize_w`` × ``_h``."""
    show_extras_results: bool = True
    gfpgan_visibility: UnitFloat = 0.0
    """> 0: faces restored by the registered face restorer (``faceRestorer``), blended over
    the image with this weight; 422 when none is registered."""
    codeformer_visibility: UnitFloat = 0.0
    """CodeFormer is not supported (its licence is non-commercial): > 0 is refused (422)."""
    codeformer_weight: UnitFloat = 0.0
    """CodeFormer's fidelity weight; accepted, meaningful only with CodeFormer."""
    upscaling_resize: Annotated[float, Meta(ge=0, le=8)] = 2.0
    """Factor for ``resize_mode`` 0; below 1 counts as 1 (A1111)."""
    upscaling_resize_w: Annotated[int, Meta(ge=1, le=16384)] = 512
    upscaling_resize_h: Annotated[int, Meta(ge=1, le=16384)] = 512
    upscaling_crop: bool = True
    """With ``resize_mode`` 1: centre-crop to exactly ``_w`` × ``_h`` (else keep the aspect)."""
    upscaler_1: str = "None"
    """A built-in (``None``, ``Lanczos``, ``Nearest``) or a registered ``upscaler`` model."""
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: UnitFloat = 0.0
    """Blend weight of ``upscaler_2``'s result over ``upscaler_1``'s (``Image.blend``)."""
    upscale_first: bool = False
    """Upscale, then restore faces (A1111's order is the other way round by default)."""

    def upscale_size(self, width: int, height: int) -> tuple[int, int]:
        """The size both upscalers resize a ``width`` × ``height`` image to.

        As A1111: by factor (at least 1) or by the larger of the two ratios to the target
        box, floored to multiples of 8. One deviation: when cropping to the box, the size
        is rounded up to cover it, where A1111's flooring left black bands after the crop.
        """
        if self.resize_mode == 0:
            scale = max(self.upscaling_resize, 1.0)
            return _floor8(width * scale), _floor8(height * scale)
        scale = max(self.upscaling_resize_w / width, self.upscaling_resize_h / height)
        if self.upscaling_crop:
            return (
                max(math.ceil(round(width * scale, 6)), self.upscaling_resize_w),
                max(math.ceil(round(height * scale, 6)), self.upscaling_resize_h),
            )
        return _floor8(width * scale), _floor8(height * scale)

    def face_refusal(self, has_restorer: bool) -> Refusal | None:
        """The face-restoration rule, checked by the gateway (before anything is queued)
        and again by the worker: CodeFormer is refused; GFPGAN needs a restorer."""
        if self.codeformer_visibility > 0:
            field = "codeformer_visibility"
            return Refusal(field, "unsupported", f"`{field}` > 0: {CODEFORMER_REFUSAL}")
        if self.gfpgan_visibility > 0 and not has_restorer:
            field = "gfpgan_visibility"
            return Refusal(field, "face_restorer_missing", f"`{field}` {MISSING_RESTORER}")
        return None

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """The size of the result for a ``width`` × ``height`` input."""
        if self.upscaler_1 == "None":
            return width, height
        if self.resize_mode == 1 and self.upscaling_crop:
            return self.upscaling_resize_w, self.upscaling_resize_h
        return self.upscale_size(width, height)


class ExtraImagesRequest(ExtrasOptions, kw_only=True, frozen=True, omit_defaults=True):
    """The seed's ``/extra_images`` body (A1111 ``extra-single-image``)."""

    image: str
    """Base64 (``data:`` prefix optional) or an object key of the caller's."""
    stable_diffusion_model: str | None = None
    """Seed field that only routed the request to a function; extras need no checkpoint,
    so it is accepted and ignored."""
    webhook: Webhook | None = None
    """sdswarm extension: callbacks for this task's events."""


class ExtraBatchImage(Struct, kw_only=True, frozen=True):
    """One entry of A1111's ``imageList``."""

    data: str
    name: str = ""


class ExtraBatchImagesRequest(ExtrasOptions, kw_only=True, frozen=True, omit_defaults=True):
    """A1111 ``extra-batch-images``: the same parameters for every image of the list."""

    imageList: list[ExtraBatchImage]


def extras_options(request: ExtrasOptions) -> ExtrasOptions:
    """Only the parameters (no images, no routing) of an extras request."""
    fields = {name: getattr(request, name) for name in ExtrasOptions.__struct_fields__}
    return ExtrasOptions(**fields)


def to_builtins(request: Struct) -> dict[str, Any]:
    """Every field of the request, defaults included, as plain JSON data.

    This is A1111's ``parameters``: clients read defaults back from it, so
    ``omit_defaults`` (right for the bus) must not apply here.
    """
    fields = {name: getattr(request, name) for name in request.__struct_fields__}
    out = msgspec.to_builtins(fields)
    assert isinstance(out, dict)
    return out


class WarmModelRequest(Struct, kw_only=True, frozen=True, omit_defaults=True):
    """``POST /models/{name}/warm``: keep a worker of the checkpoint loaded ahead of
    traffic (an empty body takes the defaults)."""

    seconds: Annotated[float, Meta(gt=0, le=7 * 86400)] = 600.0
    """How long at least one worker is kept, counted from now (then the idle timeout
    applies as usual); a later call replaces the deadline."""


class BatchUpdateSdResourceRequest(Struct, kw_only=True, frozen=True, omit_defaults=True):
    """The seed's ``POST /batch_update_sd_resource``: settings of checkpoints' worker pools.

    Every field is optional; only the given ones change. ``minInstances``,
    ``maxInstances`` and ``idleTimeout`` drive the scheduler; the rest are recorded and
    applied by backends that can express them (the response lists what was not).
    """

    models: list[str] = []
    """Checkpoint names; empty means every registered checkpoint."""
    image: str | None = None
    cpu: Annotated[float, Meta(ge=0, le=1024)] | None = None
    memorySize: Annotated[int, Meta(ge=0, le=2**31)] | None = None
    gpuMemorySize: Annotated[int, Meta(ge=0, le=2**31)] | None = None
    instanceType: str | None = None
    timeout: Annotated[int, Meta(ge=0, le=7 * 86400)] | None = None
    extraArgs: str | None = None
    env: dict[str, str] | None = None
    vpcConfig: dict[str, Any] | None = None
    nasConfig: dict[str, Any] | None = None
    mountPoints: list[Any] | None = None
    ossMountConfig: dict[str, Any] | None = None
    minInstances: Annotated[int, Meta(ge=0, le=10_000)] | None = None
    maxInstances: Annotated[int, Meta(ge=1, le=10_000)] | None = None
    idleTimeout: Annotated[float, Meta(ge=0, le=30 * 86400)] | None = None
    """Seconds without work before the pool scales to zero."""
    maxBatch: Annotated[int, Meta(ge=1, le=64)] | None = None
    """Tasks one worker takes at once (compatible ones share one diffusers call); the
    scheduler's ``SDSWARM_MAX_BATCH`` when unset."""


class DeleteFunctionsRequest(Struct, kw_only=True, frozen=True):
    """The seed's ``POST /del/sd/functions``."""

    functions: list[str]


class RegisterModelRequest(Struct, kw_only=True, frozen=True, omit_defaults=True):
    """The seed's ``ModelAttributes`` as ``POST /models`` and ``PUT /models/{name}`` take it.

    ``ossPath`` is an object-store key the file is copied from; ``etag`` (optional) is
    checked against the copy: the store's ETag, the file's MD5 or its SHA-256. The
    output-only fields (``status``, ``registeredTime`` …) are ignored.
    """

    type: ModelType = ModelType.STABLE_DIFFUSION
    name: str = ""
    ossPath: str
    etag: str = ""
