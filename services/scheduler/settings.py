"""Scheduler settings (``SDSWARM_*``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from services.common.settings import StoreSettings

GPU_MAX_BATCH = 8
"""Measured on an H200 (SD1.5, 512², 30 steps, fp16): plain diffusers gives 4.64 images/s at
batch 8 against 5.04 at 16 and 1.12 at 1; 8 takes most of the gain at half the latency."""
CPU_MAX_BATCH = 4
"""On CPU a batch mostly saves the per-call overheads; larger ones only add latency."""


class SchedulerSettings(StoreSettings, kw_only=True, frozen=True):
    gpu_slots: int = 1
    """The global budget: tasks running at once over all checkpoints (CPU workers count)."""
    starvation_s: float = 60.0
    """A checkpoint with backlog waits at most about this long for a slot."""
    poll_interval_s: float = 1.0
    idle_timeout_s: float = 300.0
    """A checkpoint without backlog for this long goes to zero workers."""
    max_batch: int = 0
    """Tasks one worker (slot) takes at once; compatible ones share a diffusers call.
    A function's ``maxBatch`` overrides it. 0: by device, :data:`GPU_MAX_BATCH` when the
    workers use CUDA (``device`` ``cuda…``, or ``auto`` on a host with an NVIDIA device),
    else :data:`CPU_MAX_BATCH`."""
    cache_dir: str = "./data/cache"
    device: str = "auto"
    """Device setting handed to local workers (``auto``, ``cpu``, ``cuda``)."""
    gpus: list[str] = msgspec.field(default_factory=list)
    """Local backend: GPUs to hand out, one per worker, as ``CUDA_VISIBLE_DEVICES``
    (``0,1,2,3`` or UUIDs); no more workers run than listed. Empty: no pinning."""
    worker_log_dir: str = "./data/logs"
    worker_preload: bool = True
    """Local backend: fork workers from a server process that has imported torch and
    diffusers once (services/scheduler/forkserver.py), instead of a fresh interpreter
    each: most of a worker's cold start is those imports."""
    lease_ttl_s: float = 6.0
    """Leader lease (several replicas): a leader that stops renewing is replaced within
    about this long; a deposed one stops acting before the others can take over."""
    worker_metrics_port: int = 0
    """Workers' ``SDSWARM_METRICS_PORT`` (0: off; -1: each picks a free port, which suits
    several workers on one host; the scheduler's ``/targets`` lists them)."""
    scheduler_backend: str = "local"
    """Where workers run: ``local`` (processes here) or ``swarm`` (Docker Swarm services)."""
    hung_after_s: float = 600.0
    """A worker holding a task whose last denoising step is older than this (while its
    heartbeat goes on) is hung: it is replaced and its task redelivered. 0: never."""
    # Swarm backend (scheduler_backend = "swarm"): one service per checkpoint.
    docker_url: str = "unix:///var/run/docker.sock"
    """Docker Engine API of a Swarm manager: ``unix:///path`` or ``http://host:port``."""
    docker_api_version: str = "1.44"
    """Engine API version every request names (``/v1.44/...``; Docker 25 and later)."""
    worker_image: str = "sdswarm/worker:latest"
    """Worker image, unless a function sets its own ``image``."""
    swarm_networks: list[str] = msgspec.field(default_factory=list)
    """Overlay networks workers join (attachable; the stack's, to reach NATS)."""
    swarm_mounts: list[str] = msgspec.field(default_factory=list)
    """Worker mounts ``source:target[:ro]``: a volume name, or a bind if it starts with /."""
    swarm_constraints: list[str] = msgspec.field(default_factory=list)
    """Placement constraints of worker tasks, e.g. ``node.labels.gpu==true``."""
    swarm_stack: str = ""
    """The stack the worker services belong to (label ``com.docker.stack.namespace``), so
    ``docker stack rm`` removes them with the stack; deploy/stack.yml sets its own name."""
    swarm_secrets: list[str] = msgspec.field(default_factory=list)
    """Docker secrets workers get, ``secret_name:file`` (mounted at ``/run/secrets/<file>``).
    A setting this scheduler reads from such a file (``SDSWARM_S3_SECRET_KEY_FILE=
    /run/secrets/s3_secret_key``) reaches workers as the same file, never as plain env."""
    swarm_gpus: int = 1
    """GPUs reserved per worker as Swarm generic resources (0: none, CPU workers)."""
    swarm_gpu_kind: str = "NVIDIA-GPU"
    """The generic-resource kind the nodes advertise (``node-generic-resources``)."""
    swarm_healthcheck: list[str] = msgspec.field(
        default_factory=lambda: ["python3.11", "-m", "services.scheduler.healthcheck"]
    )
    """Worker containers' healthcheck: unhealthy once hung (see healthcheck.py), so Swarm
    replaces them on any node. Empty: none."""


def default_max_batch(settings: SchedulerSettings) -> int:
    """The batch size of functions that set none (see ``max_batch``)."""
    if settings.max_batch > 0:
        return settings.max_batch
    device = settings.device.lower()
    cuda = device.startswith("cuda") or (device == "auto" and Path("/dev/nvidia0").exists())
    return GPU_MAX_BATCH if cuda else CPU_MAX_BATCH


def max_batch(settings: SchedulerSettings, model: Mapping[str, Any]) -> int:
    """Tasks one worker of ``model``'s pool takes at once (its function's ``maxBatch``)."""
    own = model.get("max_batch")
    return int(own) if isinstance(own, int) and own > 0 else default_max_batch(settings)
