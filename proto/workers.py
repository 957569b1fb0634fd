"""Worker liveness records, kept in the KV bucket ``sd_workers`` (one key per worker).

Workers rewrite their record on every state change and every few seconds; the bucket's
TTL drops the record of a worker that died. The scheduler derives the true model
statuses (``loading`` / ``loaded`` / ``unloaded`` / ``failed``) from these records.
"""

from __future__ import annotations

import enum

import msgspec
from msgspec import Struct


class WorkerState(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    BUSY = "busy"
    FAILED = "failed"
    """The checkpoint cannot be loaded; ``error`` says why."""


class CompileState(enum.StrEnum):
    """Where a worker's compiled UNet stands (``SDSWARM_COMPILE``, README "Compiled UNet")."""

    OFF = "off"
    """Eager only: compile is off, or a LoRA was applied (``error`` says which)."""
    COMPILING = "compiling"
    """Planned shapes compile in the background; tasks run eagerly until theirs is ready."""
    READY = "ready"
    """Every planned shape is compiled; calls of those shapes run compiled."""
    FAILED = "failed"
    """Compilation failed (``error`` says why); the worker serves eagerly."""


class CompileStatus(Struct, kw_only=True, frozen=True, omit_defaults=True):
    state: CompileState
    ready: list[str] = []
    """Compiled shapes, ``<UNet batch>@<width>x<height>`` in pixels (``4@512x512``: two
    rows with classifier-free guidance)."""
    pending: int = 0
    """Planned shapes still to compile."""
    seconds: float = 0.0
    """Time spent compiling so far (a cache hit is a fraction of a cold compile)."""
    error: str = ""
    calls: int = 0
    """UNet calls served by compiled graphs so far (the others ran eagerly)."""


class WorkerStatus(Struct, kw_only=True, frozen=True, omit_defaults=True):
    worker: str
    model_key: str
    model_name: str
    state: WorkerState
    device: str = ""
    pid: int = 0
    task_id: str | None = None
    """The first task in hand (kept for older readers)."""
    task_ids: list[str] = []
    """Every task of the batch in hand."""
    error: str | None = None
    last_step_at: float | None = None
    """Unix time of the last denoising step (hung-worker detection)."""
    updated_at: float = 0.0
    load_seconds: float | None = None
    """How long loading the checkpoint took (cold-start ETA)."""
    load_phases: dict[str, float] = {}
    """Seconds per cold-start phase, laps from the process's own start: ``imports``,
    ``device``, ``config``, ``weights``, ``warmup`` (services/inference/coldstart.py).
    Their sum is process started → ready; filled in as loading goes."""
    weights_cached: bool | None = None
    """Whether the weights came from the converted-weights cache (None: not used)."""
    rss_bytes: int = 0
    """Resident memory of the worker process."""
    cuda_free_bytes: int | None = None
    cuda_total_bytes: int | None = None
    """Free and total memory of the worker's CUDA device (None on CPU)."""
    cuda_allocated_bytes: int | None = None
    """What this process's tensors hold on the device."""
    metrics_address: str = ""
    """``host:port`` of the worker's Prometheus listener ('' when off)."""
    compile: CompileStatus | None = None
    """The compiled UNet's progress (None: compile is off or the worker is not a
    checkpoint's)."""


_decoder = msgspec.json.Decoder(WorkerStatus)


def decode_worker_status(data: bytes) -> WorkerStatus:
    return _decoder.decode(data)
