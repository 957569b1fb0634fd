"""Input images: validated at the edge, moved to the object store before anything is queued.

A request may carry each image as base64 (with or without a ``data:`` prefix) or as the
object key of an earlier upload or result of the caller's own. Only PNG, JPEG and WebP
are accepted; dimensions are read from the header and checked against
``max_input_pixels`` before any pixel is decoded (decompression bombs), then the image
is fully decoded once to prove it is not truncated. Messages carry keys, never bytes.
Base64 and image decoding are CPU work (four 4096² PNGs take over a second): they run in
worker threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import warnings
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

from proto import names
from services.gateway.errors import ApiError
from services.gateway.resources import Resources
from services.storage.objects import ObjectNotFoundError, check_key

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


async def read_image(value: str, field: str, max_pixels: int) -> tuple[bytes, str, tuple[int, int]]:
    """The bytes, file extension and (width, height) of a base64 image, decoded and checked
    in a worker thread; 422 naming the field otherwise."""

    def read() -> tuple[bytes, str, tuple[int, int]]:
        data = decode_base64(value, field)
        return data, *_inspect(data, field, max_pixels)

    return await asyncio.to_thread(read)


async def inspect_image(data: bytes, field: str, max_pixels: int) -> tuple[str, tuple[int, int]]:
    """The file extension and (width, height) of a valid image, checked in a worker thread;
    422 naming the field otherwise."""
    return await asyncio.to_thread(_inspect, data, field, max_pixels)


def _inspect(
    data: bytes, field: str, max_pixels: int, *, decode: bool = True
) -> tuple[str, tuple[int, int]]:
    """``decode``: decode every pixel once (a header alone can hide a truncated file)."""
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
                if decode:
                    image.load()  # truncated or corrupt files fail here
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
    return FORMATS[kind], (width, height)


def _owned_key(value: str, user: str) -> str | None:
    """An object key the caller may use as input, or None if ``value`` is not a key."""
    if "/" not in value or len(value) > 512:
        return None
    try:
        key = check_key(value)
    except ValueError:
        return None
    return key if key.startswith(names.owned_prefixes(user)) else None


HEADER_BYTES = 64 * 1024
"""Read of a stored input to learn its size: PNG and WebP say it in their first bytes,
JPEG after its metadata segments (a file whose metadata is larger is read whole)."""


async def _stored_size(res: Resources, key: str, label: str, max_pixels: int) -> tuple[int, int]:
    """The size of an image already in the store, from its header: one ranged read.

    Stored inputs were fully checked when they arrived (results are the workers' own),
    so the header is enough; only a header too long for one read costs a whole read."""
    try:
        head = await res.objects.get(key, HEADER_BYTES)
    except ObjectNotFoundError as exc:
        message = f"`{label}`: no object {key!r}"
        raise ApiError(404, "image_not_found", message, field=label) from exc
    try:
        _, size = await asyncio.to_thread(_inspect, head, label, max_pixels, decode=False)
    except ApiError:
        if len(head) < HEADER_BYTES:
            raise
        _, size = await inspect_image(await res.objects.get(key), label, max_pixels)
    return size


@dataclass
class StagedInputs:
    """Images checked but not yet stored: keys, sizes, and the inline ones to upload."""

    keys: list[str] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    uploads: list[tuple[str, bytes, str]] = field(default_factory=list)


async def stage_inputs(
    res: Resources,
    user: str,
    task_id: str,
    values: list[str],
    field: str,
    first: int = 0,
    name: str | None = None,
) -> StagedInputs:
    """Check the request's images (each base64 or an object key of the caller's) and
    name their keys (``names.input_key``). Nothing is stored:
    :func:`upload_staged` does that once every check of the request has passed.
    Errors name ``field[i]`` (``mask``: the field), or ``name`` when given."""
    staged = StagedInputs()
    max_pixels = res.settings.max_input_pixels
    for offset, value in enumerate(values):
        label = name or (f"{field}[{offset}]" if field != "mask" else field)
        key = _owned_key(value, user)
        if key is not None:
            size = await _stored_size(res, key, label, max_pixels)
        else:
            data, extension, size = await read_image(value, label, max_pixels)
            key = names.input_key(user, task_id, first + offset, extension)
            staged.uploads.append((key, data, extension))
        staged.keys.append(key)
        staged.sizes.append(size)
    return staged


async def upload_staged(res: Resources, *staged: StagedInputs) -> None:
    for batch in staged:
        for key, data, extension in batch.uploads:
            await res.objects.put(key, data, content_type=f"image/{extension}")
