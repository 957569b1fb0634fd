"""Bounds on free-form input, so that no request can become a poison task.

A task's request is stored with it and travels as its command; the options a user stores
are merged into every later request. Three bounds keep all of it small, each a 4xx that
names the field and the rule, checked before anything is stored or queued:

- every string of a request (prompts, styles, sampler names, values inside
  ``override_settings``, ``comments``, ``alwayson_scripts`` …) has at most
  ``max_text_chars`` characters, except images (their own limits: pixels, body size),
  which the command carries as object keys;
- each free-form object or list (``FREE_FORM``) and the stored options take at most
  ``max_free_form_bytes`` / ``max_options_bytes`` of JSON, images not counted;
- the encoded command is at most ``max_command_bytes`` and always below the NATS
  server's max payload: a command JetStream refuses would leave a task waiting forever.
"""

from __future__ import annotations

from typing import Any

import msgspec

from services.gateway.errors import ApiError
from services.gateway.settings import GatewaySettings

FREE_FORM = frozenset(
    {"override_settings", "comments", "alwayson_scripts", "script_args", "styles", "webhook"}
)
"""Request fields whose shape the client chooses."""
IMAGE_KEYS = frozenset(
    {"init_images", "mask", "image", "input_image", "mask_image", "firstpass_image", "data"}
)
"""Keys whose strings are images (base64 or object keys): bounded as images, not text."""
HEADROOM_BYTES = 4096
"""Room left below the server's max payload for the message's headers."""


def _last_key(path: str) -> str:
    return path.rsplit(".", 1)[-1].split("[", 1)[0]


def _size(value: Any, path: str, max_chars: int) -> int:
    """The JSON size of ``value`` without its images; 422 for a string over ``max_chars``."""
    if isinstance(value, str):
        if _last_key(path) in IMAGE_KEYS:
            return 2
        if len(value) > max_chars:
            raise ApiError(
                422,
                "limit_exceeded",
                f"`{path}` must be at most {max_chars} characters but is {len(value)}",
                field=path,
            )
        return len(value) + 2
    if isinstance(value, dict):
        return 2 + sum(
            len(str(k)) + 4 + _size(v, f"{path}.{k}" if path else str(k), max_chars)
            for k, v in value.items()
        )
    if isinstance(value, list):
        return 2 + sum(_size(v, f"{path}[{n}]", max_chars) + 1 for n, v in enumerate(value))
    return len(msgspec.json.encode(value))


def check_free_form(request: msgspec.Struct, settings: GatewaySettings) -> None:
    """Every string and every free-form field of a decoded request within its bound."""
    fields = msgspec.to_builtins(request)
    for name, value in fields.items():
        size = _size(value, name, settings.max_text_chars)
        if name in FREE_FORM and size > settings.max_free_form_bytes:
            raise ApiError(
                422,
                "limit_exceeded",
                f"`{name}` must take at most {settings.max_free_form_bytes} bytes of JSON"
                f" (images not counted) but takes {size}",
                field=name,
            )


def check_options(options: dict[str, Any], settings: GatewaySettings, field: str) -> None:
    """A user's options snapshot (merged into each later request) within its bound."""
    size = _size(options, field, settings.max_text_chars)
    if size > settings.max_options_bytes:
        raise ApiError(
            422,
            "limit_exceeded",
            f"`{field}`: stored options must take at most {settings.max_options_bytes} bytes"
            f" of JSON but would take {size}",
            field=field,
        )


def check_command(
    encoded: bytes, request: msgspec.Struct | None, settings: GatewaySettings, max_payload: int
) -> None:
    """413 for a command over ``max_command_bytes`` or the server's max payload, naming
    the request's largest field."""
    limit = min(settings.max_command_bytes, max_payload - HEADROOM_BYTES)
    if len(encoded) <= limit:
        return
    sizes = {
        name: len(msgspec.json.encode(value))
        for name, value in (msgspec.to_builtins(request) if request is not None else {}).items()
    }
    largest = max(sizes, key=lambda name: sizes[name]) if sizes else None
    raise ApiError(
        413,
        "command_too_large",
        f"the task would be a {len(encoded)}-byte command; at most {limit} bytes fit"
        + (f" (its largest field is `{largest}`, {sizes[largest]} bytes)" if largest else ""),
        field=largest,
    )
