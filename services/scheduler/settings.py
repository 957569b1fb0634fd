"""Scheduler settings (``SDSWARM_*``)."""

from __future__ import annotations

import msgspec

from services.common.settings import StoreSettings


class SchedulerSettings(StoreSettings, kw_only=True, frozen=True):
    gpu_slots: int = 1
    """The global budget: tasks running at once over all checkpoints (CPU workers count)."""
    starvation_s: float = 60.0
    """A checkpoint with backlog waits at most about this long for a slot."""
    poll_interval_s: float = 1.0
    idle_timeout_s: float = 300.0
    """A checkpoint without backlog for this long goes to zero workers."""
    cache_dir: str = "./data/cache"
    device: str = "auto"
    """Device setting handed to local workers (``auto``, ``cpu``, ``cuda``)."""
    gpus: list[str] = msgspec.field(default_factory=list)
    """Local backend: GPUs to hand out, one per worker, as ``CUDA_VISIBLE_DEVICES``
    (``0,1,2,3`` or UUIDs); no more workers run than listed. Empty: no pinning."""
    worker_log_dir: str = "./data/logs"
    lease_ttl_s: float = 6.0
    """Leader lease (several replicas): a leader that stops renewing is replaced within
    about this long; a deposed one stops acting before the others can take over."""
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
    swarm_gpus: int = 1
    """GPUs reserved per worker as Swarm generic resources (0: none, CPU workers)."""
    swarm_gpu_kind: str = "NVIDIA-GPU"
    """The generic-resource kind the nodes advertise (``node-generic-resources``)."""
    swarm_healthcheck: list[str] = msgspec.field(
        default_factory=lambda: ["python3.11", "-m", "services.scheduler.healthcheck"]
    )
    """Worker containers' healthcheck: unhealthy once hung (see healthcheck.py), so Swarm
    replaces them on any node. Empty: none."""
