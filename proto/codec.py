"""Typed encoders/decoders, built once (msgspec decoders are reusable and fast)."""

from __future__ import annotations

from typing import Any

import msgspec

from proto.commands import (
    SCHEMA_VERSION,
    ExtrasTask,
    GenerateImage,
    Img2ImgTask,
    Txt2ImgTask,
)

_encoder = msgspec.json.Encoder()
_generate_decoder = msgspec.json.Decoder(GenerateImage)
_v1_decoder = msgspec.json.Decoder(dict[str, Any])
_V1_KINDS = {"txt2img": Txt2ImgTask, "img2img": Img2ImgTask, "extras": ExtrasTask}


class SchemaTooNewError(ValueError):
    """A command of a schema version this code does not know (a newer gateway's)."""

    def __init__(self, version: int) -> None:
        super().__init__(
            f"the command has schema version {version}; this worker reads up to"
            f" {SCHEMA_VERSION}: upgrade the worker image"
        )
        self.version = version


class _TaskId(msgspec.Struct):
    task_id: str


_task_id_decoder = msgspec.json.Decoder(_TaskId)


def command_task_id(data: bytes) -> str:
    """The task id of a command, whatever its version (``msgspec.DecodeError`` when the
    bytes are no command): enough to end a task whose command cannot be read whole."""
    return _task_id_decoder.decode(data).task_id


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decode_generate(data: bytes) -> GenerateImage:
    """A task's command. Version 1 commands (``kind`` plus ``txt2img``/``img2img``/
    ``extras``; still queued during an upgrade) are read into today's union; a newer
    version raises :class:`SchemaTooNewError` (``msgspec.DecodeError`` when it is not a
    command at all)."""
    try:
        command = _generate_decoder.decode(data)
    except msgspec.ValidationError:
        fields = _v1_decoder.decode(data)
        version = fields.get("schema_version", 1)
        if isinstance(version, int) and version > SCHEMA_VERSION:
            raise SchemaTooNewError(version) from None
        if version != 1:
            raise
        return _from_v1(fields)
    if command.schema_version > SCHEMA_VERSION:
        raise SchemaTooNewError(command.schema_version)
    return command


def _from_v1(fields: dict[str, Any]) -> GenerateImage:
    kind = fields.pop("kind", "txt2img")
    task = _V1_KINDS.get(kind)
    if task is None:
        raise msgspec.ValidationError(f"v1 command of unknown kind {kind!r}")
    payloads = {name: fields.pop(name, None) for name in _V1_KINDS}
    if kind != "extras":
        fields.pop("upscalers", None)
    fields |= {"request": payloads[kind], "kind": kind, "schema_version": SCHEMA_VERSION}
    converted: GenerateImage = msgspec.convert(fields, GenerateImage)
    return converted
