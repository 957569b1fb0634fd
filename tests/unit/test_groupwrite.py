"""GroupWriter's batching against a stand-in collection (the real server's per-write
outcomes are in tests/integration/test_groupwrite.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from services.storage.groupwrite import GroupWriter


class _Collection:
    """Records each bulk_write's size; blocks them while ``gate`` is unset."""

    name = "stand-in"

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.gate = asyncio.Event()

    async def bulk_write(self, requests: list[Any], ordered: bool) -> None:
        assert not ordered
        self.sizes.append(len(requests))
        await self.gate.wait()


async def _run_ready() -> None:
    """Let every task that can run now run (no clock involved: the collection blocks)."""
    for _ in range(10):
        await asyncio.sleep(0)


def test_writes_pile_up_behind_the_one_in_flight() -> None:
    async def main() -> list[int]:
        collection = _Collection()
        writes = GroupWriter(collection, max_batch=4)  # type: ignore[arg-type]
        first = asyncio.create_task(writes.insert_one({"_id": 0}))
        await asyncio.sleep(0)
        rest = [asyncio.create_task(writes.insert_one({"_id": n})) for n in range(1, 7)]
        await _run_ready()
        collection.gate.set()
        await asyncio.gather(first, *rest)
        return collection.sizes

    # The first alone at once; the six behind it in batches of at most four.
    assert [1, 4, 2] == asyncio.run(main())


def test_a_writer_outlives_an_event_loop_closed_under_it() -> None:
    """Tests run an event loop each; one closed while writes were pending (its tasks
    never cancelled) must not hold up the writes of the next."""
    collection = _Collection()
    writes = GroupWriter(collection)  # type: ignore[arg-type]
    old = asyncio.new_event_loop()

    async def stranded() -> list[asyncio.Task[None]]:
        in_flight = old.create_task(writes.insert_one({"_id": 0}))
        await _run_ready()
        behind = old.create_task(writes.insert_one({"_id": 1}))
        await _run_ready()
        return [in_flight, behind]

    assert not any(task.done() for task in old.run_until_complete(stranded()))
    old.close()

    async def later() -> None:
        collection.gate = asyncio.Event()  # the stranded write waits on the old one
        collection.gate.set()
        await asyncio.wait_for(writes.insert_one({"_id": "next"}), 5)

    asyncio.run(later())
    assert [1, 1] == collection.sizes


def test_a_write_cancelled_before_it_left_is_not_sent() -> None:
    async def main() -> list[int]:
        collection = _Collection()
        writes = GroupWriter(collection)  # type: ignore[arg-type]
        first = asyncio.create_task(writes.insert_one({"_id": 0}))
        await asyncio.sleep(0)  # in flight
        behind = [asyncio.create_task(writes.insert_one({"_id": n})) for n in (1, 2)]
        await asyncio.sleep(0)
        behind[0].cancel()
        collection.gate.set()
        await asyncio.gather(first, behind[1])
        return collection.sizes

    assert [1, 1] == asyncio.run(main())


class _Failing(_Collection):
    async def bulk_write(self, requests: list[Any], ordered: bool) -> None:
        await super().bulk_write(requests, ordered)
        raise ConnectionError("the server went away")


def test_deferred_writes_linger_for_company_and_drain_waits_for_them() -> None:
    async def main() -> tuple[list[int], bool]:
        collection = _Collection()
        collection.gate.set()
        # A linger far longer than the 5 ms of asking, so a slow machine keeps the order.
        writes = GroupWriter(collection, linger_s=0.5)  # type: ignore[arg-type]
        for n in range(5):
            writes.update_later({"_id": n}, {"$set": {"seq": n}})
            await asyncio.sleep(0.001)  # asked for one after another, not at once
        sent_before_drain = list(collection.sizes)
        await writes.drain()
        return collection.sizes, sent_before_drain == []

    sizes, nothing_sent_before = asyncio.run(main())
    assert nothing_sent_before, "a deferred write waits out the linger"
    assert [5] == sizes, "the five went in one command"


def test_drain_does_not_wait_out_the_linger() -> None:
    """A gateway stopping sends what lingers at once (a linger of 60 s, a drain given 30)."""

    async def main() -> list[int]:
        collection = _Collection()
        collection.gate.set()
        writes = GroupWriter(collection, linger_s=60)  # type: ignore[arg-type]
        writes.update_later({"_id": 1}, {"$set": {"seq": 1}})
        await _run_ready()
        await asyncio.wait_for(writes.drain(), 30)
        return collection.sizes

    assert [1] == asyncio.run(main())


def test_a_deferred_write_that_fails_is_logged_not_raised(caplog: Any) -> None:
    async def main() -> None:
        collection = _Failing()
        collection.gate.set()
        writes = GroupWriter(collection)  # type: ignore[arg-type]
        writes.update_later({"_id": 1}, {"$set": {"seq": 1}})
        await writes.drain()

    asyncio.run(main())
    assert "a deferred write to" in caplog.text
    assert "the server went away" in caplog.text


def test_a_loop_closing_during_the_linger_leaves_no_write_waiting() -> None:
    async def main() -> list[asyncio.Future[None]]:
        writes = GroupWriter(_Collection(), linger_s=10)  # type: ignore[arg-type]
        waiting = asyncio.ensure_future(writes.insert_one({"_id": 0}))
        await _run_ready()
        assert writes._sender is not None
        writes._sender.cancel()
        await _run_ready()
        return [waiting]

    [waiting] = asyncio.run(main())
    assert waiting.cancelled()
