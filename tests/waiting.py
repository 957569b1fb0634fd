"""The one way tests wait for something to happen: poll a check until it holds.

Every tier uses it (``System.task_when`` is built on it), so a wait always ends in an
assertion that says what never happened, never in a silent fall-through.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiohttp

T = TypeVar("T")


async def eventually(
    check: Callable[[], Awaitable[T | None]],
    what: str = "condition",
    *,
    timeout_s: float = 60,
    interval_s: float = 0.05,
) -> T:
    """The first truthy result of ``check``, polled every ``interval_s``; an
    AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not met in {timeout_s:g} s (last: {result!r})")
        await asyncio.sleep(interval_s)


async def until_read(
    read: Callable[[], Awaitable[object]],
    wanted: object,
    what: str = "condition",
    *,
    timeout_s: float = 60,
    interval_s: float = 0.05,
) -> None:
    """:func:`eventually` for a read (a status, a count, a setting) that must come to
    equal ``wanted``; the failure shows the last value read."""
    seen: list[object] = []

    async def equal() -> bool:
        seen[:] = [await read()]
        return seen[0] == wanted

    try:
        await eventually(equal, what, timeout_s=timeout_s, interval_s=interval_s)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; read {seen[0]!r}, wanted {wanted!r}") from None


async def until(
    predicate: Callable[[], bool],
    what: str = "condition",
    *,
    timeout_s: float = 60,
    interval_s: float = 0.05,
) -> float:
    """:func:`eventually` for a plain predicate over state the test holds; the seconds
    it took."""
    started = time.monotonic()

    async def holds() -> bool:
        return predicate()

    await eventually(holds, what, timeout_s=timeout_s, interval_s=interval_s)
    return time.monotonic() - started


async def serving(
    http: aiohttp.ClientSession,
    url: str,
    process: asyncio.subprocess.Process | None = None,
    timeout_s: float = 60,
) -> None:
    """Until ``{url}/healthz`` answers 200 (a gateway just started); fails at once when
    its ``process`` has exited."""

    async def healthy() -> bool:
        assert process is None or process.returncode is None, f"{url}: the process exited"
        try:
            async with http.get(f"{url}/healthz") as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    await eventually(healthy, f"{url} serving", timeout_s=timeout_s, interval_s=0.1)
