"""Reads remembered for a moment: the registry and options lookups of every submission.

Each submission reads its checkpoint, the embeddings it might mention and its owner's
options; under load those reads were a fifth of the task store's commands. A
:class:`ReadCache` answers them from memory for ``ttl_s``. A write through a store
forgets everything at once, so this process never reads its own writes stale, and
announces itself (``announce``: ``sd.registry.changed`` on NATS), so that every gateway
forgets too: writes by other processes (another gateway replica, the storage service
finishing a registration, the scheduler's model status) show at once. A gateway also
forgets when it reconnects to NATS (notices sent while it was away are lost); ``ttl_s``
bounds any other lost notice. ``ttl_s = 0`` turns it off.

Callers that miss the same entry at once share one read: when an entry expires under
load, the submissions in flight (32 at queue depth 32) would otherwise each read it
(``bench/control_plane.py --sites`` counted 0.29 model and 0.28 options reads per task).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
SIZE = 1024
"""Entries kept at most (the oldest go first)."""


class ReadCache:
    def __init__(
        self, ttl_s: float, *, size: int = SIZE, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s, self.size, self.clock = ttl_s, size, clock
        self._entries: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self._generation = 0
        """Counts :meth:`forget` calls: a read that began before one is not kept."""
        self._reading: dict[Hashable, asyncio.Task[Any]] = {}
        """Reads on their way, shared by the callers that miss their key meanwhile."""
        self.announce: Callable[[], Awaitable[None]] | None = None
        """Tells the other processes of a write (see :meth:`wrote`); set once the
        process has its NATS connection."""

    async def get(self, key: Hashable, read: Callable[[], Awaitable[T]]) -> T:
        """``read()``'s answer, from memory while fresh; a copy each time, so a caller
        that changes what it got changes nobody else's answer."""
        if self.ttl_s <= 0:
            return await read()
        now = self.clock()
        entry = self._entries.get(key)
        if entry is not None and now - entry[0] < self.ttl_s:
            return copy.deepcopy(entry[1])  # type: ignore[no-any-return]
        reading = self._reading.get(key)
        if reading is not None:  # another caller's read of it is on its way: share it
            return copy.deepcopy(await asyncio.shield(reading))  # type: ignore[no-any-return]
        reading = asyncio.ensure_future(self._read(key, read, now, self._generation))
        self._reading[key] = reading
        # Its outcome is taken here, or by the callers sharing it; one that all of them
        # stopped waiting for (cancelled) must not be reported as never retrieved.
        reading.add_done_callback(_retrieved)
        return copy.deepcopy(await asyncio.shield(reading))  # type: ignore[no-any-return]

    async def _read(
        self, key: Hashable, read: Callable[[], Awaitable[T]], now: float, generation: int
    ) -> T:
        try:
            value = await read()
        finally:
            if self._reading.get(key) is asyncio.current_task():
                del self._reading[key]
        if generation == self._generation:
            self._entries[key] = (now, copy.deepcopy(value))
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return value

    def forget(self) -> None:
        """Drop every entry (a write here, or another process's notice of one). A read
        on its way is not shared any more: a caller from now on reads afresh."""
        self._entries.clear()
        self._reading.clear()
        self._generation += 1

    async def wrote(self) -> None:
        """After a write through the store: forget, and tell the other processes. The
        write stands whatever happens to the notice (``ttl_s`` bounds a lost one)."""
        self.forget()
        if self.announce is not None:
            try:
                await self.announce()
            except Exception as exc:  # the notice is a nicety: the TTL bounds a lost one
                log.warning("registry change notice not sent: %s", exc)


def _retrieved(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
