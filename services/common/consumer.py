"""The one consumer loop: fetching from a JetStream pull consumer and settling messages.

Every service that consumes (the workers, the event sink, dead letters, webhooks) reads
its messages through :func:`batches` and settles each one through :func:`settle`:
handlers never ack; they return (ack), raise :class:`Retry` (nak with a delay: come
again later) or :class:`Poison` (term: no attempt can ever succeed). Any other error
leaves the message unsettled, so JetStream redelivers it after ``ack_wait``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable

from nats.aio.msg import Msg
from nats.js import JetStreamContext

log = logging.getLogger(__name__)


class Retry(Exception):
    """Give the message back; it comes again after ``delay_s``."""

    def __init__(self, delay_s: float, reason: str = "") -> None:
        super().__init__(reason)
        self.delay_s = delay_s


class Poison(Exception):
    """The message can never be handled (undecodable): terminate it."""


async def settle(message: Msg, handling: Awaitable[None]) -> bool:
    """Await the handling of ``message``, then ack it, nak it (:class:`Retry`) or term it
    (:class:`Poison`). Whether it was acked."""
    try:
        await handling
    except Poison as exc:
        log.error("terminating a message on %s: %s", message.subject, exc)
        await message.term()
        return False
    except Retry as exc:
        if str(exc):
            log.warning("%s: retry in %g s: %s", message.subject, exc.delay_s, exc)
        await message.nak(delay=exc.delay_s)
        return False
    await message.ack()
    return True


Room = Callable[[], Awaitable[int]]
"""How many messages to fetch next; may wait until there is room for any."""


def fixed(size: int) -> Room:
    async def room() -> int:
        return size

    return room


async def batches(
    subscription: JetStreamContext.PullSubscription,
    stop: asyncio.Event,
    room: Room,
    *,
    timeout_s: float | Callable[[], float] = 1.0,
    linger_s: float = 0.0,
    linger_while: Callable[[list[Msg]], bool] | None = None,
    idle: bool = False,
) -> AsyncGenerator[list[Msg], None]:
    """Messages as they come, until ``stop``: what is queued now (up to ``room()``), plus
    what arrives within ``linger_s`` after the first, for as long as ``linger_while``
    says the messages so far are worth waiting on (default: always). With ``idle``, an
    empty list after each ``timeout_s`` without messages (for idle accounting, or a
    consumer's own deadlines: ``timeout_s`` may be a function, asked before each fetch).
    Unsubscribes at the end."""
    try:
        while not stop.is_set():
            want = await room()
            if stop.is_set():
                break
            timeout = timeout_s() if callable(timeout_s) else timeout_s
            try:
                messages = await subscription.fetch(want, timeout=timeout)
            except TimeoutError:  # nats raises its own subclass or the builtin, by code path
                if idle:
                    yield []
                continue
            if linger_s > 0 and len(messages) < want:
                messages = await _lingered(subscription, messages, want, linger_s, linger_while)
            yield messages
    finally:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()


MIN_FETCH_S = 0.005
"""A linger with less than this left ends: a shorter fetch is all overhead."""


async def _lingered(
    subscription: JetStreamContext.PullSubscription,
    messages: list[Msg],
    want: int,
    linger_s: float,
    linger_while: Callable[[list[Msg]], bool] | None,
) -> list[Msg]:
    """``messages`` and what arrives within ``linger_s``, up to ``want`` in all, while
    ``linger_while`` holds. One fetch returns as soon as anything arrives, so this
    fetches until the time is up."""
    messages = list(messages)
    deadline = time.monotonic() + linger_s
    while len(messages) < want and (linger_while is None or linger_while(messages)):
        left = deadline - time.monotonic()
        if left < MIN_FETCH_S:
            break
        try:
            messages += await subscription.fetch(want - len(messages), timeout=left)
        except TimeoutError:
            break
    return messages
