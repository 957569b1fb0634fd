"""The AUTOMATIC1111 presentation of a generation: infotext, ``info``, warnings.

What a client of the A1111 API reads back about a task — the parameters line stored in
each PNG, the ``info`` JSON, the warnings for parameters accepted but not honoured, the
postprocessing line of extras — and the request options they are derived from. Pure
functions of the request and the model's name and hash: no torch, no diffusers, so they
are tested (and could be served) without a GPU stack; ``"torch" not in sys.modules``
after importing this module is a test.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from proto.commands import AdapterRef
from proto.controlnet import ControlUnit
from proto.requests import ExtrasOptions, Img2ImgRequest, Txt2ImgRequest
from proto.samplers import split_sampler
from services.inference.batching import CLIP_SKIP_OPTION, ENSD_OPTION

VERSION = "sdswarm"
"""A1111's ``Version`` entry."""

Request = Txt2ImgRequest | Img2ImgRequest

JUST_RESIZE, CROP_AND_RESIZE, RESIZE_AND_FILL, LATENT_RESIZE = 0, 1, 2, 3
FILL, ORIGINAL, LATENT_NOISE, LATENT_NOTHING = 0, 1, 2, 3
RESIZE_MODE_NAMES = {
    JUST_RESIZE: "Just resize",
    CROP_AND_RESIZE: "Crop and resize",
    RESIZE_AND_FILL: "Resize and fill",
    LATENT_RESIZE: "Just resize (latent upscale)",
}
MASKED_CONTENT = {FILL: "fill", ORIGINAL: "original", LATENT_NOISE: "latent noise"}
MASKED_CONTENT[LATENT_NOTHING] = "latent nothing"


def clip_skip(request: Request) -> int:
    """A1111's ``CLIP_stop_at_last_layers`` (1 = last layer) as diffusers' ``clip_skip``."""
    value = (request.override_settings or {}).get(CLIP_SKIP_OPTION, 1)
    return max(int(value) - 1, 0) if isinstance(value, int | float) else 0


PREVIEW_OPTION = "show_progress_every_n_steps"


def preview_every(request: Request) -> int | None:
    """A1111's ``show_progress_every_n_steps`` option, when the request sets it."""
    value = (request.override_settings or {}).get(PREVIEW_OPTION)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def noise_seed_delta(request: Request) -> int:
    """A1111's ``eta_noise_seed_delta`` option (ENSD): the samplers' noise seed offset."""
    value = (request.override_settings or {}).get(ENSD_OPTION, 0)
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def churn(request: Request) -> dict[str, float] | None:
    """The request's stochastic churn (``s_churn`` …), or None when it has none."""
    return churn_options(request.s_churn, request.s_tmin, request.s_tmax, request.s_noise)


def churn_options(
    s_churn: float | None, s_tmin: float | None, s_tmax: float | None, s_noise: float | None
) -> dict[str, float] | None:
    """k-diffusion's stochastic churn for Euler as diffusers' ``step`` takes it, or None
    when it changes nothing (A1111's defaults: churn 0, tmax 0 meaning infinity)."""
    if not s_churn:
        return None
    return {
        "s_churn": s_churn,
        "s_tmin": s_tmin or 0.0,
        "s_tmax": s_tmax or math.inf,
        "s_noise": 1.0 if s_noise is None else s_noise,
    }


ANCESTRAL_SAMPLERS = frozenset({"Euler a", "DPM2 a", "DPM++ 2S a"})
"""A1111 applies ``eta`` as their noise multiplier; their diffusers schedulers have none."""


def warnings(request: Request, *, restored: bool = False) -> list[str]:
    """Parameters accepted but not honoured for this request (sdswarm extension)."""
    out = []
    sampler, _ = split_sampler(request.effective_sampler, request.scheduler)
    if churn(request) is not None and sampler != "Euler":
        out.append(f"s_churn applies to Euler only here, not to {sampler}")
    if sampler in ANCESTRAL_SAMPLERS and request.eta is not None and request.eta != 1:
        out.append(f"eta {request.eta:g} is not applied: diffusers' {sampler} uses 1")
    if request.s_min_uncond:
        out.append("s_min_uncond is not applied: the negative prompt runs at every step")
    if request.restore_faces and not restored:  # a command queued before restorers existed
        out.append("restore_faces: no face-restoration model is available")
    if isinstance(request, Img2ImgRequest) and noise_seed_delta(request):
        out.append(
            "eta_noise_seed_delta is not applied to img2img: diffusers draws its noise"
            " from the seed"
        )
    scripts = {name.lower() for name in request.alwayson_scripts}
    out += [
        f"alwayson_scripts.{name} is not run: sdswarm runs ControlNet only"
        for name in request.alwayson_scripts
        if name.lower() != "controlnet"
    ]
    if request.script_name and request.script_name.strip().lower() != "none":
        out.append(f"script_name {request.script_name!r} is not run: sdswarm runs no scripts")
    if isinstance(request, Img2ImgRequest):
        out += img2img_warnings(request, controlnet="controlnet" in scripts)
    return out


def img2img_warnings(request: Img2ImgRequest, *, controlnet: bool) -> list[str]:
    """img2img parameters accepted but not (fully) honoured for this request."""
    out = []
    if request.mask and not request.mask_round:
        out.append("mask_round: diffusers rounds the sampler's mask at one half regardless")
    if controlnet and request.resize_mode == LATENT_RESIZE:
        out.append("resize_mode 3 with ControlNet: the image is resized in pixels")
    if controlnet and request.mask and request.inpainting_fill in (LATENT_NOISE, LATENT_NOTHING):
        out.append("inpainting_fill 2/3 with ControlNet: the masked area starts as with 0 (fill)")
    multiplier = request.initial_noise_multiplier
    if controlnet and multiplier is not None and multiplier != 1:
        out.append("initial_noise_multiplier is not applied with ControlNet")
    return out


def infotext(
    request: Request,
    seed: int,
    model_name: str,
    model_hash: str,
    loras: list[AdapterRef] | None = None,
    vae: AdapterRef | None = None,
    embeddings: list[AdapterRef] | None = None,
    controlnets: list[ControlUnit] | None = None,
    *,
    subseed: int | None = None,
    face_restoration: str | None = None,
) -> str:
    """A1111's human-readable generation parameters (also stored in each PNG)."""
    sampler, schedule = split_sampler(request.effective_sampler, request.scheduler)
    parts = [
        f"Steps: {request.steps}",
        f"Sampler: {sampler}",
        f"Schedule type: {schedule}",
        f"CFG scale: {request.cfg_scale:g}",
        f"Seed: {seed}",
        *(
            [f"Variation seed: {subseed}", f"Variation seed strength: {request.subseed_strength:g}"]
            if request.subseed_strength > 0 and subseed is not None
            else []
        ),
        *(
            [f"Seed resize from: {request.seed_resize_from_w}x{request.seed_resize_from_h}"]
            if request.seed_resize_from_w > 0 and request.seed_resize_from_h > 0
            else []
        ),
        *([f"Face restoration: {face_restoration}"] if face_restoration else []),  # A1111's place
        f"Size: {request.width}x{request.height}",
        *(
            [f"Denoising strength: {request.denoising_strength:g}"]
            if isinstance(request, Img2ImgRequest) and request.denoising_strength is not None
            else []
        ),
        *hires_infotext(request),
        *img2img_infotext(request),
        f"Model hash: {model_hash}",
        *([f"Clip skip: {clip_skip(request) + 1}"] if clip_skip(request) else []),
        *(["Tiling: True"] if request.tiling else []),
        f"Model: {Path(model_name).stem}",
        *([f"ENSD: {noise_seed_delta(request)}"] if noise_seed_delta(request) else []),
        *([f"VAE hash: {vae.sha256[:10]}", f"VAE: {vae.name}"] if vae else []),
        *(
            [f'TI hashes: "{", ".join(f"{e.name}: {e.sha256[:12]}" for e in embeddings)}"']
            if embeddings
            else []
        ),
        *(
            [f'Lora hashes: "{", ".join(f"{r.name}: {r.sha256[:12]}" for r in loras)}"']
            if loras
            else []
        ),
        *(f'ControlNet {i}: "{unit.infotext()}"' for i, unit in enumerate(controlnets or [])),
        f"Version: {VERSION}",
    ]
    text = request.prompt
    if request.negative_prompt:
        text += f"\nNegative prompt: {request.negative_prompt}"
    return f"{text}\n{', '.join(parts)}"


def hires_infotext(request: Request) -> list[str]:
    if not isinstance(request, Txt2ImgRequest) or not request.enable_hr:
        return []
    width, height = request.hr_size()
    resized = request.hr_resize_x or request.hr_resize_y
    return [
        f"Denoising strength: {request.hires_strength:g}",
        f"Hires resize: {width}x{height}" if resized else f"Hires upscale: {request.hr_scale:g}",
        *([f"Hires steps: {request.hr_second_pass_steps}"] if request.hr_second_pass_steps else []),
        f"Hires upscaler: {request.hr_upscaler or 'Latent'}",
    ]


def img2img_infotext(request: Request) -> list[str]:
    """A1111's img2img entries: resize mode, and for inpainting the mask settings."""
    if not isinstance(request, Img2ImgRequest):
        return []
    parts = []
    if request.resize_mode:
        parts.append(f"Resize mode: {RESIZE_MODE_NAMES[request.resize_mode]}")
    if request.initial_noise_multiplier not in (None, 1):
        parts.append(f"Noise multiplier: {request.initial_noise_multiplier:g}")
    if not request.mask:
        return parts
    blur = request.mask_blur if request.mask_blur is not None else request.mask_blur_x
    parts += [
        f"Mask blur: {blur}",
        f"Masked content: {MASKED_CONTENT[request.inpainting_fill]}",
        *(["Mask mode: Inpaint not masked"] if request.inpainting_mask_invert else []),
    ]
    if request.inpaint_full_res:
        padding = request.inpaint_full_res_padding
        parts += ["Inpaint area: Only masked", f"Masked area padding: {padding}"]
    return parts


def info(
    request: Request,
    seeds: list[int],
    texts: list[str],
    subseeds: list[int],
    *,
    model_name: str,
    model_hash: str,
    restored: bool = False,
) -> dict[str, Any]:
    """A1111's ``info`` object of a generation (returned as a JSON string)."""
    sampler, schedule = split_sampler(request.effective_sampler, request.scheduler)
    return {
        "prompt": request.prompt,
        "all_prompts": [request.prompt] * len(seeds),
        "negative_prompt": request.negative_prompt,
        "all_negative_prompts": [request.negative_prompt] * len(seeds),
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": subseeds[0],
        "all_subseeds": subseeds,
        "subseed_strength": request.subseed_strength,
        "width": request.width,
        "height": request.height,
        "sampler_name": sampler,
        "scheduler": schedule,
        "cfg_scale": request.cfg_scale,
        "steps": request.steps,
        "batch_size": request.batch_size,
        "n_iter": request.n_iter,
        "restore_faces": restored,
        "sd_model_name": Path(model_name).stem,
        "sd_model_hash": model_hash,
        "seed_resize_from_w": request.seed_resize_from_w,
        "seed_resize_from_h": request.seed_resize_from_h,
        "denoising_strength": request.denoising_strength,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "warnings": warnings(request, restored=restored),
        "infotexts": texts,
        "styles": request.styles,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "version": VERSION,
    }


def info_json(info: dict[str, Any]) -> str:
    return json.dumps(info, ensure_ascii=False)


def extras_infotext(options: ExtrasOptions) -> str:
    """A1111's postprocessing parameters line."""
    parts = (
        [f"GFPGAN visibility: {options.gfpgan_visibility:g}"] if options.gfpgan_visibility else []
    )
    if options.upscaler_1 == "None":
        return ", ".join(parts)
    parts.append(
        f"Postprocess upscale by: {max(options.upscaling_resize, 1.0):g}"
        if options.resize_mode == 0
        else f"Postprocess upscale to: {options.upscaling_resize_w}x{options.upscaling_resize_h}"
    )
    if options.resize_mode == 1 and options.upscaling_crop:
        parts.append(
            f"Postprocess crop to: {options.upscaling_resize_w}x{options.upscaling_resize_h}"
        )
    parts.append(f"Postprocess upscaler: {options.upscaler_1}")
    if second_upscaler(options):
        parts.append(f"Postprocess upscaler 2: {options.upscaler_2}")
        parts.append(f"Postprocess upscaler 2 visibility: {options.extras_upscaler_2_visibility:g}")
    return ", ".join(parts)


def second_upscaler(options: ExtrasOptions) -> bool:
    return options.upscaler_2 != "None" and options.extras_upscaler_2_visibility > 0
