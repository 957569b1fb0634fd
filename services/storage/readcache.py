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
"""

from __future__ import annotations

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
        generation = self._generation
        value = await read()
        if generation == self._generation:
            self._entries[key] = (now, copy.deepcopy(value))
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return value

    def forget(self) -> None:
        """Drop every entry (a write here, or another process's notice of one)."""
        self._entries.clear()
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
