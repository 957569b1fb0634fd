"""Task store: one MongoDB document per task, ``_id`` = task id.

Events are folded in idempotently. Every update is a single conditional
``update_one`` whose filter encodes the rules, so concurrent sinks and duplicate or
late deliveries are safe without transactions:

- the status only moves forward (``waiting`` → ``running`` → terminal) and terminal
  states are final;
- an event from an older delivery attempt never overwrites a newer attempt's state;
- progress only increases within an attempt (``progress.order``); A1111's skip marks the
  step last reported (``progress.skipped``) until the next job's first step.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import bson
import msgspec
from bson.codec_options import CodecOptions
from pymongo import ASCENDING, DESCENDING, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

import proto
from proto import TaskStatus, names
from proto.events import (
    TaskCancelled,
    TaskEvent,
    TaskFailed,
    TaskProgressed,
    TaskStarted,
    TaskSucceeded,
)
from proto.notices import MAX_FOLDED_DOCUMENT, TaskFolded, TaskOutcome
from services.common import metrics
from services.storage.groupwrite import GroupWriter
from services.storage.mongo import Document

log = logging.getLogger(__name__)

OPEN_STATUSES = [status.value for status in proto.OPEN_STATUSES]


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC) if ts else dt.datetime.now(dt.UTC)


def _code(event: TaskEvent) -> str:
    return event.code if isinstance(event, TaskFailed) else ""


STREAM_SEQ_LINGER_S = 2.0
"""How long a noted stream sequence waits for others to share its command: under load,
the sequences of a second or two cost one command, not one each, and a task a worker
has started meanwhile needs none (the start records it, see ``TaskStarted.stream_seq``).
The reconciler looks at a task only after ``reconcile_grace_s`` (30 s)."""


def progress_order(attempt: int, job_no: int, step: int) -> int:
    """A number that grows with every real progress step across jobs and attempts."""
    return attempt * 1_000_000_000 + job_no * 1_000_000 + step


def new_task_document(
    *,
    task_id: str,
    user: str,
    kind: str,
    model_name: str,
    model_key: str,
    total_steps: int,
    job_count: int,
    command: bytes = b"",
    client_id: str | None = None,
) -> Document:
    return {
        "_id": task_id,
        "user": user,
        # The id the client chose, when it chose one (``_id`` is then derived from it and
        # the user, see ``names.scoped_task_id``); what every answer calls ``taskId``.
        "client_id": client_id,
        "status": TaskStatus.WAITING.value,
        "kind": kind,
        "model_name": model_name,
        "model_key": model_key,
        "created_at": dt.datetime.now(dt.UTC),
        "started_at": None,
        "finished_at": None,
        "attempt": 0,
        "progress": {
            "order": 0,
            "step": 0,
            "total_steps": total_steps,
            "job_no": 0,
            "job_count": job_count,
            "progress": 0.0,
            "eta_seconds": None,
            "preview_key": None,
        },
        "images": [],
        "info": "",
        "seeds": [],
        "code": None,
        "message": "",
        "worker": None,
        # The encoded command and, once JetStream has it, its stream sequence: the
        # reconciler publishes a command again if its publish was never confirmed. It is
        # the task's one copy of the request (the result's ``parameters`` are read from it).
        "command": command or None,
        "stream_seq": None,
    }


_READ_AS: CodecOptions[Document] = CodecOptions(document_class=dict, tz_aware=True)
"""As the store's client reads documents (``services.storage.mongo.open_client``)."""


def _started_fields(event: TaskStarted) -> Document:
    """What a start says of its task, besides its status: when, where, and the
    command's stream sequence when the worker gave it (``set_stream_seq``)."""
    fields = {"started_at": _utc(event.at), "worker": event.worker}
    if event.stream_seq > 0:
        fields["stream_seq"] = event.stream_seq
    return fields


def folded_notice(task_id: str, document: Document | None) -> TaskFolded:
    """The notice that task ``task_id`` has its end in ``document`` (read back), carrying
    it."""
    encoded = b"" if document is None else bson.encode(document)
    if len(encoded) > MAX_FOLDED_DOCUMENT:
        encoded = b""  # the waiter reads it
    return TaskFolded(task_id=task_id, document=encoded)


def outcome_of(event: TaskSucceeded | TaskFailed | TaskCancelled) -> TaskOutcome:
    """What an end writes into its task's document (all of it: see ``TaskOutcome``)."""
    match event:
        case TaskSucceeded(images=images, info=info, seeds=seeds):
            done = TaskStatus.SUCCEEDED.value
            return TaskOutcome(status=done, images=images, info=info, seeds=seeds)
        case TaskFailed(code=code, message=message):
            return TaskOutcome(status=TaskStatus.FAILED.value, code=code, message=message)
        case TaskCancelled(reason=reason):
            return TaskOutcome(status=TaskStatus.CANCELLED.value, message=reason)


def folded_document(notice: TaskFolded, task_id: str, user: str) -> Document | None:
    """The terminal document of task ``task_id`` that a fold notice tells of, if it is
    ``user``'s; None when it carries none (too large, unread, an older sink) or not one
    to answer with: then read it. From an ``outcome``: the outcome's fields of the
    document (all an answer reads), with its id and owner (the waiter's own: the notice
    is for the task the waiter submitted)."""
    if notice.outcome is not None:
        if task_id != notice.task_id or notice.outcome.status not in proto.TERMINAL_STATUSES:
            return None
        return {"_id": task_id, "user": user, **msgspec.structs.asdict(notice.outcome)}
    if not notice.document:
        return None
    try:
        document: Document = bson.decode(notice.document, codec_options=_READ_AS)
    except bson.errors.BSONError:
        return None
    if not task_id == notice.task_id == document.get("_id") or document.get("user") != user:
        return None
    if document.get("status") not in proto.TERMINAL_STATUSES:
        return None
    return document


def one_open_task_less(user: str) -> UpdateOne:
    """``user``'s count of open tasks one down, never below zero (a task ended, or a
    submission was refused after its admission)."""
    return UpdateOne({"_id": user, "n": {"$gt": 0}}, {"$inc": {"n": -1}})


def shown_task_id(document: Document) -> str:
    """The task's id as its owner knows it: the one they chose, else the generated one."""
    return str(document.get("client_id") or document["_id"])


class TaskStore:
    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self.collection: AsyncCollection[Document] = db["tasks"]
        self.writes = GroupWriter(self.collection)
        """Submissions' inserts and the reconciler's stream sequences, grouped under load
        (group commit)."""
        self.deferred = GroupWriter(self.collection, linger_s=STREAM_SEQ_LINGER_S)
        """Stream sequences that no request waits for (:meth:`note_stream_seq`)."""
        self.open_counts: AsyncCollection[Document] = db["task_open_counts"]
        """Per user, ``{_id: user, n, …}``: ``n`` tasks admitted and not yet ended (the
        quota's counter; ``QuotaStore`` counts up at admission, a terminal fold counts
        down), beside the per-minute counts (``services.storage.quotas``)."""

    async def ensure_indexes(self) -> None:
        await self.collection.create_index([("user", ASCENDING), ("created_at", DESCENDING)])
        await self.collection.create_index([("status", ASCENDING)])
        await self.collection.create_index(
            [("model_key", ASCENDING), ("status", ASCENDING), ("created_at", ASCENDING)]
        )

    async def insert(self, document: Document) -> None:
        await self.writes.insert_one(document)
        metrics.task_submitted(document["model_key"])

    async def count_open(self, match: Document, limit: int = 0) -> int:
        """How many tasks matching ``match`` are waiting or running (at most ``limit``)."""
        query = {**match, "status": {"$in": OPEN_STATUSES}}
        if limit:
            return await self.collection.count_documents(query, limit=limit)
        return await self.collection.count_documents(query)

    async def set_stream_seq(self, task_id: str, seq: int) -> None:
        """Record that JetStream holds the task's command (see the reconciler)."""
        await self.writes.update_one({"_id": task_id}, {"$set": {"stream_seq": seq}})

    def note_stream_seq(self, task_id: str, seq: int) -> None:
        """:meth:`set_stream_seq` without waiting: written within
        ``STREAM_SEQ_LINGER_S``, with the others of that time in one command, unless a
        worker's start recorded it first. Should it
        never be written (the process dies first, MongoDB refuses it), the task looks
        like one whose publish was not confirmed, and the reconciler settles it so
        after ``reconcile_grace_s`` (a worker's events prove it landed; otherwise it is
        published again under the same message id, which JetStream drops as a
        duplicate within ``dedupe_window_s``)."""
        # Not over a start's record: the filter then matches nothing, and nothing is
        # written (a write costs a document's every index entry twice on SecantusDB).
        query = {"_id": task_id, "stream_seq": None}
        self.deferred.update_later(query, {"$set": {"stream_seq": seq}})

    async def drain(self) -> None:
        """Every write noted for later is sent (or failed)."""
        await self.deferred.drain()

    async def get(self, task_id: str, user: str | None = None) -> Document | None:
        """One task by its internal id; with ``user`` the query is scoped to its owner
        (others get None) and ``task_id`` may also be the id the owner chose."""
        if user is None:
            return await self.collection.find_one({"_id": task_id})
        ids = [names.scoped_task_id(user, task_id), task_id]
        # Both ids exist only if a chosen id repeats one of the user's own internal ids,
        # which the gateway refuses (409); the chosen one wins anyway, deterministically.
        found = [d async for d in self.collection.find({"_id": {"$in": ids}, "user": user})]
        found.sort(key=lambda d: ids.index(d["_id"]))
        return found[0] if found else None

    async def fields(self, task_id: str, *names_: str) -> Document | None:
        """Some fields of one task by its internal id (unscoped: for the services)."""
        return await self.collection.find_one({"_id": task_id}, dict.fromkeys(names_, 1))

    async def current(self, user: str) -> Document | None:
        """The user's running task, else their oldest waiting one (A1111's "current job")."""
        for status in (TaskStatus.RUNNING, TaskStatus.WAITING):
            found = await self.collection.find_one(
                {"user": user, "status": status.value}, sort=[("created_at", ASCENDING)]
            )
            if found is not None:
                return found
        return None

    async def waiting_ids(self, model_key: str) -> list[str]:
        """The ids of a checkpoint's tasks still waiting for a worker."""
        query = {"model_key": model_key, "status": TaskStatus.WAITING.value}
        return [d["_id"] async for d in self.collection.find(query, {"_id": 1})]

    async def open_before(self, before: dt.datetime, *names_: str) -> AsyncIterator[Document]:
        """Open tasks created before ``before``, with the named fields (the reconciler)."""
        query = {"status": {"$in": OPEN_STATUSES}, "created_at": {"$lt": before}}
        async for document in self.collection.find(query, dict.fromkeys(names_, 1)):
            yield document

    async def oldest_waiting(self, model_key: str) -> dt.datetime | None:
        document = await self.collection.find_one(
            {"model_key": model_key, "status": TaskStatus.WAITING.value},
            sort=[("created_at", ASCENDING)],
            projection={"created_at": 1},
        )
        return document["created_at"] if document else None

    async def queue_position(self, document: Document) -> int:
        """1-based place of a waiting task among its checkpoint's waiting tasks (FIFO)."""
        ahead = await self.collection.count_documents(
            {
                "model_key": document["model_key"],
                "status": TaskStatus.WAITING.value,
                "created_at": {"$lt": document["created_at"]},
            }
        )
        return ahead + 1

    async def page(
        self,
        user: str,
        *,
        limit: int,
        status: str | None = None,
        model_name: str | None = None,
        before: tuple[dt.datetime, str] | None = None,
    ) -> list[Document]:
        """The user's tasks, newest first; ``before`` is the (created_at, id) of the last seen."""
        query: Document = {"user": user}
        if status:
            query["status"] = status
        if model_name:
            query["model_name"] = model_name
        if before is not None:
            created, task_id = before
            query["$or"] = [
                {"created_at": {"$lt": created}},
                {"created_at": created, "_id": {"$lt": task_id}},
            ]
        cursor = self.collection.find(query).sort([("created_at", -1), ("_id", -1)]).limit(limit)
        return [doc async for doc in cursor]

    async def delete(self, task_id: str) -> None:
        await self.collection.delete_one({"_id": task_id})

    async def apply(self, event: TaskEvent) -> bool:
        """Fold one event into its task; False when the rules say it changes nothing."""
        match event:
            case TaskStarted():
                query, update = self._started(event)
            case TaskProgressed():
                query, update = self._progressed(event)
            case TaskSucceeded() | TaskFailed() | TaskCancelled():
                return await self.finish(event)
        result = await self.collection.update_one(query, update)
        if result.modified_count == 1 and isinstance(event, TaskStarted):
            metrics.task_started(event.model_key)
        return result.modified_count == 1

    async def begin(self, started: TaskStarted, progress: TaskProgressed) -> bool:
        """Fold a start with a progress event of the same attempt in one write, as if
        folded one after the other (the sink holds a start with its task's steps, see
        ``services.storage.sink``); False when the rules say it changes nothing."""
        query, update = self._started(started)
        moved_query, moved = self._progressed(progress)
        result = await self.collection.update_one(query, {"$set": update["$set"] | moved["$set"]})
        if result.modified_count == 1:
            metrics.task_started(started.model_key)
            return True
        # Started already (folded before, or by another sink), or ended: the step alone.
        return (await self.collection.update_one(moved_query, moved)).modified_count == 1

    async def finish(
        self,
        event: TaskSucceeded | TaskFailed | TaskCancelled,
        started: TaskStarted | None = None,
        progress: TaskProgressed | None = None,
        *,
        written: Written | None = None,
        worker_end: bool = False,
        ends: Ends | None = None,
    ) -> bool:
        """Fold a terminal event, with the same attempt's ``started`` and last
        ``progress`` events when they came together (one write, as if folded in order);
        False when the rules say it changes nothing. ``written`` runs once the document
        holds the end (whether or not this fold changed it), before the bookkeeping
        that follows (metrics, the owner's count): a sync request waiting on it need not
        wait for that. When this fold ended the task, it runs at once with the outcome
        written; else with the document read back. With ``ends``, that read and the
        bookkeeping join the others' there (:class:`Ends`); else they are done now.

        ``worker_end``: the event is the one worker end the stream keeps for the task
        (``names.end_msg_id``). It ends an open task whichever attempt sent it: when two
        attempts ran at once, the later one's end was dropped as a duplicate, so
        refusing an older attempt's end would leave the task running for good."""
        outcome = outcome_of(event)
        query, update = self._finished(event, outcome)
        if worker_end:
            del query["attempt"]
        fields = update["$set"]
        if started is not None and started.attempt == event.attempt:
            fields |= _started_fields(started)
        # The one transition to a terminal state: the owner has one open task less.
        # An update then a read of fields the update leaves alone (the owner, the
        # times), not ``find_one_and_update``: on SecantusDB that one command costs the
        # server ~5× the CPU of both together.
        changed = False
        if progress is not None and progress.attempt == event.attempt:
            # The step shown moves only forward, as when folded alone (``_progressed``):
            # an earlier fetch may have folded a later step of this attempt already.
            moved_query, moved = self._progressed(progress)
            shown = {k: v for k, v in moved["$set"].items() if k.startswith("progress.")}
            forward = query | {"progress.order": moved_query["progress.order"]}
            # The end's own fields win (a success shows progress 1.0).
            result = await self.collection.update_one(forward, {"$set": shown | fields})
            changed = result.modified_count == 1
        if not changed:
            changed = (await self.collection.update_one(query, update)).modified_count == 1
        if started is not None and started.attempt == event.attempt and changed:
            metrics.task_started(started.model_key)
        alone = ends is None
        ends = Ends(self) if ends is None else ends
        if written is not None and changed:
            # This fold ended the task: what it wrote is the outcome, nothing to read.
            await _tell(event.task_id, written, TaskFolded(task_id=event.task_id, outcome=outcome))
        elif written is not None:
            ends.written(event.task_id, written)
        if changed:
            ends.add(event, outcome.status)
        if alone:
            await ends.settle()
        return changed

    @staticmethod
    def _started(event: TaskStarted) -> tuple[Document, Document]:
        query = {
            "_id": event.task_id,
            "status": {"$in": OPEN_STATUSES},
            "attempt": {"$lt": event.attempt},
        }
        update = {
            "$set": {
                "status": TaskStatus.RUNNING.value,
                "attempt": event.attempt,
                **_started_fields(event),
                "progress.order": progress_order(event.attempt, 0, 0),
                "progress.step": 0,
                "progress.job_no": 0,
                "progress.progress": 0.0,
            }
        }
        return query, update

    @staticmethod
    def _progressed(event: TaskProgressed) -> tuple[Document, Document]:
        order = progress_order(event.attempt, event.job_no, event.step)
        query = {
            "_id": event.task_id,
            "status": {"$in": OPEN_STATUSES},
            "attempt": {"$lte": event.attempt},
            # A skip marks the step already reported (the job ends after it).
            "progress.order": {"$lte" if event.skipped else "$lt": order},
        }
        shown: Document = {
            "order": order,
            "step": event.step,
            "total_steps": event.total_steps,
            "job_no": event.job_no,
            "job_count": event.job_count,
            "progress": event.progress,
            "eta_seconds": event.eta_seconds,
            "skipped": event.skipped,
        }
        if event.preview_key is not None:
            # Only some steps render a preview; the last one stays shown until the next
            # replaces it (as A1111's current image does), or a client reading progress
            # between two previews would see none.
            shown["preview_key"] = event.preview_key
        update = {
            "$set": {
                "status": TaskStatus.RUNNING.value,
                "attempt": event.attempt,
                **{f"progress.{k}": v for k, v in shown.items()},
            }
        }
        return query, update

    @staticmethod
    def _finished(
        event: TaskSucceeded | TaskFailed | TaskCancelled, outcome: TaskOutcome
    ) -> tuple[Document, Document]:
        # Every field of the outcome, so the document holds exactly what the sink's
        # notice tells (``TaskOutcome``) whatever it held before.
        fields: Document = {
            "finished_at": _utc(event.at),
            "attempt": event.attempt,
            **msgspec.structs.asdict(outcome),
        }
        if isinstance(event, TaskSucceeded):
            fields["progress.progress"] = 1.0
        query = {
            "_id": event.task_id,
            "status": {"$in": OPEN_STATUSES},
            "attempt": {"$lte": event.attempt},
        }
        return query, {"$set": fields}


Written = Callable[[TaskFolded], Awaitable[None]]
"""Told that a task's end is in its document: with the outcome the fold wrote when it
ended the task, else with the document read back after the fold (none when it could not
be read)."""


async def _tell(task_id: str, written: Written, notice: TaskFolded) -> None:
    try:
        await written(notice)
    except Exception as exc:  # the others are told all the same
        log.warning("task %s: telling that its end is written failed: %r", task_id, exc)


Ended = tuple[TaskSucceeded | TaskFailed | TaskCancelled, str]
"""A terminal event whose fold ended its task, and the status it left."""


async def keep_books(store: TaskStore, ended: list[Ended]) -> None:
    """The bookkeeping of tasks that ended: the metrics, and each owner's count of open
    tasks one down; one read and one write for all of them."""
    ids = list({event.task_id for event, _ in ended})
    if not ids:
        return
    found = store.collection.find({"_id": {"$in": ids}}, projection=metrics.ENDED_FIELDS)
    documents = {d["_id"]: d async for d in found}
    counts: list[UpdateOne] = []
    for event, status in ended:
        document = documents.get(event.task_id)
        if document is None:  # deleted meanwhile: its owner's count is moot
            continue
        metrics.task_ended(document, status, event.at, _code(event))
        counts.append(one_open_task_less(document["user"]))
    if counts:
        await store.open_counts.bulk_write(counts, ordered=False)


class Ends:
    """After terminal folds: the documents read back for those ``written`` waits on whose
    folds changed nothing (the sink's notices to sync requests), and the bookkeeping of
    tasks that ended (:func:`keep_books`). The sink collects the ends of one fetch (a
    batch's tasks end together) and settles them with one read (and one of the
    bookkeeping) in all, instead of one each, after their folds are acked. Should the
    bookkeeping fail or the process die first, an owner's count stays too high, as when
    the sink dies between a fold and its count: the quota recounts a count that reaches
    its limit (``QuotaStore.admit``)."""

    def __init__(
        self, store: TaskStore, books: Callable[[list[Ended]], None] | None = None
    ) -> None:
        self.store = store
        self.books = books
        """Takes the bookkeeping to do it later (the sink's, see there); else
        :meth:`settle` does it."""
        self._ended: list[Ended] = []
        self._written: list[tuple[str, Written]] = []

    def add(self, event: TaskSucceeded | TaskFailed | TaskCancelled, status: str) -> None:
        self._ended.append((event, status))

    def written(self, task_id: str, written: Written) -> None:
        """Run ``written`` with the task's document when settling."""
        self._written.append((task_id, written))

    async def settle(self) -> None:
        ended, self._ended = self._ended, []
        told, self._written = self._written, []
        if told:
            documents: dict[str, Document] = {}
            try:
                ids = list({task_id for task_id, _ in told})
                documents = {
                    d["_id"]: d async for d in self.store.collection.find({"_id": {"$in": ids}})
                }
            finally:
                for task_id, written in told:  # after a failed read, without the document
                    await _tell(task_id, written, folded_notice(task_id, documents.get(task_id)))
        if ended and self.books is not None:
            self.books(ended)
        elif ended:
            await keep_books(self.store, ended)
