"""Enumerations shared by every service (the seed's vocabulary where it had one)."""

from __future__ import annotations

import enum


class TaskStatus(enum.StrEnum):
    WAITING = "waiting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES

    @property
    def rank(self) -> int:
        """Statuses only move forward: a fold never lowers the rank."""
        return _RANK[self]


TERMINAL_STATUSES = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED})
"""The one definition of "ended": final, never left. Events of the same names end a task."""
OPEN_STATUSES = (TaskStatus.WAITING, TaskStatus.RUNNING)
"""A task in these may still change: it is queued or on a worker."""
_RANK = {
    TaskStatus.WAITING: 0,
    TaskStatus.RUNNING: 1,
    TaskStatus.SUCCEEDED: 2,
    TaskStatus.FAILED: 2,
    TaskStatus.CANCELLED: 2,
}


class TaskKind(enum.StrEnum):
    TXT2IMG = "txt2img"
    IMG2IMG = "img2img"
    EXTRAS = "extras"


class ModelType(enum.StrEnum):
    """The seed's model types, plus upscalers, embeddings and face restorers."""

    STABLE_DIFFUSION = "stableDiffusion"
    SD_VAE = "sdVae"
    LORA = "lora"
    CONTROL_NET = "controlNet"
    UPSCALER = "upscaler"
    EMBEDDING = "embedding"
    FACE_RESTORER = "faceRestorer"
    """GFPGAN-style face restoration networks (A1111's ``GFPGAN/`` folder)."""
    VAE_APPROX = "vaeApprox"
    """TAESD decoders for live previews (A1111's ``VAE-approx/`` folder)."""


class ModelStatus(enum.StrEnum):
    REGISTERING = "registering"
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    DELETED = "deleted"
    FAILED = "failed"


class ModelFamily(enum.StrEnum):
    """Checkpoint architecture, detected from tensor names and shapes, never file names."""

    SD1 = "sd1"
    SD1_INPAINT = "sd1_inpaint"
    SD2 = "sd2"
    SD2_INPAINT = "sd2_inpaint"
    SDXL = "sdxl"
    SDXL_INPAINT = "sdxl_inpaint"
