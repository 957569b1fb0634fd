"""The read cache in front of the registry and options lookups of every submission."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from services.storage.readcache import ReadCache


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Source:
    """Counts reads; answers the current value."""

    def __init__(self) -> None:
        self.value: dict[str, Any] = {"status": "unloaded"}
        self.reads = 0

    async def read(self) -> dict[str, Any]:
        self.reads += 1
        return dict(self.value)


Read = Callable[[], Awaitable[dict[str, Any]]]


def _after(release: asyncio.Event, answer: Read) -> Read:
    """A read that answers once ``release`` is set."""

    async def read() -> dict[str, Any]:
        await release.wait()
        return await answer()

    return read


async def _old() -> dict[str, Any]:
    return {"status": "old"}


async def test_answers_from_memory_until_the_ttl_passes() -> None:
    clock, source = _Clock(), _Source()
    cache = ReadCache(1.0, clock=clock)
    assert {"status": "unloaded"} == await cache.get("m", source.read)
    source.value = {"status": "loaded"}
    clock.now = 0.9
    assert {"status": "unloaded"} == await cache.get("m", source.read)
    assert 1 == source.reads
    clock.now = 1.0
    assert {"status": "loaded"} == await cache.get("m", source.read)
    assert 2 == source.reads


async def test_forget_makes_the_next_read_fresh() -> None:
    clock, source = _Clock(), _Source()
    cache = ReadCache(10.0, clock=clock)
    await cache.get("m", source.read)
    source.value = {"status": "deleted"}
    cache.forget()
    assert {"status": "deleted"} == await cache.get("m", source.read)


async def test_a_read_that_began_before_forget_is_not_kept() -> None:
    """A read racing a write: its (possibly old) answer is returned but not remembered."""
    cache, source = ReadCache(10.0, clock=_Clock()), _Source()
    release = asyncio.Event()
    slow_read = _after(release, _old)

    pending = asyncio.create_task(cache.get("m", slow_read))
    await asyncio.sleep(0)
    cache.forget()
    release.set()
    assert {"status": "old"} == await pending
    assert {"status": "unloaded"} == await cache.get("m", source.read)


async def test_callers_get_copies() -> None:
    cache, source = ReadCache(10.0, clock=_Clock()), _Source()
    first = await cache.get("m", source.read)
    first["status"] = "changed by a caller"
    assert {"status": "unloaded"} == await cache.get("m", source.read)


async def test_zero_ttl_reads_every_time_and_size_is_bounded() -> None:
    source = _Source()
    off = ReadCache(0.0)
    await off.get("m", source.read)
    await off.get("m", source.read)
    assert 2 == source.reads
    small = ReadCache(10.0, size=2, clock=_Clock())
    for key in ("a", "b", "c"):
        await small.get(key, source.read)
    reads = source.reads
    await small.get("a", source.read)  # the oldest went first
    assert reads + 1 == source.reads


async def test_a_write_forgets_and_tells_the_other_processes() -> None:
    cache, source = ReadCache(10.0, clock=_Clock()), _Source()
    told: list[str] = []

    async def announce() -> None:
        told.append("changed")

    cache.announce = announce
    await cache.get("m", source.read)
    source.value = {"status": "deleted"}
    await cache.wrote()
    assert ["changed"] == told
    assert {"status": "deleted"} == await cache.get("m", source.read)


async def test_a_lost_notice_does_not_fail_the_write(caplog: Any) -> None:
    cache = ReadCache(10.0, clock=_Clock())

    async def announce() -> None:
        raise ConnectionError("nats is away")

    cache.announce = announce
    await cache.wrote()
    assert "notice not sent" in caplog.text


async def test_callers_that_miss_at_once_share_one_read() -> None:
    """A burst of submissions finding an entry expired reads it once, each caller
    getting its own copy; a read that fails fails for each of them."""
    cache, source = ReadCache(10.0, clock=_Clock()), _Source()
    release = asyncio.Event()
    slow_read = _after(release, source.read)

    pending = [asyncio.create_task(cache.get("m", slow_read)) for _ in range(8)]
    await asyncio.sleep(0)
    release.set()
    answers = await asyncio.gather(*pending)
    assert 1 == source.reads
    assert [{"status": "unloaded"}] * 8 == answers
    answers[0]["status"] = "changed by a caller"
    assert {"status": "unloaded"} == answers[1]

    async def failing_read() -> dict[str, Any]:
        await asyncio.sleep(0)
        raise ConnectionError("MongoDB is away")

    failing = [asyncio.create_task(cache.get("other", failing_read)) for _ in range(3)]
    outcomes = await asyncio.gather(*failing, return_exceptions=True)
    assert all(isinstance(o, ConnectionError) for o in outcomes)
    assert {"status": "unloaded"} == await cache.get("other", source.read)  # read afresh


async def test_a_caller_after_forget_does_not_share_an_older_read() -> None:
    cache, source = ReadCache(10.0, clock=_Clock()), _Source()
    release = asyncio.Event()
    slow_read = _after(release, _old)

    older = asyncio.create_task(cache.get("m", slow_read))
    await asyncio.sleep(0)
    cache.forget()  # a write: what was on its way may be stale
    assert {"status": "unloaded"} == await cache.get("m", source.read)
    release.set()
    assert {"status": "old"} == await older


async def test_a_shared_read_goes_on_when_its_first_caller_is_cancelled() -> None:
    cache, source = ReadCache(10.0, clock=_Clock()), _Source()
    release = asyncio.Event()
    slow_read = _after(release, source.read)

    first = asyncio.create_task(cache.get("m", slow_read))
    await asyncio.sleep(0)
    second = asyncio.create_task(cache.get("m", slow_read))
    await asyncio.sleep(0)
    first.cancel()
    release.set()
    assert {"status": "unloaded"} == await second
    assert 1 == source.reads
