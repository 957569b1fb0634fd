"""Webhooks: a task's events POSTed to the URL its request named, signed, retried.

**Guard.** The server fetches nothing a client names unless the operator allows it:
``webhook_allow_hosts`` lists the hosts (``example.com``, ``*.example.com``); empty means
webhooks are off. The URL must be https (http only with ``webhook_allow_http``), and
the host must resolve to public addresses only: loopback, private, link-local (cloud
metadata), multicast and reserved ranges are refused unless ``webhook_allow_private``.
The check runs when the task is submitted and again at every delivery, which connects
to the address it just checked (no second lookup) and never follows redirects.

**Signing** follows Standard Webhooks: headers ``webhook-id`` (the delivery id, the same
on every retry), ``webhook-timestamp`` and ``webhook-signature`` =
``v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">``, keyed with the task owner's
secret (``GET /webhooks/secret``; ``whsec_`` + base64 of 32 random bytes).

**Delivery** is a durable consumer on the event stream: a 2xx answer acks; anything else
is retried after ``webhook_backoff_s`` steps, and after ``webhook_max_attempts`` the
delivery is recorded in ``webhook_failures``, which its owner can read. Deliveries run
concurrently, each bounded by ``webhook_timeout_s``, with limits overall and per receiver
(:class:`Dispatcher`), so a slow receiver delays only its own deliveries.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
from aiohttp.abc import AbstractResolver, ResolveResult
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from pymongo.asynchronous.database import AsyncDatabase

from proto import names
from proto.events import (
    TERMINAL_KINDS,
    TaskEvent,
    decode_event,
    event_kind,
    event_to_builtins,
)
from services.common import consumer, metrics, netguard
from services.common.settings import StoreSettings
from services.storage.deliveries import WebhookStore
from services.storage.mongo import Document
from services.storage.tasks import TaskStore, shown_task_id

log = logging.getLogger(__name__)
MAX_RESPONSE_BYTES = 64 * 1024
FETCH_BATCH = 64
"""Events fetched per request; deliveries start as soon as each arrives."""
DEFER_S = 1.0
TASKS_REMEMBERED = 4096
"""Tasks whose webhook (or its absence) the dispatcher remembers: a task's webhook never
changes, and every event of a task would otherwise read its document again."""
"""An event for a receiver whose backlog is full comes back after this long."""
COMPLETED = frozenset(TERMINAL_KINDS)


class WebhookRefusedError(ValueError):
    """The URL may not be called; the message says which rule it breaks."""


@dataclass(frozen=True)
class Target:
    url: str
    host: str
    port: int
    address: str
    """The checked IP address the delivery connects to."""


async def check_url(url: str, settings: StoreSettings) -> Target:
    """Refuse a URL the operator's webhook rules do not allow; else where to connect."""
    if not settings.webhook_allow_hosts:
        raise WebhookRefusedError("webhooks are off: the operator allows no callback host")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookRefusedError(f"not a valid URL: {exc}") from exc
    schemes = {"https", "http"} if settings.webhook_allow_http else {"https"}
    if parts.scheme not in schemes:
        raise WebhookRefusedError(f"the URL scheme must be {' or '.join(sorted(schemes))}")
    host = (parts.hostname or "").lower()
    if not host or parts.username or parts.password:
        raise WebhookRefusedError("the URL needs a host and no credentials")
    port = port or (443 if parts.scheme == "https" else 80)
    if not netguard.host_allowed(host, port, parts.scheme, settings.webhook_allow_hosts):
        raise WebhookRefusedError(
            f"host {host!r} port {port} is not in the operator's allowed hosts"
            " (an entry without a port allows the scheme's default port only)"
        )
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise WebhookRefusedError(f"host {host!r} does not resolve: {exc}") from exc
    addresses = [str(info[4][0]) for info in infos]
    if not settings.webhook_allow_private:
        # Every address, and every IPv4 address inside an IPv6 one (6to4, NAT64, mapped,
        # Teredo), must be public.
        blocked = [a for a in sorted(set(addresses)) if not netguard.public_address(a)]
        if blocked:
            raise WebhookRefusedError(
                f"host {host!r} resolves to a non-public address ({blocked[0]})"
            )
    return Target(url=url, host=host, port=port, address=addresses[0])


class _PinnedResolver(AbstractResolver):
    """Resolves the checked host to the checked address only (no second DNS lookup)."""

    def __init__(self, target: Target) -> None:
        self.target = target

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host.lower() != self.target.host:
            raise OSError(f"refusing to resolve {host!r}")
        ip = ipaddress.ip_address(self.target.address)
        return [
            {
                "hostname": host,
                "host": self.target.address,
                "port": port,
                "family": socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        return None


def sign(secret: str, delivery_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def subscribed(kind: str, events: list[str]) -> bool:
    return ("completed" if kind in COMPLETED else kind) in events


def payload(event: TaskEvent, task_id: str | None = None) -> bytes:
    """The delivery body; ``task_id`` is the id the client knows (its own chosen id, when
    it chose one), else the event's."""
    kind = event_kind(event)
    data = event_to_builtins(event)
    data["taskId"] = task_id or data.pop("task_id")
    data.pop("task_id", None)
    return json.dumps(
        {"type": f"task.{kind}", "timestamp": dt.datetime.now(dt.UTC).isoformat(), "data": data},
        separators=(",", ":"),
    ).encode()


async def deliver(
    target: Target,
    secret: str,
    delivery_id: str,
    body: bytes,
    timeout_s: float,
    connect_timeout_s: float | None = None,
) -> None:
    """POST one signed delivery; raises with the reason unless the answer is 2xx."""
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "webhook-id": delivery_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, delivery_id, timestamp, body),
        "User-Agent": "sdswarm-webhooks",
    }
    connector = aiohttp.TCPConnector(resolver=_PinnedResolver(target), use_dns_cache=False)
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.post(
            target.url,
            data=body,
            headers=headers,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=timeout_s, connect=connect_timeout_s),
        ) as response,
    ):
        await response.content.read(MAX_RESPONSE_BYTES)
        if not 200 <= response.status < 300:
            raise aiohttp.ClientResponseError(
                response.request_info, (), status=response.status, message=response.reason or ""
            )


@dataclass
class _Receiver:
    """Deliveries to one receiver (a user's URL origin): running ones and those waiting."""

    slots: asyncio.Semaphore
    waiting: int = 0
    active: int = 0


class Dispatcher:
    """Delivers each event on its own: one slow receiver never holds up another's.

    Events are fetched as long as fewer than ``webhook_max_in_flight`` are held; each is
    delivered by its own task, at most ``webhook_max_concurrency`` at once overall and
    ``webhook_max_per_receiver`` at once to one receiver (a user's scheme, host and port).
    An event waiting for a slot keeps its message alive with in-progress acks; beyond
    ``webhook_max_queued_per_receiver`` waiting for one receiver, it is handed back for
    later (not counted as an attempt), so a receiver's backlog cannot fill the dispatcher.
    Failed attempts are counted in MongoDB (``webhook_attempts``), not by redeliveries.
    """

    def __init__(self, nc: Client, db: AsyncDatabase[Document], settings: StoreSettings) -> None:
        self.nc, self.settings = nc, settings
        self.tasks, self.store = TaskStore(db), WebhookStore(db)
        self.slots = asyncio.Semaphore(settings.webhook_max_concurrency)
        self.receivers: dict[tuple[str, str, str, int], _Receiver] = {}
        self.ack_wait_s = max(settings.webhook_timeout_s * 3, 30)
        self._tasks_seen: OrderedDict[str, Document | None] = OrderedDict()

    async def _task(self, task_id: str) -> Document | None:
        """The fields of a task that its deliveries need, read once per task (a task's
        document exists before its first event: the gateway stores it, then publishes)."""
        if task_id in self._tasks_seen:
            self._tasks_seen.move_to_end(task_id)
            return self._tasks_seen[task_id]
        task = await self.tasks.fields(task_id, "webhook", "user", "client_id")
        self._tasks_seen[task_id] = task
        if len(self._tasks_seen) > TASKS_REMEMBERED:
            self._tasks_seen.popitem(last=False)
        return task

    async def handle(self, message: Msg) -> None:
        """Deliver one event (raises :class:`~services.common.consumer.Retry` to try again
        later); the consumer loop acks it when this returns."""
        try:
            event = decode_event(message.data)
        except msgspec.DecodeError as exc:
            raise consumer.Poison(f"undecodable event: {exc}") from exc
        task = await self._task(event.task_id)
        hook = (task or {}).get("webhook")
        if not task or not hook or not subscribed(event_kind(event), hook.get("events", [])):
            return
        delivery_id = f"{event.task_id}.{message.metadata.sequence.stream}"
        try:
            target = await check_url(hook["url"], self.settings)
        except WebhookRefusedError as exc:
            await self._record_failure(task, hook, event, delivery_id, 1, str(exc))
            return
        key = (
            str(task["user"]),
            urllib.parse.urlsplit(target.url).scheme,
            target.host,
            target.port,
        )
        receiver = self.receivers.get(key)
        if receiver is None:
            slots = asyncio.Semaphore(self.settings.webhook_max_per_receiver)
            receiver = self.receivers[key] = _Receiver(slots)
        if receiver.waiting >= self.settings.webhook_max_queued_per_receiver:
            raise consumer.Retry(DEFER_S)  # its backlog is full: later, not an attempt
        receiver.waiting += 1
        try:
            await self._acquire(message, receiver.slots)
            try:
                await self._acquire(message, self.slots)
            except BaseException:
                receiver.slots.release()
                raise
        finally:
            receiver.waiting -= 1
        receiver.active += 1
        try:
            await self._attempt(message, task, hook, event, target, delivery_id)
        finally:
            receiver.active -= 1
            self.slots.release()
            receiver.slots.release()
            if not (receiver.active or receiver.waiting):
                self.receivers.pop(key, None)

    async def _acquire(self, message: Msg, slots: asyncio.Semaphore) -> None:
        """Wait for a slot, keeping the message from being redelivered meanwhile."""
        while True:
            try:
                await asyncio.wait_for(slots.acquire(), self.ack_wait_s / 3)
                return
            except TimeoutError:
                await message.in_progress()

    async def _attempt(
        self,
        message: Msg,
        task: Document,
        hook: dict[str, Any],
        event: TaskEvent,
        target: Target,
        delivery_id: str,
    ) -> None:
        attempts = 0
        try:
            secret = await self.store.secret(task["user"])
            await deliver(
                target,
                secret,
                delivery_id,
                payload(event, shown_task_id(task)),
                self.settings.webhook_timeout_s,
                self.settings.webhook_connect_timeout_s,
            )
            metrics.webhook("delivered")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            metrics.webhook("failed")
            reason = str(exc) or type(exc).__name__
            attempts = await self.store.count_attempt(delivery_id)
            if attempts < self.settings.webhook_max_attempts:
                backoff = self.settings.webhook_backoff_s
                delay = backoff[min(attempts - 1, len(backoff) - 1)] if backoff else 1.0
                log.info(
                    "webhook %s attempt %d failed (%s); retry in %g s",
                    delivery_id,
                    attempts,
                    reason,
                    delay,
                )
                raise consumer.Retry(delay) from exc
            await self._record_failure(task, hook, event, delivery_id, attempts, reason)
        if attempts or message.metadata.num_delivered > 1:  # done: forget failed attempts
            await self.store.forget_attempts(delivery_id)

    async def _record_failure(
        self,
        task: Document,
        hook: dict[str, Any],
        event: TaskEvent,
        delivery_id: str,
        attempts: int,
        reason: str,
    ) -> None:
        await self.store.record_failure(
            delivery_id,
            user=task["user"],
            task_id=event.task_id,
            url=hook["url"],
            event=event_kind(event),
            attempts=attempts,
            error=reason,
        )
        log.warning("webhook %s gave up after %d attempts: %s", delivery_id, attempts, reason)
        metrics.webhook("gave_up")

    async def run(self, stop: asyncio.Event) -> None:
        limit = self.settings.webhook_max_in_flight
        subscription = await consumer.Puller.durable(
            self.nc,
            names.EVENT_SUBJECTS,
            durable=names.WEBHOOK_CONSUMER,
            stream=names.EVENT_STREAM,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.NEW,
                ack_wait=self.ack_wait_s,
                max_ack_pending=limit,
            ),
        )
        running: set[asyncio.Task[None]] = set()

        async def room() -> int:
            while (free := limit - len(running)) <= 0:
                await asyncio.wait(running, timeout=1, return_when=asyncio.FIRST_COMPLETED)
            return min(free, FETCH_BATCH)

        try:
            async for messages in consumer.batches(subscription, stop, room):
                for message in messages:
                    job = asyncio.create_task(self._handle_logged(message))
                    running.add(job)
                    job.add_done_callback(running.discard)
        finally:
            # Unacked deliveries come back after ack_wait (receivers dedupe on webhook-id).
            for job in list(running):
                job.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _handle_logged(self, message: Msg) -> None:
        try:
            await consumer.settle(message, self.handle(message))
        except Exception:  # e.g. MongoDB away: the message comes back after ack_wait
            log.exception("webhook delivery of %s failed", message.subject)
