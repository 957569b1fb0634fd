"""Commands: imperative messages that ask a service to do something.

A task's command is a tagged union on ``kind``: :class:`Txt2ImgTask`,
:class:`Img2ImgTask` or :class:`ExtrasTask`, each carrying exactly its own payload
(``request``) and the references resolved for it, never the others' empty fields.
"""

from __future__ import annotations

import msgspec
from msgspec import Struct

from proto.controlnet import ControlUnit
from proto.enums import TaskKind
from proto.extra_networks import AdapterRef as AdapterRef
from proto.requests import ExtrasOptions, Img2ImgRequest, Txt2ImgRequest

SCHEMA_VERSION = 2
"""Bumped only for a change old workers cannot read; fields are otherwise added with
defaults. A worker refuses (fails, with the reason) a command of a newer version.
v2: the tagged union (v1 had ``kind`` plus three optional payloads)."""


class _Task(Struct, kw_only=True, frozen=True, omit_defaults=True, tag_field="kind"):
    """Published to ``sd.task.<model_key>`` with ``Nats-Msg-Id = task_id``."""

    task_id: str
    """Minted once by the gateway; Mongo ``_id``, message id and part of every object key."""
    user: str
    """Owner; object keys are built from it server-side."""
    model_name: str
    """Registered checkpoint name (as the client sent it)."""
    model_key: str
    input_keys: list[str] = []
    """Claim checks: object keys of uploaded input images (img2img, ControlNet, extras),
    never the bytes."""
    face_restorer: AdapterRef | None = None
    """The registered ``faceRestorer`` model that restores faces after generation
    (``restore_faces``) or in extras (``gfpgan_visibility`` > 0); None: no restoration."""
    submitted_at: float = 0.0
    """Unix time the gateway accepted the task (queue-age metrics, ETA)."""
    schema_version: int = 0
    """Always on the wire (0 only means "this code's version": set on construction)."""

    def __post_init__(self) -> None:
        if not self.schema_version:
            msgspec.structs.force_setattr(self, "schema_version", SCHEMA_VERSION)

    @property
    def kind(self) -> TaskKind:
        return TaskKind(str(self.__struct_config__.tag))


class _Generation(_Task, kw_only=True, frozen=True, omit_defaults=True):
    """What txt2img and img2img share: the checkpoint's adapters, resolved."""

    embeddings: list[AdapterRef] = []
    """Textual-inversion embeddings whose names the prompts use (A1111: always active)."""
    vae: AdapterRef | None = None
    """A registered VAE replacing the checkpoint's own for this task (``sd_vae``)."""
    loras: list[AdapterRef] = []
    """The LoRAs the prompt's ``<lora:…>`` tags name, in order, with their weights."""
    hr_loras: list[AdapterRef] | None = None
    """The LoRAs of ``hr_prompt`` for the hires pass (A1111 activates them there); None
    when the hires pass uses the prompt's."""
    hr_upscaler: AdapterRef | None = None
    """Hires fix: the registered ``upscaler`` model that ``hr_upscaler`` names, resolved to
    its file; it upscales the first pass's images. None for the built-in resamplers and
    the latent modes."""
    controlnets: list[ControlUnit] = []
    """Enabled ControlNet units (``alwayson_scripts.controlnet``), resolved; their images
    are ``input_keys`` too."""


class Txt2ImgTask(_Generation, kw_only=True, frozen=True, omit_defaults=True, tag="txt2img"):
    request: Txt2ImgRequest


class Img2ImgTask(_Generation, kw_only=True, frozen=True, omit_defaults=True, tag="img2img"):
    request: Img2ImgRequest
    """Its ``init_images`` and ``mask`` are object keys (also in ``input_keys``)."""


class ExtrasTask(_Task, kw_only=True, frozen=True, omit_defaults=True, tag="extras"):
    request: ExtrasOptions
    """Extras (upscaling) parameters; one output image per input key, in order."""
    upscalers: dict[str, str] = {}
    """The registered upscaler models the request names, name → file path."""


GenerateImage = Txt2ImgTask | Img2ImgTask | ExtrasTask
"""A task's command, by kind."""
DiffusionTask = Txt2ImgTask | Img2ImgTask
"""The kinds a checkpoint's worker runs (extras run on the extras pool)."""
