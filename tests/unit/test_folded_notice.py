"""The sink's notice that a task's end is in its document, and what a waiter takes from
it: only its own user's terminal task, else nothing (then it reads the document)."""

from __future__ import annotations

import datetime as dt

from proto.events import TaskCancelled, TaskFailed, TaskSucceeded
from proto.notices import MAX_FOLDED_DOCUMENT, TaskFolded, TaskOutcome, decode_folded, encode_folded
from services.storage.mongo import Document
from services.storage.tasks import folded_document, folded_notice, outcome_of
from tests.documents import task_document


def _ended(**fields: object) -> Document:
    finished = dt.datetime(2026, 12, 6, 12, 0, tzinfo=dt.UTC)
    return task_document("t1", user="ann", command=b"\x00cmd") | {
        "status": "succeeded",
        "images": ["images/ann/t1_1.png"],
        "created_at": finished - dt.timedelta(seconds=3),  # as stored: whole milliseconds
        "finished_at": finished,
        **fields,
    }


def _taken(document: Document | None, task_id: str = "t1", user: str = "ann") -> Document | None:
    notice = decode_folded(encode_folded(folded_notice("t1", document)))
    return folded_document(notice, task_id, user)


def test_the_owner_gets_the_document_as_the_store_reads_it() -> None:
    document = _ended()
    taken = _taken(document)
    assert taken == document
    assert taken is not None
    assert dt.UTC.utcoffset(None) == taken["finished_at"].utcoffset()  # aware, as read
    assert b"\x00cmd" == taken["command"]


def test_nothing_to_answer_with_is_nothing() -> None:
    assert _taken(_ended(), user="mallory") is None, "another user's task"
    assert _taken(_ended(), task_id="t2") is None, "another task's notice"
    assert _taken(_ended(status="running")) is None, "not ended"
    assert _taken(None) is None, "a notice without the document (unread)"
    assert _taken(_ended(info="x" * MAX_FOLDED_DOCUMENT)) is None, "too large to carry"
    garbled = TaskFolded(task_id="t1", document=b"\x05\x00\x00")
    assert folded_document(garbled, "t1", "ann") is None


def _told(outcome: TaskOutcome, task_id: str = "t1") -> Document | None:
    notice = decode_folded(encode_folded(TaskFolded(task_id="t1", outcome=outcome)))
    return folded_document(notice, task_id, "ann")


def test_an_outcome_answers_as_the_document_would() -> None:
    """Every field of the outcome, the waiter's own task id and user."""
    ended = TaskSucceeded(task_id="t1", images=["images/ann/t1_1.png"], info="{}", seeds=[3])
    assert {
        "_id": "t1",
        "user": "ann",
        "status": "succeeded",
        "images": ["images/ann/t1_1.png"],
        "info": "{}",
        "seeds": [3],
        "code": None,
        "message": "",
    } == _told(outcome_of(ended))
    failed = _told(outcome_of(TaskFailed(task_id="t1", code="oom", message="out of memory")))
    assert failed is not None
    assert ("failed", "oom", "out of memory", []) == (
        failed["status"],
        failed["code"],
        failed["message"],
        failed["images"],
    )
    cancelled = _told(outcome_of(TaskCancelled(task_id="t1", reason="by user")))
    assert cancelled is not None
    assert ("cancelled", "by user") == (cancelled["status"], cancelled["message"])


def test_an_outcome_of_another_task_or_no_end_is_nothing() -> None:
    assert _told(TaskOutcome(status="succeeded"), task_id="t2") is None
    assert _told(TaskOutcome(status="running")) is None
