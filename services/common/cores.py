"""How many CPU cores a process may use, and how many compute threads a worker on the
CPU gets from them."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on (its affinity, which a container's cpuset
    narrows; a ``--cpus`` quota does not), else the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def compute_threads(cores: int, workers: int = 1) -> int:
    """Torch threads for each of ``workers`` CPU workers sharing ``cores``: all cores
    but one, shared out, at least 1. Torch's threads wait for each other at every
    operation, so one descheduled (by the worker's event loop, the services beside it,
    or another worker's threads) stalls them all: one core stays for the rest."""
    return max((cores - 1) // max(workers, 1), 1)
