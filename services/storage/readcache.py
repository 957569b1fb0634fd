"""Reads remembered for a moment: the registry and options lookups of every submission.

Each submission reads its checkpoint, the embeddings it might mention and its owner's
options; under load those reads were a fifth of the task store's commands. A
:class:`ReadCache` answers them from memory for ``ttl_s``. Writes through the same store
forget everything at once, so this process never reads its own writes stale; writes by
other processes (another gateway replica, the storage service finishing a registration,
the scheduler's model status) show within ``ttl_s``. ``ttl_s = 0`` turns it off.
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

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
        """Drop every entry (after a write through this process)."""
        self._entries.clear()
        self._generation += 1
