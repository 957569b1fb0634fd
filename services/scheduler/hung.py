"""Hung-worker detection: alive (its liveness record is fresh) but making no progress.

A worker holding a task writes ``last_step_at`` at every denoising step. Times are
compared on the scheduler's own clock: what it remembers is when it last *saw* a
worker's (task, last step) pair change, so clock skew between machines does not matter,
and a task that has just started (new task id) is never judged by its predecessor's
last step. A replica that has just become leader starts remembering from scratch: it
needs ``limit`` seconds of its own observation before it calls a worker hung.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proto.workers import WorkerState, WorkerStatus

ALIVE_S = 15.0
"""A record whose heartbeat (``updated_at``) has not changed for this long belongs to a
worker that died, not one that hangs (its record expires; the backend restarts it)."""


@dataclass
class _Seen:
    mark: tuple[str, float | None]
    since: float
    beat: float
    beat_seen: float


@dataclass
class StepWatch:
    limit_s: float
    """No visible progress for this long while holding a task: hung. 0: never."""
    _seen: dict[str, _Seen] = field(default_factory=dict)
    _handled: set[str] = field(default_factory=set)

    def hung(self, records: list[WorkerStatus], now: float) -> list[WorkerStatus]:
        """The workers among ``records`` (the live ones) that are hung at ``now``."""
        found = []
        busy: set[str] = set()
        for record in records:
            if record.state is not WorkerState.BUSY or record.task_id is None:
                continue
            busy.add(record.worker)
            mark = (record.task_id, record.last_step_at)
            seen = self._seen.get(record.worker)
            if seen is None or seen.mark != mark:
                self._seen[record.worker] = _Seen(mark, now, record.updated_at, now)
                continue
            if seen.beat != record.updated_at:
                seen.beat, seen.beat_seen = record.updated_at, now
            alive = now - seen.beat_seen < ALIVE_S
            if (
                self.limit_s
                and alive
                and now - seen.since >= self.limit_s
                and record.worker not in self._handled
            ):
                found.append(record)
        for worker in set(self._seen) - busy:  # idle again, or gone
            del self._seen[worker]
        self._handled &= busy
        return found

    def handled(self, worker: str) -> None:
        """Replaced (or tried): not reported again while its record lasts."""
        self._handled.add(worker)
