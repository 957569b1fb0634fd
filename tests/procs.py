"""The processes on this machine, read from ``/proc`` (Linux), for tests that check
that nothing is left running."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Proc:
    pid: int
    name: str
    state: str
    """``Z`` for a zombie: dead, waiting for its parent to reap it."""
    ppid: int
    pgrp: int


def processes() -> Iterator[Proc]:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after ")".
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        yield Proc(int(entry.name), name, state, int(ppid), int(pgrp))
