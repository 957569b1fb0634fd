"""GroupWriter's batching against a stand-in collection (the real server's per-write
outcomes are in tests/integration/test_groupwrite.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from services.storage.groupwrite import GroupWriter


class _Collection:
    """Records each bulk_write's size; blocks them while ``gate`` is unset."""

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
