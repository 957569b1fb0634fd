"""A worker's cold start, measured as consecutive phases from the process's own start.

The phases are laps: each runs from the end of the previous one (the first from the
moment the kernel started the process), so they add up to "process started → ready"
with no gap, and the interpreter's own start and every import are counted.

``imports``  interpreter, service imports, NATS connection, torch + diffusers imports
``fetch``    only when the checkpoint was copied from the object store into the cache
``hash``     only when the file was replaced after the registry's record was read: the
             worker hashes it (identity.py)
``device``   device selection and initialisation (CUDA context)
``config``   reading the checkpoint's header, family detection, config materialisation
``weights``  weights read, converted (or taken from the converted-weights cache), moved
             to the device
``warmup``   the first call (a one-step generation), which pays lazy initialisation
             (kernels, allocator) before the first task would; a compiled UNet
             compiles its shapes in the background after it, on no phase
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

PHASES = ("imports", "device", "config", "weights", "warmup")
_IMPORTED_AT = time.time()


def process_started_at(pid: int | None = None) -> float:
    """Unix time at which the kernel started the process (``/proc/<pid>/stat`` field 22,
    in clock ticks since boot); the import time of this module where /proc is absent."""
    try:
        stat = Path(f"/proc/{pid or 'self'}/stat").read_text()
        # The command name (field 2) may hold spaces and parentheses: split after it.
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
        return boot + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED_AT


class Phases:
    """Seconds per cold-start phase, filled by the loading thread, read by the loop."""

    def __init__(self, started_at: float | None = None) -> None:
        self.started_at = process_started_at() if started_at is None else started_at
        self._last = self.started_at
        self._seconds: dict[str, float] = {}
        self._lock = threading.Lock()
        self.weights_cached: bool | None = None
        """Whether the weights came from the converted-weights cache (None: not used)."""

    def lap(self, phase: str) -> float:
        """End ``phase`` now: it lasted since the end of the previous one."""
        now = time.time()
        with self._lock:
            seconds = max(now - self._last, 0.0)
            self._seconds[phase] = round(self._seconds.get(phase, 0.0) + seconds, 3)
            self._last = now
        return seconds

    def seconds(self) -> dict[str, float]:
        with self._lock:
            return dict(self._seconds)

    def total(self) -> float:
        return round(sum(self.seconds().values()), 3)
