"""Golden payloads: yesterday's messages must decode with today's structs."""

from pathlib import Path

import msgspec
import pytest

from proto import GenerateImage, TaskKind
from proto.codec import decode_generate, encode
from proto.events import (
    TaskFailed,
    TaskProgressed,
    TaskSucceeded,
    decode_event,
    encode_event,
    event_kind,
)
from proto.requests import Txt2ImgRequest

GOLDEN = Path(__file__).parent.parent / "golden"


def test_golden_generate_image_v1_decodes() -> None:
    command = decode_generate((GOLDEN / "generate_image_v1.json").read_bytes())
    assert TaskKind.TXT2IMG == command.kind
    assert command.txt2img is not None
    assert "a photo of a cat" == command.txt2img.prompt
    assert 0.5 == command.txt2img.eta


@pytest.mark.parametrize(
    ("line", "kind"),
    [(0, "started"), (1, "progress"), (2, "succeeded"), (3, "failed"), (4, "cancelled")],
)
def test_golden_events_v1_decode(line: int, kind: str) -> None:
    payload = (GOLDEN / "events_v1.jsonl").read_bytes().splitlines()[line]
    event = decode_event(payload)
    assert kind == event_kind(event)
    assert "t1" == event.task_id


def test_events_round_trip_and_omit_defaults() -> None:
    event = TaskProgressed(task_id="t1", step=3, total_steps=20, progress=0.15)
    data = encode_event(event)
    assert b'"kind":"progress"' in data
    assert b"preview_key" not in data
    assert event == decode_event(data)


def test_unknown_event_fields_are_tolerated() -> None:
    event = decode_event(b'{"kind":"failed","task_id":"t1","code":"x","message":"m","new":1}')
    assert isinstance(event, TaskFailed)


def test_unknown_event_kind_is_a_decode_error() -> None:
    with pytest.raises(msgspec.ValidationError):
        decode_event(b'{"kind":"exploded","task_id":"t1"}')


def test_generate_image_round_trip() -> None:
    request = msgspec.convert({"stable_diffusion_model": "m", "steps": 3}, Txt2ImgRequest)
    command = GenerateImage(
        task_id="t1", user="u", model_name="m", model_key="m-000000", txt2img=request
    )
    assert command == decode_generate(encode(command))


def test_succeeded_requires_images() -> None:
    with pytest.raises(msgspec.ValidationError, match="images"):
        decode_event(b'{"kind":"succeeded","task_id":"t1"}')
    assert TaskSucceeded(task_id="t", images=[]) == decode_event(
        b'{"kind":"succeeded","task_id":"t","images":[]}'
    )


def test_skipped_progress_is_optional_on_the_wire() -> None:
    old = decode_event(b'{"kind":"progress","task_id":"t1","step":3,"total_steps":20}')
    assert isinstance(old, TaskProgressed)
    assert old.skipped is False, "yesterday's progress decodes as not skipped"
    assert b"skipped" not in encode_event(old)
    marked = TaskProgressed(task_id="t1", step=3, total_steps=20, skipped=True)
    assert marked == decode_event(encode_event(marked))


def test_terminal_events_are_the_terminal_statuses() -> None:
    """One definition: the events that end a task carry the names of the final statuses,
    and the open statuses are exactly the others."""
    from proto import OPEN_STATUSES, TERMINAL_STATUSES, TaskStatus
    from proto.events import TERMINAL_KINDS

    assert {s.value for s in TERMINAL_STATUSES} == set(TERMINAL_KINDS)
    assert set(TaskStatus) == set(OPEN_STATUSES) | TERMINAL_STATUSES
    assert not set(OPEN_STATUSES) & TERMINAL_STATUSES
