"""Keep a long-running loop alive (log its crash with the traceback and restart it), and
children from outliving their parent."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


async def supervised(
    name: str, run: Callable[[], Awaitable[None]], stop: asyncio.Event, backoff_s: float = 1.0
) -> None:
    """Run ``run()`` until ``stop`` is set; a crash is logged and retried after a pause."""
    while not stop.is_set():
        try:
            await run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s crashed; restarting in %.0f s", name, backoff_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff_s)


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT: how every service's main loop learns to stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


PR_SET_PDEATHSIG = 1
"""``prctl`` option: the signal the kernel sends a process when its parent dies."""


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send ``sig`` to the child when this process dies,
    however it dies (kill -9 included), so no server or worker outlives ``sdswarm up``.

    Linux only (None elsewhere: children are then stopped only on a clean exit). The death
    signal follows the thread that started the child; asyncio starts children from the
    event loop's thread, which lives as long as the process does.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork, not in the child
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: nobody will signal us
            os.kill(os.getpid(), sig)

    return preexec
