"""Request validation at the edge: decode into the proto Struct, then apply the limits.

Structural rules (types, multiples of 8, ranges) are in the Structs; the limits an
operator configures are here. Errors name the field and the rule, e.g. ``steps must be
at most 150 but is 500``.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from proto.requests import Img2ImgRequest, Txt2ImgRequest
from proto.samplers import split_sampler
from services.gateway.bounds import check_free_form
from services.gateway.errors import ApiError, invalid_body
from services.gateway.resources import SETTINGS
from services.gateway.settings import GatewaySettings

T = TypeVar("T", bound=msgspec.Struct)


TOO_DEEP = "request body is nested too deeply"


def bounded_int(text: str, field: str, low: int, high: int) -> int:
    """An integer from a query, header or path, where every one is parsed.

    ASCII digits only (``str.isdigit`` also takes ``²`` and ``٣``, which ``int`` then
    refuses or reads), no more digits than ``high`` has (``int`` refuses 4300+ digits),
    within ``[low, high]``; anything else is a 422 naming ``field`` and the rule.
    """
    if not (text.isascii() and text.isdigit() and len(text) <= len(str(high))) or not (
        low <= int(text) <= high
    ):
        raise ApiError(
            422,
            "invalid_field",
            f"`{field}` must be an integer from {low} to {high} in ASCII digits",
            field=field,
        )
    return int(text)


async def read_body(request: web.Request) -> bytes:
    """The request body, received within ``body_read_timeout_s`` (else 408): a client
    trickling a large body cannot hold the gateway's memory for long. Read once; later
    reads return the same bytes at once."""
    timeout = request.app[SETTINGS].body_read_timeout_s
    try:
        return await asyncio.wait_for(request.read(), timeout)
    except TimeoutError as exc:
        raise ApiError(
            408,
            "body_timeout",
            f"the request body was not received within {timeout:g} s (SDSWARM_BODY_READ_TIMEOUT_S)",
        ) from exc


def decode(body: bytes, cls: type[T]) -> T:
    try:
        decoded = msgspec.json.decode(body, type=cls)
    except msgspec.DecodeError as exc:
        raise invalid_body(exc) from exc
    except RecursionError as exc:
        raise ApiError(400, "invalid_json", TOO_DEEP) from exc
    check_keys(msgspec.to_builtins(decoded), "")
    return decoded


async def read_json(request: web.Request) -> Any:
    """The body as plain JSON data (UTF-8, no NaN or Infinity); 400 ``invalid_json`` if
    it is not JSON, 422 if a key could act as a MongoDB operator."""
    try:
        data = msgspec.json.decode(await read_body(request))
    except msgspec.DecodeError as exc:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise ApiError(400, "invalid_json", TOO_DEEP) from exc
    check_keys(data, "")
    return data


def check_keys(value: Any, path: str) -> None:
    """Refuse object keys that MongoDB would read as operators or paths (``$…``, dots,
    NUL): client data is stored, never used as a query, and must stay that way. Integers
    must fit in the 64 bits MongoDB stores."""
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if not isinstance(key, str) or key.startswith("$") or "." in key or "\0" in key:
                raise ApiError(
                    422,
                    "invalid_field",
                    f"`{where}`: keys may not start with `$` or contain `.` or NUL",
                    field=path or str(key),
                )
            check_keys(item, where)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_keys(item, f"{path}[{index}]")
    elif isinstance(value, int) and not -(2**63) <= value < 2**63:
        raise ApiError(
            422, "invalid_field", f"`{path}`: integers must fit in 64 bits", field=path or None
        )


def _at_most(field: str, value: int | float, limit: int | float, rule: str = "") -> None:
    if value > limit:
        raise ApiError(
            422,
            "limit_exceeded",
            f"`{field}` must be at most {limit}{rule} but is {value}",
            field=field,
        )


def check_limits(request: Txt2ImgRequest | Img2ImgRequest, settings: GatewaySettings) -> None:
    check_free_form(request, settings)
    _at_most("width", request.width, settings.max_width)
    _at_most("height", request.height, settings.max_height)
    _at_most(
        "width",
        request.width * request.height,
        settings.max_pixels,
        " pixels (width × height)",
    )
    _at_most("steps", request.steps, settings.max_steps)
    _at_most("batch_size", request.batch_size, settings.max_batch_size)
    _at_most("n_iter", request.n_iter, settings.max_n_iter)
    _at_most(
        "n_iter",
        request.batch_size * request.n_iter,
        settings.max_images,
        " images (batch_size × n_iter)",
    )
    _at_most("prompt", len(request.prompt), settings.max_prompt_chars, " characters")
    _at_most(
        "negative_prompt", len(request.negative_prompt), settings.max_prompt_chars, " characters"
    )
    skip = (request.override_settings or {}).get("CLIP_stop_at_last_layers")
    if skip is not None and (
        not isinstance(skip, int) or isinstance(skip, bool) or not 1 <= skip <= 12
    ):
        raise ApiError(
            422,
            "invalid_field",
            f"`override_settings.CLIP_stop_at_last_layers` must be an integer from 1 to 12"
            f" but is {skip!r}",
            field="override_settings.CLIP_stop_at_last_layers",
        )
    _check_noise(request, settings)
    _check_unsupported(request)
    if isinstance(request, Txt2ImgRequest) and request.enable_hr:
        _check_hires(request, settings)
        _runs_a_step(
            "hr_second_pass_steps",
            request.hr_second_pass_steps or request.steps,
            request.hires_strength,
        )
    if isinstance(request, Img2ImgRequest):
        _runs_a_step("steps", request.steps, request.strength)
    field = "sampler_name" if request.sampler_name else "sampler_index"
    try:
        split_sampler(request.effective_sampler, request.scheduler)
    except ValueError as exc:
        if "scheduler" in str(exc).split(";")[0]:
            field = "scheduler"
        raise ApiError(422, "invalid_field", str(exc), field=field) from exc


NO_REFINER = frozenset({"", "None"})
SAME_CHECKPOINT = frozenset({"", "Use same checkpoint"})


def _check_unsupported(request: Txt2ImgRequest | Img2ImgRequest) -> None:
    """A1111 options sdswarm cannot honour: refused rather than silently dropped."""
    refused: tuple[str, str] | None = None
    if (request.refiner_checkpoint or "").strip() not in NO_REFINER:
        refused = ("refiner_checkpoint", "a refiner switches checkpoints mid-sampling")
    elif (
        isinstance(request, Txt2ImgRequest)
        and (request.hr_checkpoint_name or "").strip() not in SAME_CHECKPOINT
        and request.hr_checkpoint_name != request.stable_diffusion_model
    ):
        refused = ("hr_checkpoint_name", "the hires pass runs on another checkpoint")
    if refused is not None:
        field, what = refused
        raise ApiError(
            422,
            "unsupported",
            f"`{field}`: {what}, which sdswarm does not do yet (one worker holds one"
            ' checkpoint); leave it empty or "None"',
            field=field,
        )


def _runs_a_step(field: str, steps: int, strength: float) -> None:
    """Denoising from an image runs ``int(steps × denoising_strength)`` steps (A1111,
    diffusers): none at all is refused rather than failing on the worker."""
    if int(steps * strength) < 1:
        raise ApiError(
            422,
            "invalid_field",
            f"`{field}` × `denoising_strength` ({steps} × {strength:g}) runs no denoising step;"
            " raise either so that their product is at least 1",
            field=field,
        )


def _check_noise(request: Txt2ImgRequest | Img2ImgRequest, settings: GatewaySettings) -> None:
    """Variation seeds, seed resize and ENSD (A1111's noise options)."""
    _at_most("seed_resize_from_w", request.seed_resize_from_w, settings.max_width)
    _at_most("seed_resize_from_h", request.seed_resize_from_h, settings.max_height)
    delta = (request.override_settings or {}).get("eta_noise_seed_delta")
    if delta is not None and (
        not isinstance(delta, int) or isinstance(delta, bool) or not 0 <= delta < 2**32
    ):
        raise ApiError(
            422,
            "invalid_field",
            f"`override_settings.eta_noise_seed_delta` must be an integer from 0 to 2**32-1"
            f" but is {delta!r}",
            field="override_settings.eta_noise_seed_delta",
        )
    if isinstance(request, Img2ImgRequest):
        resized = request.seed_resize_from_w > 0 and request.seed_resize_from_h > 0
        for field, used in (
            ("subseed_strength", request.subseed_strength > 0),
            ("seed_resize_from_w", resized),
        ):
            if used:
                raise ApiError(
                    422,
                    "unsupported",
                    f"`{field}`: variation seeds and seed resize are implemented for txt2img"
                    " only; img2img's starting noise is drawn inside diffusers",
                    field=field,
                )


def _check_hires(request: Txt2ImgRequest, settings: GatewaySettings) -> None:
    width, height = request.hr_size()
    _at_most("hr_scale", width, settings.max_width, " pixels wide after hires fix")
    _at_most("hr_scale", height, settings.max_height, " pixels high after hires fix")
    _at_most("hr_scale", width * height, settings.max_pixels, " pixels after hires fix")
    _at_most("hr_second_pass_steps", request.hr_second_pass_steps, settings.max_steps)
    if request.hr_sampler_name and request.hr_sampler_name != "Use same sampler":
        try:
            split_sampler(request.hr_sampler_name, request.hr_scheduler)
        except ValueError as exc:
            raise ApiError(422, "invalid_field", str(exc), field="hr_sampler_name") from exc
