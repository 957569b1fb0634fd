"""Keep a long-running loop alive: log its crash with the traceback and restart it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
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
