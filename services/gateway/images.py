"""Input images: validated at the edge, moved to the object store before anything is queued.

A request may carry each image as base64 (with or without a ``data:`` prefix) or as the
object key of an earlier upload or result of the caller's own. Only PNG, JPEG and WebP
are accepted; dimensions are read from the header and checked against
``max_input_pixels`` before any pixel is decoded (decompression bombs), then the image
is fully decoded once to prove it is not truncated. Messages carry keys, never bytes.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, UnidentifiedImageError

from services.gateway.errors import ApiError
from services.gateway.resources import Resources
from services.storage.objects import check_key

FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}


def decode_base64(value: str, field: str) -> bytes:
    text = value.strip()
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if ";base64" not in header:
            raise ApiError(422, "invalid_image", f"`{field}` data URL must be base64", field=field)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(
            422, "invalid_image", f"`{field}` is neither base64 nor an object key", field=field
        ) from exc


def check_image(data: bytes, field: str, max_pixels: int) -> str:
    """The file extension for a valid image; 422 naming the field otherwise."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                kind = image.format or ""
                if kind not in FORMATS:
                    raise ApiError(
                        422,
                        "invalid_image",
                        f"`{field}` is {kind or 'not an image'}; accepted: PNG, JPEG, WebP",
                        field=field,
                    )
                width, height = image.size
                if width * height > max_pixels:
                    raise ApiError(
                        422,
                        "invalid_image",
                        f"`{field}` has {width}×{height} pixels; at most {max_pixels} allowed",
                        field=field,
                    )
                image.load()  # decode once: truncated or corrupt files fail here
    except ApiError:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
        ValueError,
    ) as exc:
        raise ApiError(
            422, "invalid_image", f"`{field}` is not a readable image: {exc}", field=field
        ) from exc
    return FORMATS[kind]


def _owned_key(value: str, user: str) -> str | None:
    """An object key the caller may use as input, or None if ``value`` is not a key."""
    if "/" not in value or len(value) > 512:
        return None
    try:
        key = check_key(value)
    except ValueError:
        return None
    if not (key.startswith(f"images/{user}/") or key.startswith(f"inputs/{user}/")):
        return None
    return key


async def store_inputs(
    res: Resources,
    user: str,
    task_id: str,
    values: list[str],
    field: str,
    first: int = 0,
    name: str | None = None,
) -> list[str]:
    """Object keys for the request's images, uploading inline ones under ``inputs/{user}/``.

    Everything is validated before the first upload, so a bad image stores nothing.
    Errors name ``field[i]`` (``mask``: the field), or ``name`` when given.
    """
    keys: list[str] = []
    uploads: list[tuple[str, bytes, str]] = []
    for offset, value in enumerate(values):
        label = name or (f"{field}[{offset}]" if field != "mask" else field)
        key = _owned_key(value, user)
        if key is not None:
            if not await res.objects.exists(key):
                raise ApiError(404, "image_not_found", f"`{label}`: no object {key!r}", field=label)
            check_image(await res.objects.get(key), label, res.settings.max_input_pixels)
            keys.append(key)
            continue
        data = decode_base64(value, label)
        extension = check_image(data, label, res.settings.max_input_pixels)
        key = f"inputs/{user}/{task_id}_{first + offset}.{extension}"
        uploads.append((key, data, extension))
        keys.append(key)
    for key, data, extension in uploads:
        await res.objects.put(key, data, content_type=f"image/{extension}")
    return keys
