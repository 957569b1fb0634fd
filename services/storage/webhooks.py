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
delivery is recorded in ``webhook_failures``, which its owner can read.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import fnmatch
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
from aiohttp.abc import AbstractResolver, ResolveResult
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from pymongo.asynchronous.database import AsyncDatabase

from proto import names
from proto.events import TaskEvent, decode_event, event_kind, event_to_builtins
from services.common.settings import StoreSettings
from services.storage.mongo import Document

log = logging.getLogger(__name__)
MAX_RESPONSE_BYTES = 64 * 1024
COMPLETED = frozenset({"succeeded", "failed", "cancelled"})


class WebhookRefusedError(ValueError):
    """The URL may not be called; the message says which rule it breaks."""


@dataclass(frozen=True)
class Target:
    url: str
    host: str
    port: int
    address: str
    """The checked IP address the delivery connects to."""


def _host_allowed(host: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(host, p.lower()) for p in patterns)


def _address_allowed(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_link_local)


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
    if not _host_allowed(host, settings.webhook_allow_hosts):
        raise WebhookRefusedError(f"host {host!r} is not in the operator's allowed hosts")
    port = port or (443 if parts.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise WebhookRefusedError(f"host {host!r} does not resolve: {exc}") from exc
    addresses = [str(info[4][0]) for info in infos]
    if not settings.webhook_allow_private:
        blocked = [a for a in addresses if not _address_allowed(a)]
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


class WebhookSecrets:
    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self.collection = db["webhook_secrets"]

    async def get(self, user: str) -> str:
        """The user's signing secret, created on first use."""
        fresh = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        await self.collection.update_one(
            {"_id": user}, {"$setOnInsert": {"secret": fresh}}, upsert=True
        )
        document = await self.collection.find_one({"_id": user})
        assert document is not None
        return str(document["secret"])


def subscribed(kind: str, events: list[str]) -> bool:
    return ("completed" if kind in COMPLETED else kind) in events


def payload(event: TaskEvent) -> bytes:
    kind = event_kind(event)
    data = event_to_builtins(event)
    data["taskId"] = data.pop("task_id")
    return json.dumps(
        {"type": f"task.{kind}", "timestamp": dt.datetime.now(dt.UTC).isoformat(), "data": data},
        separators=(",", ":"),
    ).encode()


async def deliver(
    target: Target, secret: str, delivery_id: str, body: bytes, timeout_s: float
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
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as response,
    ):
        await response.content.read(MAX_RESPONSE_BYTES)
        if not 200 <= response.status < 300:
            raise aiohttp.ClientResponseError(
                response.request_info, (), status=response.status, message=response.reason or ""
            )


class Dispatcher:
    def __init__(
        self, js: JetStreamContext, db: AsyncDatabase[Document], settings: StoreSettings
    ) -> None:
        self.js, self.db, self.settings = js, db, settings
        self.secrets = WebhookSecrets(db)

    async def handle(self, message: Msg) -> None:
        try:
            event = decode_event(message.data)
        except msgspec.DecodeError:
            await message.term()
            return
        task = await self.db["tasks"].find_one({"_id": event.task_id}, {"webhook": 1, "user": 1})
        hook = (task or {}).get("webhook")
        if not task or not hook or not subscribed(event_kind(event), hook.get("events", [])):
            await message.ack()
            return
        attempt = message.metadata.num_delivered
        delivery_id = f"{event.task_id}.{message.metadata.sequence.stream}"
        try:
            target = await check_url(hook["url"], self.settings)
            secret = await self.secrets.get(task["user"])
            await deliver(
                target, secret, delivery_id, payload(event), self.settings.webhook_timeout_s
            )
        except (WebhookRefusedError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            if attempt < self.settings.webhook_max_attempts and not isinstance(
                exc, WebhookRefusedError
            ):
                backoff = self.settings.webhook_backoff_s
                delay = backoff[min(attempt - 1, len(backoff) - 1)] if backoff else 1.0
                log.info(
                    "webhook %s attempt %d failed (%s); retry in %g s",
                    delivery_id,
                    attempt,
                    reason,
                    delay,
                )
                await message.nak(delay=delay)
                return
            await self._record_failure(task, hook, event, delivery_id, attempt, reason)
        await message.ack()

    async def _record_failure(
        self,
        task: Document,
        hook: dict[str, Any],
        event: TaskEvent,
        delivery_id: str,
        attempts: int,
        reason: str,
    ) -> None:
        await self.db["webhook_failures"].update_one(
            {"_id": delivery_id},
            {
                "$setOnInsert": {
                    "user": task["user"],
                    "task_id": event.task_id,
                    "url": hook["url"],
                    "event": event_kind(event),
                    "attempts": attempts,
                    "error": reason,
                    "at": dt.datetime.now(dt.UTC),
                }
            },
            upsert=True,
        )
        log.warning("webhook %s gave up after %d attempts: %s", delivery_id, attempts, reason)

    async def run(self, stop: asyncio.Event) -> None:
        subscription = await self.js.pull_subscribe(
            names.EVENT_SUBJECTS,
            durable=names.WEBHOOK_CONSUMER,
            stream=names.EVENT_STREAM,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.NEW,
                ack_wait=max(self.settings.webhook_timeout_s * 3, 30),
                max_ack_pending=10_000,
            ),
        )
        try:
            while not stop.is_set():
                try:
                    messages = await subscription.fetch(64, timeout=1)
                except TimeoutError:
                    continue
                # Deliveries run side by side: one slow receiver does not hold up others.
                await asyncio.gather(*(self.handle(m) for m in messages))
        finally:
            await subscription.unsubscribe()
