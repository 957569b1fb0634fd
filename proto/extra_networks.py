"""A1111's extra-network tags in prompts: ``<lora:name:weight>`` (and ``<lyco:…>``).

The gateway reads the tags to resolve each LoRA before anything is queued; the worker
reads them again to apply the LoRAs and to strip the tags from the text the encoder
sees. The prompt itself keeps its tags (A1111's infotext does too).
"""

from __future__ import annotations

import re

from msgspec import Struct

# <lora:name>, <lora:name:0.8>, <lora:name:0.8:0.5> (text encoder, UNet weights); names
# may hold spaces and dots but no ':' or '>'.
_TAG = re.compile(r"<(lora|lyco):([^:>]+)(?::([^:>]*))?(?::([^:>]*))?>")


class LoraTag(Struct, frozen=True):
    name: str
    weight: float = 1.0


def lora_tags(prompt: str) -> list[LoraTag]:
    """The LoRA tags of ``prompt`` in order; an unparsable weight raises ``ValueError``."""
    tags = []
    for _, name, weight, _unet in _TAG.findall(prompt):
        value = float(weight) if weight.strip() else 1.0
        tags.append(LoraTag(name=name.strip(), weight=value))
    return tags


def strip_tags(prompt: str) -> str:
    """The prompt without its extra-network tags (what the text encoder sees)."""
    return re.sub(r"\s*,\s*,", ",", _TAG.sub("", prompt)).strip(" ,")


class AdapterRef(Struct, kw_only=True, frozen=True, omit_defaults=True):
    """A registered adapter file (LoRA, VAE, embedding, ControlNet …) a task uses,
    resolved by the gateway."""

    name: str
    path: str
    sha256: str = ""
    weight: float = 1.0
