"""How long a consumer waits for more messages (``consumer.batches``' linger)."""

from __future__ import annotations

import asyncio
from typing import Any

from nats.aio.msg import Msg

from proto import names
from proto.events import TaskProgressed, encode_event, event_kind
from services.common import consumer


def _message(event: Any) -> Msg:
    subject = names.event_subject(event.task_id, event_kind(event))
    return Msg(_client=None, subject=subject, data=encode_event(event))  # type: ignore[arg-type]


class _Subscription:
    """A pull subscription (a unit boundary): ``arrivals`` come in one per fetch."""

    def __init__(self, arrivals: list[list[Msg]]) -> None:
        self.arrivals = arrivals
        self.fetches = 0

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:  # noqa: ASYNC109
        self.fetches += 1
        if not self.arrivals:
            await asyncio.sleep(timeout)
            raise TimeoutError
        return self.arrivals.pop(0)[:batch]


def _progress(step: int, skipped: bool = False) -> Msg:
    return _message(TaskProgressed(task_id="t1", step=step, total_steps=9, skipped=skipped))


async def _first_batch(subscription: _Subscription, **linger: Any) -> list[Msg]:
    stop = asyncio.Event()
    batches = consumer.batches(subscription, stop, consumer.fixed(64), **linger)
    try:
        return await anext(batches)
    finally:
        await batches.aclose()


async def test_a_linger_gathers_what_arrives_in_several_fetches() -> None:
    subscription = _Subscription([[_progress(1)], [_progress(2)], [_progress(3)]])
    got = await _first_batch(subscription, linger_s=0.05)
    assert 3 == len(got), "one fetch returns as soon as anything arrives: it fetches on"


async def test_without_a_linger_one_fetch_is_a_batch() -> None:
    subscription = _Subscription([[_progress(1)], [_progress(2)]])
    assert 1 == len(await _first_batch(subscription))
