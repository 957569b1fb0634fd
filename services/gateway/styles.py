"""A1111 prompt styles: ``styles`` in a request names rows of ``styles.csv``.

The file is A1111's own (columns ``name``, ``prompt``, ``negative_prompt``), dropped into
the models folder (``SDSWARM_STYLES_FILE`` overrides the place) and re-read when it
changes. A style's text is applied as A1111 applies it: a ``{prompt}`` placeholder is
replaced by the request's prompt, otherwise the style is appended after a comma; the
same for the negative prompt. An unknown style name is a 422 naming it.
"""

from __future__ import annotations

import asyncio
import csv
import io
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from services.gateway.auth import caller
from services.gateway.errors import ApiError
from services.gateway.openapi import respond
from services.gateway.resources import Resources, resources
from services.gateway.responses import A1111PromptStyle
from services.gateway.settings import GatewaySettings

MAX_STYLES_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str
    negative_prompt: str


_cache: dict[Path, tuple[float, dict[str, Style]]] = {}


def styles_path(settings: GatewaySettings) -> Path:
    return Path(settings.styles_file or Path(settings.models_dir) / "styles.csv")


def _read(path: Path) -> dict[str, Style]:
    try:
        stat = path.stat()
    except OSError:
        return {}
    cached = _cache.get(path)
    if cached and cached[0] == stat.st_mtime:
        return cached[1]
    text = path.read_bytes()[:MAX_STYLES_BYTES].decode("utf-8-sig", errors="replace")
    styles = {
        row["name"]: Style(row["name"], row.get("prompt") or "", row.get("negative_prompt") or "")
        for row in csv.DictReader(io.StringIO(text))
        if row.get("name")
    }
    _cache[path] = (stat.st_mtime, styles)
    return styles


async def load_styles(settings: GatewaySettings) -> dict[str, Style]:
    return await asyncio.to_thread(_read, styles_path(settings))


def _merge(style_text: str, prompt: str) -> str:
    if "{prompt}" in style_text:
        return style_text.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt, style_text) if part)


async def apply_styles(
    res: Resources, names: list[str], prompt: str, negative: str
) -> tuple[str, str]:
    """The prompt and negative prompt with the named styles applied, in order."""
    if not names:
        return prompt, negative
    known = await load_styles(res.settings)
    for index, name in enumerate(names):
        style = known.get(name)
        if style is None:
            raise ApiError(
                422,
                "invalid_field",
                f"`styles[{index}]`: no prompt style named {name!r}",
                field=f"styles[{index}]",
            )
        prompt = _merge(style.prompt, prompt)
        negative = _merge(style.negative_prompt, negative)
    return prompt, negative


async def prompt_styles(request: web.Request) -> web.StreamResponse:
    """``GET /sdapi/v1/prompt-styles``, A1111's shape."""
    res = resources(request)
    await caller(request, res)
    styles = await load_styles(res.settings)
    return respond(
        [
            A1111PromptStyle(name=s.name, prompt=s.prompt, negative_prompt=s.negative_prompt)
            for s in styles.values()
        ]
    )
