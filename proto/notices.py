"""Core-NATS notices (not stored in a stream): ``sd.folded.<task_id>``.

The sink publishes :class:`TaskFolded` once a task's terminal event is in its document;
a sync request waiting for the task answers from that document (so ``/result`` always
agrees with the sync answer).
"""

from __future__ import annotations

import msgspec
from msgspec import Struct

MAX_FOLDED_DOCUMENT = 256 * 1024
"""A task document larger than this (BSON bytes) is not carried: the waiter reads it."""


class TaskFolded(Struct, kw_only=True, frozen=True, omit_defaults=True):
    task_id: str
    document: bytes = b""
    """The task document as the store holds it once the end is folded in (BSON, the
    store's own encoding, read back after the fold), so the waiter need not read it
    again; empty when it is larger than ``MAX_FOLDED_DOCUMENT`` or could not be read
    (then the waiter reads it)."""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(TaskFolded)


def encode_folded(notice: TaskFolded) -> bytes:
    return _encoder.encode(notice)


def decode_folded(data: bytes) -> TaskFolded:
    """Raises ``msgspec.DecodeError`` for anything else (an empty notice of a sink from
    before the document was carried)."""
    return _decoder.decode(data)
