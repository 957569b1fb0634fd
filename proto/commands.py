"""Commands: imperative messages that ask a service to do something."""

from __future__ import annotations

from msgspec import Struct

from proto.controlnet import ControlUnit
from proto.enums import TaskKind
from proto.extra_networks import AdapterRef as AdapterRef
from proto.requests import ExtrasOptions, Img2ImgRequest, Txt2ImgRequest

# Bumped only for a change old workers cannot read; fields are otherwise added with defaults.
SCHEMA_VERSION = 1


class GenerateImage(Struct, kw_only=True, frozen=True, omit_defaults=True):
    """Published to ``sd.task.<model_key>`` with ``Nats-Msg-Id = task_id``."""

    task_id: str
    """Minted once by the gateway; Mongo ``_id``, message id and part of every object key."""
    user: str
    """Owner; object keys are built from it server-side."""
    model_name: str
    """Registered checkpoint name (as the client sent it)."""
    model_key: str
    kind: TaskKind = TaskKind.TXT2IMG
    txt2img: Txt2ImgRequest | None = None
    img2img: Img2ImgRequest | None = None
    extras: ExtrasOptions | None = None
    """Extras (upscaling) parameters; one output image per input key."""
    upscalers: dict[str, str] = {}
    """Extras: the registered upscaler models the request names, name → file path."""
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
    face_restorer: AdapterRef | None = None
    """The registered ``faceRestorer`` model that restores faces after generation
    (``restore_faces``) or in extras (``gfpgan_visibility`` > 0); None: no restoration."""
    controlnets: list[ControlUnit] = []
    """Enabled ControlNet units (``alwayson_scripts.controlnet``), resolved; their images
    are ``input_keys`` too."""
    input_keys: list[str] = []
    """Claim checks: object keys of uploaded input images (img2img, extras), never the bytes."""
    submitted_at: float = 0.0
    """Unix time the gateway accepted the task (queue-age metrics, ETA)."""
    schema_version: int = SCHEMA_VERSION
