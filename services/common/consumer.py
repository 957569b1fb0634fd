"""The one consumer loop: fetching from a JetStream pull consumer and settling messages.

Every service that consumes (the workers, the event sink, dead letters, webhooks) reads
its messages through :func:`batches` (fetching with a :class:`Puller`) and settles each
one through :func:`settle`: handlers never ack; they return (ack), raise :class:`Retry`
(nak with a delay: come again later) or :class:`Poison` (term: no attempt can ever
succeed). Any other error leaves the message unsettled, so JetStream redelivers it after
``ack_wait``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Protocol

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig
from nats.js.errors import APIError, NotFoundError

log = logging.getLogger(__name__)

ANSWER_GRACE_S = 1.0
"""How long past a pull request's ``expires`` its fetch waits for the server's answer
(the 408 that ends an idle request) before it gives up on a connection in trouble."""


class Fetcher(Protocol):
    async def fetch(self, batch: int, timeout: float) -> list[Msg]:  # noqa: ASYNC109
        """Up to ``batch`` messages; TimeoutError when none came within ``timeout``."""
        ...


class Puller:
    """The messages of one durable pull consumer, each fetch a pull request of its own.

    nats.py's ``PullSubscription.fetch`` sends every request from one inbox. When a fetch
    times out a moment before the server's 408 (Request Timeout) arrives, that 408 stays
    in the inbox, and the next fetch takes it for the answer to its own first request (no
    messages): it then sends a request that, once anything arrives, holds until its whole
    timeout. The event sink, whose fetches end every few milliseconds while it holds
    progress events, answered sync requests 100-180 ms late on whole runs of
    ``bench/system_overhead.py`` this way.

    Here each request has its own inbox and is answered by the server alone: ``no_wait``
    with ``expires`` waits for the first message, delivers what is pending with it and
    ends with a 404; an idle request ends with a 408 at ``expires``; a full batch ends it
    too. A fetch waits for that end, so no request it made outlives it (one given up on,
    after :data:`ANSWER_GRACE_S`, has no interest left, and the server drops it rather
    than deliver to it)."""

    def __init__(self, nc: Client, stream: str, durable: str, api_prefix: str = "$JS.API"):
        self.nc = nc
        self.subject = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{durable}"

    @classmethod
    async def durable(
        cls,
        nc: Client,
        subject: str,
        *,
        stream: str,
        durable: str,
        config: ConsumerConfig | None = None,
    ) -> Puller:
        """The durable consumer ``durable`` of ``stream``, created with ``config`` (and
        ``subject`` as its filter) when missing; an existing one is used as it is."""
        js = nc.jetstream()
        try:
            await js.consumer_info(stream, durable)
        except NotFoundError:
            config = copy.copy(config) if config is not None else ConsumerConfig()
            config.durable_name = durable
            if not config.filter_subjects:
                config.filter_subject = config.filter_subject or subject
            await js.add_consumer(stream, config)
        return cls(nc, stream, durable)

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:  # noqa: ASYNC109
        """Up to ``batch`` messages: as soon as any have come, those pending with them;
        TimeoutError when none came within ``timeout``."""
        if batch < 1 or timeout <= 0:
            raise ValueError(f"a fetch of {batch} messages within {timeout} s")
        answers: asyncio.Queue[Msg] = asyncio.Queue()
        inbox = self.nc.new_inbox()
        subscription = await self.nc.subscribe(inbox, cb=answers.put)
        messages: list[Msg] = []
        try:
            request = {"batch": batch, "expires": int(timeout * 1e9), "no_wait": True}
            await self.nc.publish(self.subject, json.dumps(request).encode(), reply=inbox)
            await _answered(answers, messages, batch, timeout + ANSWER_GRACE_S)
        except asyncio.CancelledError:
            # Delivered to a fetch nobody waits for any more: back at once, not after
            # their ack deadline.
            while not answers.empty():
                messages.append(answers.get_nowait())
            for message in messages:
                if not JetStreamContext.is_status_msg(message):
                    with contextlib.suppress(Exception):
                        await message.nak()
            raise
        finally:
            with contextlib.suppress(Exception):  # a connection closing meanwhile
                await subscription.unsubscribe()
        if not messages:
            raise TimeoutError
        return messages


async def _answered(
    answers: asyncio.Queue[Msg], messages: list[Msg], batch: int, limit_s: float
) -> None:
    """Collect the messages of one pull request until the server ends it (or
    ``limit_s``)."""
    deadline = time.monotonic() + limit_s
    while len(messages) < batch:
        left = deadline - time.monotonic()
        if left <= 0:
            log.warning("a pull request got no answer within %.1f s", limit_s)
            break
        try:
            answer = await asyncio.wait_for(answers.get(), left)
        except TimeoutError:
            continue  # the deadline, next round
        status = JetStreamContext.is_status_msg(answer)
        if not status:
            messages.append(answer)
        elif status == "100":
            continue  # a heartbeat (never asked for)
        elif status in ("404", "408", "409") or messages:
            # The request is over: nothing pending, expired, or a conflict (a limit of
            # the consumer's, a leadership change), which a later fetch may not meet.
            break
        else:  # e.g. 503 No Responders (no such consumer), with nothing delivered
            raise APIError.from_msg(answer)


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
    subscription: Fetcher,
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
    consumer's own deadlines: ``timeout_s`` may be a function, asked before each fetch)."""
    while not stop.is_set():
        want = await room()
        if stop.is_set():
            break
        timeout = timeout_s() if callable(timeout_s) else timeout_s
        try:
            messages = await subscription.fetch(want, timeout=timeout)
        except TimeoutError:
            if idle:
                yield []
            continue
        if linger_s > 0 and len(messages) < want:
            messages = await _lingered(subscription, messages, want, linger_s, linger_while)
        yield messages


MIN_FETCH_S = 0.005
"""A linger with less than this left ends: a shorter fetch is all overhead."""


async def _lingered(
    subscription: Fetcher,
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
