"""Core-NATS notices (not stored in a stream): ``sd.folded.<task_id>``.

The sink publishes :class:`TaskFolded` once a task's terminal event is in its document;
a sync request waiting for the task answers from what the document then holds (so
``/result`` always agrees with the sync answer).
"""

from __future__ import annotations

import msgspec
from msgspec import Struct

MAX_FOLDED_DOCUMENT = 256 * 1024
"""A task document larger than this (BSON bytes) is not carried: the waiter reads it."""


class TaskOutcome(Struct, kw_only=True, frozen=True, omit_defaults=True):
    """A task's outcome as the fold that ended it wrote it into the task document: every
    field of it, so the document holds exactly these values from then on."""

    status: str
    """A terminal ``TaskStatus`` value."""
    images: list[str] = []
    info: str = ""
    seeds: list[int] = []
    code: str | None = None
    message: str = ""


class TaskFolded(Struct, kw_only=True, frozen=True, omit_defaults=True):
    task_id: str
    outcome: TaskOutcome | None = None
    """When this notice's fold is the one that ended the task: the outcome it wrote (the
    sink tells at once, with no read back)."""
    document: bytes = b""
    """Otherwise (the task had ended already, by an earlier fold or another writer): the
    task document as the store holds it (BSON, the store's own encoding, read back after
    the fold), so the waiter need not read it again; empty when it is larger than
    ``MAX_FOLDED_DOCUMENT`` or could not be read (then the waiter reads it)."""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(TaskFolded)


def encode_folded(notice: TaskFolded) -> bytes:
    return _encoder.encode(notice)


def decode_folded(data: bytes) -> TaskFolded:
    """Raises ``msgspec.DecodeError`` for anything else (an empty notice of a sink from
    before the document was carried)."""
    return _decoder.decode(data)
