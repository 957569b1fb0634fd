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


def restart_delay(crashes: int, backoff_s: float, max_backoff_s: float) -> float:
    """The pause before restart number ``crashes`` (1-based) of a loop that keeps crashing:
    ``backoff_s`` doubled each time, at most ``max_backoff_s``."""
    return float(min(backoff_s * 2 ** min(crashes - 1, 32), max_backoff_s))


async def supervised(
    name: str,
    run: Callable[[], Awaitable[None]],
    stop: asyncio.Event,
    backoff_s: float = 1.0,
    max_backoff_s: float = 30.0,
) -> None:
    """Run ``run()`` until ``stop`` is set; a crash is logged and retried after a pause
    that grows while it keeps crashing (:func:`restart_delay`) and starts over once a
    run has lasted ``max_backoff_s``."""
    crashes = 0
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        started = loop.time()
        try:
            await run()
        except asyncio.CancelledError:
            raise
        except Exception:
            crashes = 1 if loop.time() - started >= max_backoff_s else crashes + 1
            delay = restart_delay(crashes, backoff_s, max_backoff_s)
            log.exception("%s crashed; restarting in %.3g s", name, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)


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
