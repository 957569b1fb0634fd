"""Adapters a request names are resolved before anything is queued: the LoRAs of its
prompt (``<lora:name:weight>``), its VAE (``sd_vae`` or ``override_settings.sd_vae``),
the textual-inversion embeddings its prompts mention, the upscaler models it names
(hires fix, extras) and the face restorer (``restore_faces``, extras' visibilities).
A name that is not a usable registered model is a 422 naming it."""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

from proto import ModelStatus, ModelType
from proto.commands import AdapterRef
from proto.extra_networks import lora_tags
from proto.requests import (
    CODEFORMER_REFUSAL,
    HIRES_IMAGE_UPSCALERS,
    LATENT_UPSCALE_MODES,
    MISSING_RESTORER,
    Txt2ImgRequest,
)
from services.gateway.errors import ApiError
from services.gateway.resources import Resources
from services.storage.models import usable

MAX_LORAS = 16


async def resolve_loras(res: Resources, prompt: str, field: str = "prompt") -> list[AdapterRef]:
    try:
        tags = lora_tags(prompt)
    except ValueError as exc:
        raise ApiError(
            422,
            "invalid_field",
            f"`{field}`: a <lora:name:weight> weight is not a number: {exc}",
            field=field,
        ) from exc
    if len(tags) > MAX_LORAS:
        raise ApiError(
            422,
            "limit_exceeded",
            f"`{field}` names {len(tags)} LoRAs; at most {MAX_LORAS}",
            field=field,
        )
    refs = []
    for tag in tags:
        if not -10 <= tag.weight <= 10:
            raise ApiError(
                422,
                "invalid_field",
                f"`{field}`: LoRA {tag.name!r} weight must be between -10 and 10",
                field=field,
            )
        model = await res.models.get_recent(tag.name, ModelType.LORA)
        if model is None or model["status"] in (
            ModelStatus.FAILED.value,
            ModelStatus.REGISTERING.value,
        ):
            why = "is not registered" if model is None else _unusable(model)
            raise ApiError(
                422, "lora_not_found", f"`{field}`: LoRA {tag.name!r} {why}", field=field
            )
        refs.append(
            AdapterRef(
                name=tag.name,
                path=model["path"],
                sha256=model.get("sha256") or "",
                weight=tag.weight,
            )
        )
    return refs


def _unusable(model: dict[str, Any]) -> str:
    reason = f": {model['error']}" if model.get("error") else ""
    return f"cannot be used ({model['status']}{reason})"


AUTOMATIC_VAE = frozenset({"", "Automatic", "None", "auto"})
"""A1111's values for "the checkpoint's own VAE"."""


async def resolve_vae(
    res: Resources, sd_vae: str | None, override_settings: dict[str, Any] | None
) -> AdapterRef | None:
    field, name = "sd_vae", sd_vae
    if name is None and "sd_vae" in (override_settings or {}):
        field, name = "override_settings.sd_vae", (override_settings or {}).get("sd_vae")
    if name is None or (isinstance(name, str) and name.strip() in AUTOMATIC_VAE):
        return None
    if not isinstance(name, str):
        raise ApiError(422, "invalid_field", f"`{field}` must be a VAE name", field=field)
    model = await res.models.get_recent(name, ModelType.SD_VAE)
    if model is None:  # A1111 clients also send the bare stem
        model = next(
            (
                m
                for m in await res.models.list_recent(ModelType.SD_VAE)
                if PurePosixPath(m["name"]).stem == name
            ),
            None,
        )
    if model is None or model["status"] in (
        ModelStatus.FAILED.value,
        ModelStatus.REGISTERING.value,
    ):
        why = "is not registered" if model is None else f"cannot be used ({model['status']})"
        raise ApiError(422, "vae_not_found", f"`{field}`: VAE {name!r} {why}", field=field)
    return AdapterRef(name=model["name"], path=model["path"], sha256=model.get("sha256") or "")


def _mentions(text: str, name: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text) is not None


def base_family(family: Any) -> str | None:
    return family.split("_")[0] if isinstance(family, str) and family else None


def families_match(checkpoint: Any, model: Any) -> bool:
    """Whether an adapter of family ``model`` fits a checkpoint of family ``checkpoint``
    (``sd1_inpaint`` is ``sd1``); an unknown family on either side fits."""
    mine, theirs = base_family(checkpoint), base_family(model)
    return mine is None or theirs is None or mine == theirs


async def resolve_embeddings(
    res: Resources, *texts: str, family: str | None = None
) -> list[AdapterRef]:
    """The registered embeddings the prompts mention by name (as A1111, where every
    embedding is active wherever its name appears). Embeddings made for another family
    than the checkpoint's (``family``, when both are known) are left out, as A1111 skips
    them: the name stays plain text."""
    text = "\n".join(texts)
    return [
        AdapterRef(name=m["name"], path=m["path"], sha256=m.get("sha256") or "")
        for m in await res.models.list_recent(ModelType.EMBEDDING)
        if m["status"] not in (ModelStatus.FAILED.value, ModelStatus.REGISTERING.value)
        and _mentions(text, m["name"])
        and families_match(family, m.get("family"))
    ]


async def resolve_upscaler(
    res: Resources, name: str, field: str, builtins: tuple[str, ...]
) -> AdapterRef:
    """The registered ``upscaler`` model ``name``; a 422 listing what is available (the
    ``builtins`` first, then the usable registered models) when there is none."""
    model = await res.models.get_recent(name, ModelType.UPSCALER)
    if model is None or not usable(model):
        known = [m["name"] for m in await res.models.list_recent(ModelType.UPSCALER) if usable(m)]
        raise ApiError(
            422,
            "upscaler_not_found",
            f"`{field}` {name!r} is not an upscaler; available: " + ", ".join([*builtins, *known]),
            field=field,
        )
    return AdapterRef(name=model["name"], path=model["path"], sha256=model.get("sha256") or "")


HIRES_BUILTINS = (*LATENT_UPSCALE_MODES, *HIRES_IMAGE_UPSCALERS)
"""A1111's hires-fix upscalers that need no model file."""


async def resolve_hr_upscaler(res: Resources, request: Txt2ImgRequest) -> AdapterRef | None:
    """Hires fix with a model upscaler: the registered file ``hr_upscaler`` names; None
    without hires fix or for a built-in (``Latent`` …, ``Lanczos``, ``Nearest``, ``None``)."""
    name = request.hr_upscaler or "Latent"
    if not request.enable_hr or name in HIRES_BUILTINS:
        return None
    return await resolve_upscaler(res, name, "hr_upscaler", HIRES_BUILTINS)


FACE_RESTORATION_OPTION = "face_restoration_model"
"""A1111's option naming the restorer ``restore_faces`` uses (``GFPGAN``, ``CodeFormer``)."""
ANY_RESTORER = frozenset({"", "GFPGAN", "Automatic"})
"""Values that take the registered restorer (the first by name when there are several)."""


async def resolve_face_restorer(res: Resources, wanted: Any, field: str) -> AdapterRef:
    """The registered face restorer ``wanted`` names (A1111's ``GFPGAN``, or a registered
    name); a 422 naming what to register when there is none."""
    if isinstance(wanted, str) and wanted.strip().lower() == "codeformer":
        raise ApiError(422, "unsupported", f"`{field}`: {CODEFORMER_REFUSAL}", field=field)
    models = sorted(
        (m for m in await res.models.list_recent(ModelType.FACE_RESTORER) if usable(m)),
        key=lambda m: str(m["name"]),
    )
    if not models:
        raise ApiError(422, "face_restorer_missing", f"`{field}` {MISSING_RESTORER}", field=field)
    if wanted is None or (isinstance(wanted, str) and wanted.strip() in ANY_RESTORER):
        model = models[0]
    else:
        named = [m for m in models if m["name"] == wanted]
        if not named:
            known = ", ".join(["GFPGAN", *(m["name"] for m in models)])
            raise ApiError(
                422,
                "face_restorer_not_found",
                f"`{field}` {wanted!r} is not a registered face restorer; available: {known}",
                field=field,
            )
        model = named[0]
    return AdapterRef(name=model["name"], path=model["path"], sha256=model.get("sha256") or "")


async def resolve_restore_faces(
    res: Resources, restore_faces: bool | None, override_settings: dict[str, Any] | None
) -> AdapterRef | None:
    """txt2img/img2img ``restore_faces``: the restorer that
    ``override_settings.face_restoration_model`` (or the caller's option) names."""
    if not restore_faces:
        return None
    settings = override_settings or {}
    if FACE_RESTORATION_OPTION in settings:
        field = f"override_settings.{FACE_RESTORATION_OPTION}"
        return await resolve_face_restorer(res, settings[FACE_RESTORATION_OPTION], field)
    return await resolve_face_restorer(res, None, "restore_faces")
