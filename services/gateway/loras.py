"""LoRAs named in a prompt (``<lora:name:weight>``) are resolved before anything is
queued: a name that is not a usable registered LoRA is a 422 naming it."""

from __future__ import annotations

from proto import ModelStatus, ModelType
from proto.commands import AdapterRef
from proto.extra_networks import lora_tags
from services.gateway.errors import ApiError
from services.gateway.resources import Resources

MAX_LORAS = 16


async def resolve_loras(res: Resources, prompt: str) -> list[AdapterRef]:
    try:
        tags = lora_tags(prompt)
    except ValueError as exc:
        raise ApiError(
            422,
            "invalid_field",
            f"`prompt`: a <lora:name:weight> weight is not a number: {exc}",
            field="prompt",
        ) from exc
    if len(tags) > MAX_LORAS:
        raise ApiError(
            422,
            "limit_exceeded",
            f"`prompt` names {len(tags)} LoRAs; at most {MAX_LORAS}",
            field="prompt",
        )
    refs = []
    for tag in tags:
        if not -10 <= tag.weight <= 10:
            raise ApiError(
                422,
                "invalid_field",
                f"`prompt`: LoRA {tag.name!r} weight must be between -10 and 10",
                field="prompt",
            )
        model = await res.models.get(tag.name, ModelType.LORA)
        if model is None or model["status"] in (
            ModelStatus.FAILED.value,
            ModelStatus.REGISTERING.value,
        ):
            why = "is not registered" if model is None else f"cannot be used ({model['status']})"
            raise ApiError(
                422, "lora_not_found", f"`prompt`: LoRA {tag.name!r} {why}", field="prompt"
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
