"""A1111's ``POST /sdapi/v1/png-info``: the generation parameters stored in an image.

The ``parameters`` text chunk (what every A1111-compatible tool writes, sdswarm's
workers included) is returned as ``info`` and parsed into ``parameters``: ``Prompt``,
``Negative prompt`` and each ``Key: value`` of the last line (``Size`` also as
``Size-1`` / ``Size-2``), the way A1111 clients read it back.
"""

from __future__ import annotations

import io
import re
from typing import Any

from aiohttp import web
from PIL import Image

from services.gateway.auth import caller
from services.gateway.errors import ApiError
from services.gateway.images import read_image
from services.gateway.openapi import PngInfoResponse, respond
from services.gateway.resources import resources
from services.gateway.validation import read_json

# `Key: value` pairs; a value may be a double-quoted string holding commas.
_PAIR = re.compile(r'\s*([\w ./+-]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict[str, Any]:
    *lines, last = text.strip().split("\n") or [""]
    if len(_PAIR.findall(last)) < 3:  # no parameters line: all of it is the prompt
        lines, last = [*lines, last], ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        if line.startswith("Negative prompt:"):
            negative.append(line.removeprefix("Negative prompt:").strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    parameters: dict[str, Any] = {
        "Prompt": "\n".join(prompt).strip(),
        "Negative prompt": "\n".join(negative).strip(),
    }
    for key, value in _PAIR.findall(last):
        value = value.strip()
        if value.startswith('"') and value.endswith('"') and len(value) > 1:
            value = value[1:-1].replace('\\"', '"')
        parameters[key.strip()] = value
        if key.strip() == "Size" and re.fullmatch(r"\d+x\d+", value):
            parameters["Size-1"], parameters["Size-2"] = value.split("x")
    return parameters


async def png_info(request: web.Request) -> web.StreamResponse:
    res = resources(request)
    await caller(request, res)
    body = await read_json(request)
    value = body.get("image") if isinstance(body, dict) else None
    if not isinstance(value, str) or not value:
        raise ApiError(422, "invalid_field", "`image` must be a base64 image", field="image")
    data, _, _ = await read_image(value, "image", res.settings.max_input_pixels)
    with Image.open(io.BytesIO(data)) as image:  # the header only: text chunks, no pixels
        items = {str(k): str(v) for k, v in (image.info or {}).items() if isinstance(v, str)}
    info = items.get("parameters", "")
    return respond(
        PngInfoResponse(info=info, items=items, parameters=parse_infotext(info) if info else {})
    )
