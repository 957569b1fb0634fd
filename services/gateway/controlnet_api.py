"""ControlNet as A1111's ControlNet extension exposes it: units in
``alwayson_scripts.controlnet.args`` and the ``/controlnet/*`` listing routes.

Units are checked before anything is stored or queued (fields, module, model, family),
then their images go to the object store like ``init_images`` and the task carries
:class:`~proto.controlnet.ControlUnit` s. A disabled unit is dropped; an img2img unit
without an image uses the first init image, as the extension does.
"""

from __future__ import annotations

import asyncio
import base64
import io
from dataclasses import dataclass

import msgspec
from aiohttp import web
from PIL import Image

from proto import ModelStatus, ModelType
from proto.controlnet import (
    BUILTIN_MODULES,
    HR_OPTIONS,
    WEIGHTED_MODULE_PREFIXES,
    ControlNetUnitRequest,
    ControlUnit,
    DetectRequest,
    DetectResponse,
    control_mode_name,
    model_name,
    module_name,
    resize_mode_name,
    script_units,
)
from proto.extra_networks import AdapterRef
from proto.requests import Img2ImgRequest, Txt2ImgRequest
from services.gateway.adapters import base_family, families_match
from services.gateway.auth import caller
from services.gateway.errors import ApiError
from services.gateway.images import StagedInputs, stage_inputs
from services.gateway.openapi import respond
from services.gateway.resources import Resources, resources
from services.gateway.responses import (
    ControlNetModels,
    ControlNetModule,
    ControlNetModules,
    ControlNetSettings,
    ControlNetSlider,
    ControlNetVersion,
)
from services.gateway.validation import decode, read_body
from services.storage.mongo import Document

Body = Txt2ImgRequest | Img2ImgRequest
DEFAULT_PROCESSOR_RES = 512
EXTENSION_API_VERSION = 2


@dataclass(frozen=True)
class CheckedUnit:
    """A unit that passed every check; its image is not stored yet."""

    index: int
    """Position in ``args`` (for field paths and to rewrite the stored parameters)."""
    unit: ControlUnit
    image: str | None


def _invalid(field: str, message: str, code: str = "invalid_field") -> ApiError:
    return ApiError(422, code, f"`{field}`: {message}", field=field)


def _module(module: str, field: str) -> str:
    name = module_name(module)
    if name in BUILTIN_MODULES:
        return name
    if name.startswith(WEIGHTED_MODULE_PREFIXES):
        raise _invalid(
            field,
            f"preprocessor {module!r} needs annotator weights, which sdswarm does"
            " not run; send an already preprocessed image with module 'none'",
            "module_unavailable",
        )
    raise _invalid(
        field,
        f"unknown preprocessor {module!r}; built in: {', '.join(BUILTIN_MODULES)}",
    )


async def _model(res: Resources, request: ControlNetUnitRequest, field: str) -> Document:
    name = model_name(request.model)
    if not name or name == "None":
        raise _invalid(field, "an enabled unit needs a ControlNet model", "controlnet_not_found")
    model = await res.models.get_recent(name, ModelType.CONTROL_NET)
    if model is None or model["status"] in (
        ModelStatus.FAILED.value,
        ModelStatus.REGISTERING.value,
        ModelStatus.DELETED.value,
    ):
        why = "is not registered" if model is None else f"cannot be used ({model['status']})"
        raise _invalid(field, f"ControlNet {name!r} {why}", "controlnet_not_found")
    return model


async def check_controlnets(res: Resources, body: Body, checkpoint: Document) -> list[CheckedUnit]:
    """The request's enabled units, checked; 422 naming the first field that is wrong."""
    found = script_units(body.alwayson_scripts)
    if found is None:
        return []
    script, args = found
    prefix = f"alwayson_scripts.{script}.args"
    checked: list[CheckedUnit] = []
    for index, raw in enumerate(args):
        field = f"{prefix}[{index}]"
        try:
            request = msgspec.convert(raw, ControlNetUnitRequest)
        except msgspec.ValidationError as exc:
            raise _invalid(field, str(exc)) from exc
        if not request.enabled:
            continue
        if len(checked) >= res.settings.max_controlnet_units:
            raise ApiError(
                422,
                "limit_exceeded",
                f"`{prefix}` may enable at most {res.settings.max_controlnet_units} units",
                field=prefix,
            )
        resize = resize_mode_name(request.resize_mode)
        if resize is None:
            raise _invalid(
                f"{field}.resize_mode",
                "must be Just Resize, Crop and Resize or Resize and Fill (or 0, 1, 2)",
            )
        control = control_mode_name(request.control_mode)
        if control is None:
            raise _invalid(
                f"{field}.control_mode",
                "must be Balanced, My prompt is more important or ControlNet is more"
                " important (or 0, 1, 2)",
            )
        if request.hr_option not in HR_OPTIONS:
            raise _invalid(f"{field}.hr_option", f"must be one of {', '.join(HR_OPTIONS)}")
        if request.guidance_start > request.guidance_end:
            raise _invalid(f"{field}.guidance_end", "must not be below guidance_start")
        image = request.image_value()
        if image is None and not isinstance(body, Img2ImgRequest):
            raise _invalid(f"{field}.image", "txt2img units need an image")
        module = _module(request.module, f"{field}.module")
        model = await _model(res, request, f"{field}.model")
        if not families_match(checkpoint.get("family"), model.get("family")):
            raise _invalid(
                f"{field}.model",
                f"ControlNet {model['name']!r} is for {base_family(model.get('family'))}"
                f" checkpoints; {checkpoint['name']!r} is {base_family(checkpoint.get('family'))}",
                "controlnet_mismatch",
            )
        defaults = BUILTIN_MODULES[module]
        unit = ControlUnit(
            model=AdapterRef(
                name=model["name"], path=model["path"], sha256=model.get("sha256") or ""
            ),
            image_key="",
            module=module,
            weight=request.weight,
            resize_mode=resize,
            processor_res=(
                request.processor_res if request.processor_res > 0 else DEFAULT_PROCESSOR_RES
            ),
            threshold_a=_threshold(request.threshold_a, defaults[0]),
            threshold_b=_threshold(request.threshold_b, defaults[1]),
            guidance_start=request.guidance_start,
            guidance_end=request.guidance_end,
            pixel_perfect=request.pixel_perfect,
            control_mode=control,
            hr_option=request.hr_option,
        )
        checked.append(CheckedUnit(index=index, unit=unit, image=image))
    return checked


def _threshold(value: float, default: float | None) -> float | None:
    if default is None:
        return None  # the module has no such slider
    return default if value < 0 else value


async def claim_controlnets(
    res: Resources, user: str, task_id: str, body: Body, checked: list[CheckedUnit], first: int
) -> tuple[Body, list[ControlUnit], list[StagedInputs]]:
    """Stage the units' images (keys numbered from ``first``; the caller uploads them
    with the request's other images); the body's units then carry keys instead of
    base64, so the stored parameters stay small."""
    if not checked:
        return body, [], []
    found = script_units(body.alwayson_scripts)
    assert found is not None
    script, args = found
    units: list[ControlUnit] = []
    staged: list[StagedInputs] = []
    rewritten = list(args)
    for position, item in enumerate(checked):
        if item.image is None:
            assert isinstance(body, Img2ImgRequest)
            key = body.init_images[0]
        else:
            field = f"alwayson_scripts.{script}.args[{item.index}].image"
            images = await stage_inputs(
                res, user, task_id, [item.image], field, first=first + position, name=field
            )
            staged.append(images)
            [key] = images.keys
        units.append(msgspec.structs.replace(item.unit, image_key=key))
        raw = dict(args[item.index])
        raw.pop("input_image", None)
        raw["image"] = key
        rewritten[item.index] = raw
    scripts = dict(body.alwayson_scripts)
    scripts[script] = {**scripts[script], "args": rewritten}
    return msgspec.structs.replace(body, alwayson_scripts=scripts), units, staged


# --- /controlnet/* (the extension's API) -------------------------------------------------


def _title(model: Document) -> str:
    sha = model.get("sha256") or ""
    return f"{model['name']} [{sha[:8]}]" if sha else str(model["name"])


async def model_list(request: web.Request) -> web.StreamResponse:
    res = resources(request)
    await caller(request, res)
    models = [
        m
        for m in await res.models.list(ModelType.CONTROL_NET)
        if m["status"] not in (ModelStatus.FAILED.value, ModelStatus.DELETED.value)
    ]
    return respond(ControlNetModels(model_list=[_title(m) for m in models]))


def _sliders(module: str) -> list[ControlNetSlider]:
    sliders: list[ControlNetSlider] = []
    if module != "none":
        sliders.append(
            ControlNetSlider(
                name="Preprocessor Resolution", value=DEFAULT_PROCESSOR_RES, min=64, max=2048
            )
        )
    for name, default in zip(("Threshold A", "Threshold B"), BUILTIN_MODULES[module], strict=True):
        if default is not None:
            sliders.append(ControlNetSlider(name=name, value=default, min=0, max=255))
    return sliders


async def module_list(request: web.Request) -> web.StreamResponse:
    res = resources(request)
    await caller(request, res)
    return respond(
        ControlNetModules(
            module_list=list(BUILTIN_MODULES),
            module_detail={
                name: ControlNetModule(model_free=False, sliders=_sliders(name))
                for name in BUILTIN_MODULES
            },
        )
    )


async def detect(request: web.Request) -> web.StreamResponse:
    """The extension's preview of a preprocessor: its maps of the given images, at
    ``controlnet_processor_res`` (short side). Runs here, off the event loop."""
    res = resources(request)
    user = await caller(request, res)
    body = decode(await read_body(request), DetectRequest)
    field = "controlnet_input_images" if body.controlnet_input_images else "controlnet_images"
    values = body.controlnet_input_images or body.controlnet_images
    if not 1 <= len(values) <= res.settings.max_input_images:
        raise _invalid(field, f"send 1 to {res.settings.max_input_images} images")
    module = _module(body.controlnet_module, "controlnet_module")
    staged = await stage_inputs(res, user, "detect", values, field)
    inline = {key: data for key, data, _ in staged.uploads}
    images = [inline[key] if key in inline else await res.objects.get(key) for key in staged.keys]
    try:
        from services.inference import preprocessors
    except ImportError as exc:  # a gateway installed without the inference extra
        raise ApiError(
            501, "unavailable", f"preprocessors are not installed on this gateway: {exc}"
        ) from exc
    defaults = BUILTIN_MODULES[module]
    resolution = body.controlnet_processor_res
    unit = ControlUnit(
        model=AdapterRef(name="", path=""),
        image_key="",
        module=module,
        threshold_a=_threshold(body.controlnet_threshold_a, defaults[0]),
        threshold_b=_threshold(body.controlnet_threshold_b, defaults[1]),
    )

    def run() -> list[str]:
        maps = []
        for data in images:
            with Image.open(io.BytesIO(data)) as source:
                found = preprocessors.detect(
                    source, unit, resolution if resolution > 0 else DEFAULT_PROCESSOR_RES
                )
            buffer = io.BytesIO()
            Image.fromarray(found).save(buffer, format="PNG")
            maps.append(base64.b64encode(buffer.getvalue()).decode())
        return maps

    maps = await asyncio.to_thread(run)
    return respond(DetectResponse(images=maps))


async def version(request: web.Request) -> web.StreamResponse:
    return respond(ControlNetVersion(version=EXTENSION_API_VERSION))


async def settings(request: web.Request) -> web.StreamResponse:
    res = resources(request)
    await caller(request, res)
    return respond(ControlNetSettings(control_net_unit_count=res.settings.max_controlnet_units))
