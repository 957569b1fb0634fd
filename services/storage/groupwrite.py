"""Group commit: writes to one collection that are asked for while another is on its
way go together, as one unordered ``bulk_write``.

A write asked for while none is in flight goes at once, alone, so a lone request waits
no longer than with ``insert_one``; under load the writes pile up behind the one in
flight and then cost one command, one commit and one round trip together (on SecantusDB
an insert then costs its server about a quarter of the CPU, an update about half).

Only writes whose caller needs no more than "done, or this error" go through here:
a bulk reply counts matches for the whole batch, not per write. Each write's own error
(a duplicate ``_id``, say) reaches only its caller, as the error ``insert_one`` or
``update_one`` would have raised; an error of the whole command (the server away)
reaches every caller of the batch. The writes of one batch are independent (unordered):
a caller that needs one write before another awaits the first.

A writer with a linger holds each batch's first write that long for company: for writes
nobody waits on (:meth:`GroupWriter.update_later`), which then go in bigger groups. Their
failures are logged; :meth:`GroupWriter.drain` waits for those still on their way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from bson.errors import InvalidDocument
from pymongo import InsertOne, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError, DuplicateKeyError, WriteConcernError, WriteError

from services.storage.mongo import Document

log = logging.getLogger(__name__)

MAX_BATCH = 128
"""Writes per command at most: a batch never waits on an unbounded one before it."""

DUPLICATE_KEY = 11000

_Write = InsertOne[Document] | UpdateOne


class GroupWriter:
    """Inserts and updates of one collection, sent in groups (see the module)."""

    def __init__(
        self,
        collection: AsyncCollection[Document],
        max_batch: int = MAX_BATCH,
        *,
        linger_s: float = 0.0,
    ) -> None:
        self.collection = collection
        self.max_batch = max_batch
        self.linger_s = linger_s
        """How long a batch's first write waits for others before the batch goes."""
        self._later: set[asyncio.Task[None]] = set()
        self._lingering: asyncio.Future[None] | None = None
        """While a batch lingers: done by :meth:`drain`, so that it goes now."""
        self._pending: list[tuple[_Write, asyncio.Future[None]]] = []
        self._sender: asyncio.Task[None] | None = None
        self.commands = 0
        """Bulk commands sent so far (for tests and benches)."""

    async def insert_one(self, document: Document) -> None:
        await self._write(InsertOne(document))

    async def update_one(self, query: Document, update: Document, *, upsert: bool = False) -> None:
        await self._write(UpdateOne(query, update, upsert=upsert))

    def update_later(self, query: Document, update: Document) -> None:
        """The update, sent with the next batch; the caller does not wait for it. A
        failure is logged (the write is for bookkeeping that can be repaired or redone:
        say so where it is used)."""
        task = asyncio.get_running_loop().create_task(self.update_one(query, update))
        self._later.add(task)
        task.add_done_callback(self._deferred_done)

    def _deferred_done(self, task: asyncio.Task[None]) -> None:
        self._later.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("a deferred write to %s failed: %r", self.collection.name, exc)

    async def drain(self) -> None:
        """Every write of :meth:`update_later` sent (or failed), without lingering."""
        loop = asyncio.get_running_loop()
        while waiting := [t for t in self._later if t.get_loop() is loop]:
            lingering = self._lingering
            if lingering is not None and lingering.get_loop() is loop and not lingering.done():
                lingering.set_result(None)
            await asyncio.gather(*waiting, return_exceptions=True)

    async def _write(self, write: _Write) -> None:
        loop = asyncio.get_running_loop()
        sender = self._sender
        if sender is not None and sender.get_loop() is not loop:
            # Left behind by an event loop that has closed (tests run one per test): its
            # sender never runs again, and its callers are gone.
            self._pending = [p for p in self._pending if p[1].get_loop() is loop]
            sender = None
        done: asyncio.Future[None] = loop.create_future()
        self._pending.append((write, done))
        if sender is None or sender.done():
            self._sender = loop.create_task(self._send_all())
        await done

    async def _send_all(self) -> None:
        """Send what is pending, one batch after another, until nothing is."""
        batch: list[tuple[_Write, asyncio.Future[None]]] = []
        try:
            if self.linger_s > 0:
                self._lingering = asyncio.get_running_loop().create_future()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._lingering, self.linger_s)
                self._lingering = None
            while self._pending:
                # A write whose caller was cancelled before it left is not sent (as with
                # ``insert_one``, which a cancelled caller never sends).
                self._pending = [pending for pending in self._pending if not pending[1].done()]
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                if not batch:
                    break
                await self._send(batch)
        except asyncio.CancelledError:  # the loop is closing: nobody is left to send
            for _, done in batch + self._pending:
                done.cancel()
            self._pending.clear()
            raise

    async def _send(self, batch: list[tuple[_Write, asyncio.Future[None]]]) -> None:
        errors: dict[int, Exception] = {}
        self.commands += 1
        try:
            await self.collection.bulk_write([write for write, _ in batch], ordered=False)
        except BulkWriteError as exc:
            try:
                errors = _per_write(exc.details, len(batch))
            except (KeyError, TypeError, ValueError):  # a reply it cannot read: all failed
                errors = dict.fromkeys(range(len(batch)), exc)
        except InvalidDocument as exc:
            if len(batch) == 1:
                errors = {0: exc}
            else:
                # A document the driver cannot encode (a value BSON has no type for)
                # failed the batch before it left: each write alone, so only its own
                # fails. (Over 16 MB is a write's own error already; a batch over 48 MB
                # goes in parts, and a part before the bad document could have landed.)
                for one in batch:
                    await self._send([one])
                return
        except Exception as exc:  # the whole command failed: every write of it did
            errors = dict.fromkeys(range(len(batch)), exc)
        for index, (_, done) in enumerate(batch):
            if done.done():  # its caller was cancelled
                continue
            if index in errors:
                done.set_exception(errors[index])
            else:
                done.set_result(None)


def _per_write(details: Mapping[str, Any], count: int) -> dict[int, Exception]:
    """Each failed write's own error, as the single-write command would have raised it;
    a write-concern error (the write was applied, but not as durably as asked) goes to
    every write that has no error of its own."""
    errors: dict[int, Exception] = {}
    for error in details.get("writeErrors", []):
        code, message = error.get("code"), error.get("errmsg", "write failed")
        kind = DuplicateKeyError if code == DUPLICATE_KEY else WriteError
        errors[int(error["index"])] = kind(message, code, error)
    concern = details.get("writeConcernErrors") or []
    if concern:
        first = concern[0]
        failure = WriteConcernError(first.get("errmsg", "write concern"), first.get("code"), first)
        for index in range(count):
            errors.setdefault(index, failure)
    return errors
