"""Fetching from a durable pull consumer (``consumer.Puller``) on a real nats-server.

A fetch returns as soon as a message arrives, with what is pending beside it, even right
after a fetch that timed out; nats.py's own fetch then sometimes held on to its whole
timeout (the server's late 408 for the timed-out request, read as the answer to the next
one). A fetch that is cancelled leaves no request behind."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig
from nats.js.errors import APIError

from services.common import bus
from services.common.consumer import Puller
from tests.waiting import eventually

pytestmark = pytest.mark.integration
STREAM, SUBJECT = "PULLS", "pulls.x"


@pytest.fixture
async def nc(private_nats_url: str) -> AsyncIterator[Client]:
    client = await bus.connect(private_nats_url, "puller-test")
    await client.jetstream().add_stream(StreamConfig(name=STREAM, subjects=["pulls.>"]))
    try:
        yield client
    finally:
        await client.close()


async def _puller(nc: Client) -> Puller:
    config = ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=30)
    return await Puller.durable(nc, "pulls.>", stream=STREAM, durable="c", config=config)


async def test_a_fetch_returns_when_a_message_comes_even_after_one_timed_out(
    nc: Client,
) -> None:
    puller = await _puller(nc)
    js = nc.jetstream()
    timeout_s = 5.0
    for attempt in range(30):
        with pytest.raises(TimeoutError):
            # Short and timed out: its 408 comes about when the next fetch starts.
            await puller.fetch(64, timeout=0.005 + (attempt % 5) * 0.001)

        async def later() -> None:
            await asyncio.sleep(0.02)
            await js.publish(SUBJECT, b"x")

        publishing = asyncio.create_task(later())
        started = time.monotonic()
        messages = await puller.fetch(64, timeout=timeout_s)
        took = time.monotonic() - started
        await publishing
        assert 1 == len(messages)
        await messages[0].ack()
        assert took < timeout_s / 2, f"attempt {attempt}: held for {took:.2f} s"


async def test_a_fetch_takes_what_is_pending_up_to_its_batch(nc: Client) -> None:
    puller = await _puller(nc)
    for n in range(5):
        await nc.jetstream().publish(SUBJECT, str(n).encode())
    first = await puller.fetch(3, timeout=1)
    rest = await puller.fetch(64, timeout=1)
    assert [b"0", b"1", b"2"] == [m.data for m in first]
    assert [b"3", b"4"] == [m.data for m in rest]
    for message in first + rest:
        await message.ack()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await puller.fetch(64, timeout=0.3)
    assert time.monotonic() - started >= 0.25, "an idle fetch lasts its timeout"


async def test_a_cancelled_fetch_leaves_no_request_to_swallow_a_message(nc: Client) -> None:
    """A fetch cancelled while it waits (a consumer stopping) drops its inbox: the server
    does not deliver the next message to that request, which nobody would ack before its
    ack_wait (30 s here); the next fetch gets it at once."""
    puller = await _puller(nc)
    js = nc.jetstream()
    fetching = asyncio.create_task(puller.fetch(64, timeout=5))

    async def held() -> bool:
        info = await js.consumer_info(STREAM, "c")
        return bool(info.num_waiting == 1)

    await eventually(held, "the server holds the request", timeout_s=5, interval_s=0.01)
    fetching.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await fetching
    await js.publish(SUBJECT, b"next")
    again = await puller.fetch(64, timeout=2)
    assert [b"next"] == [m.data for m in again]


async def test_a_fetch_from_a_consumer_that_is_gone_says_so(nc: Client) -> None:
    puller = await _puller(nc)
    await nc.jetstream().delete_consumer(STREAM, "c")
    with pytest.raises(APIError):
        await puller.fetch(4, timeout=1)
