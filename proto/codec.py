"""Typed encoders/decoders, built once (msgspec decoders are reusable and fast)."""

from __future__ import annotations

import msgspec

from proto.commands import GenerateImage

_encoder = msgspec.json.Encoder()
_generate_decoder = msgspec.json.Decoder(GenerateImage)


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decode_generate(data: bytes) -> GenerateImage:
    return _generate_decoder.decode(data)
