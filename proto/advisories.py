"""JetStream's own advisories that sdswarm acts on (their JSON, as nats-server sends it).

Only the fields we use are declared; the rest of each payload is ignored.
"""

from __future__ import annotations

import msgspec
from msgspec import Struct

MAX_DELIVER_TYPE = "io.nats.jetstream.advisory.v1.max_deliver"
TERMINATED_TYPE = "io.nats.jetstream.advisory.v1.terminated"


class ConsumerAdvisory(Struct, kw_only=True, frozen=True):
    """``io.nats.jetstream.advisory.v1.max_deliver`` and ``...terminated``."""

    type: str
    stream: str
    consumer: str
    stream_seq: int
    deliveries: int = 0
    reason: str = ""


_decoder = msgspec.json.Decoder(ConsumerAdvisory)


def decode_advisory(data: bytes) -> ConsumerAdvisory:
    return _decoder.decode(data)
