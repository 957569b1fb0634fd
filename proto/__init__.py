"""The wire contract of sdswarm: pure data, no I/O.

Every message on NATS is a msgspec Struct defined here, and every name on the bus
(subject, stream, consumer, bucket, header) is built by :mod:`proto.names`.
"""

from proto.commands import GenerateImage
from proto.enums import (
    OPEN_STATUSES,
    TERMINAL_STATUSES,
    ModelFamily,
    ModelStatus,
    ModelType,
    TaskKind,
    TaskStatus,
)
from proto.events import (
    TaskCancelled,
    TaskEvent,
    TaskFailed,
    TaskProgressed,
    TaskStarted,
    TaskSucceeded,
)
from proto.requests import ExtraImagesRequest, Img2ImgRequest, Txt2ImgRequest

__all__ = [
    "OPEN_STATUSES",
    "TERMINAL_STATUSES",
    "ExtraImagesRequest",
    "GenerateImage",
    "Img2ImgRequest",
    "ModelFamily",
    "ModelStatus",
    "ModelType",
    "TaskCancelled",
    "TaskEvent",
    "TaskFailed",
    "TaskKind",
    "TaskProgressed",
    "TaskStarted",
    "TaskStatus",
    "TaskSucceeded",
    "Txt2ImgRequest",
]
