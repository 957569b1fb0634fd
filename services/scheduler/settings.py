"""Scheduler settings (``SDSWARM_*``)."""

from __future__ import annotations

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
    worker_log_dir: str = "./data/logs"
    lease_ttl_s: float = 6.0
    """Leader lease (several replicas): a leader that stops renewing is replaced within
    about this long; a deposed one stops acting before the others can take over."""
    scheduler_backend: str = "local"
    """Where workers run: ``local`` (processes here) or ``swarm`` (Docker Swarm services)."""
