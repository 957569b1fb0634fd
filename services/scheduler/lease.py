"""Leader election: a lease in a NATS KV bucket, so that one scheduler replica acts.

The bucket's ``max_age`` is the lease duration: the holder's entry vanishes unless it is
rewritten in time. Acquiring is *create-if-absent*; renewing is an *update expecting the
revision we wrote last*, so a renewal succeeds only while nobody else took the key.

Fencing: the holder counts its lease from the moment it *sent* the write that
acquired or renewed it, and gives it up ``margin`` before ``ttl`` has passed. The server
keeps the entry for ``ttl`` from the moment it *stored* it, which is later, so a holder
whose renewals stop arriving (crash, partition, a stalled process) believes it leads
only while no other replica can have the key. :meth:`Lease.held` is checked before every
change the scheduler applies, so a plan computed under a lease that has since lapsed is
never applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import Error as JetStreamError
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from proto import names
from services.common import bus

log = logging.getLogger(__name__)


def holder_id() -> str:
    """Who holds the lease, readable with ``nats kv get``: host, pid and a nonce."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Lease:
    def __init__(
        self,
        js: JetStreamContext,
        ttl_s: float,
        *,
        holder: str | None = None,
        bucket: str = names.LEADER_BUCKET,
        key: str = names.SCHEDULER_LEADER_KEY,
        margin: float = 0.2,
        replicas: int = 1,
    ) -> None:
        self.js = js
        self.replicas = replicas
        self.holder = holder or holder_id()
        self.bucket_name = bucket
        self.key = key
        self.margin = margin
        self._use_ttl(ttl_s)
        self._kv: KeyValue | None = None
        self._revision: int | None = None
        self._valid_until = 0.0
        self.acquired = 0
        """How many times this replica became leader."""

    def _use_ttl(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        # A request that takes this long is no renewal: give up well before the lease ends.
        self.request_timeout_s = ttl_s * self.margin
        self._valid_s = ttl_s * (1 - 2 * self.margin)

    def held(self) -> bool:
        """Whether this replica may act now (see the module docstring on fencing)."""
        return self._revision is not None and time.monotonic() < self._valid_until

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            kv = await bus.lease_bucket(self.js, self.bucket_name, self.ttl_s, self.replicas)
            # The bucket's max_age is what the server enforces: a replica configured with a
            # longer TTL than the bucket was created with would outlive its own entry.
            ttl = (await kv.status()).ttl
            if not ttl:
                raise RuntimeError(f"KV bucket {self.bucket_name} has no TTL: no lease possible")
            if ttl != self.ttl_s:
                log.warning(
                    "lease bucket %s has a TTL of %.1f s, not %.1f s: using the bucket's",
                    self.bucket_name,
                    ttl,
                    self.ttl_s,
                )
                self._use_ttl(ttl)
            self._kv = kv
        return self._kv

    async def keep(self) -> bool:
        """Acquire the lease, or renew it if we hold it; whether we hold it afterwards."""
        sent = time.monotonic()
        was_held = self.held()
        timeout, value = self.request_timeout_s, self.holder.encode()
        try:
            kv = await asyncio.wait_for(self._bucket(), timeout)
            if self._revision is None or not was_held:
                revision = await asyncio.wait_for(kv.create(self.key, value), timeout)
            else:
                revision = await asyncio.wait_for(
                    kv.update(self.key, value, last=self._revision), timeout
                )
        except KeyWrongLastSequenceError:
            # Someone else holds it (create), or took it after ours lapsed (update).
            self._lose("the lease is held by another replica")
            return False
        except (TimeoutError, NatsError, JetStreamError, OSError) as exc:
            # Unknown outcome: our write may have landed. Only the clock is trusted now;
            # the lease lapses at _valid_until, and a later create waits for expiry.
            if not self.held():
                self._lose(f"cannot reach NATS ({exc!r})")
            return self.held()
        if not was_held:
            self.acquired += 1
            log.info("%s: leader (lease %s/%s)", self.holder, self.bucket_name, self.key)
        self._revision = revision
        self._valid_until = sent + self._valid_s
        return True

    def _lose(self, why: str) -> None:
        if self._revision is not None:
            log.warning("%s: no longer the leader: %s", self.holder, why)
        self._revision = None
        self._valid_until = 0.0

    async def release(self) -> None:
        """Step down now (clean shutdown): another replica takes over without waiting."""
        revision, self._revision = self._revision, None
        self._valid_until = 0.0
        if revision is None or self._kv is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._kv.delete(self.key, last=revision), self.request_timeout_s)
        log.info("%s: released the lease", self.holder)
