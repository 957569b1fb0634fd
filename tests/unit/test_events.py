"""Golden payloads: yesterday's messages must decode with today's structs."""

from pathlib import Path

import msgspec
import pytest

from proto import TaskKind
from proto.codec import decode_generate, encode
from proto.commands import Txt2ImgTask
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
    assert isinstance(command, Txt2ImgTask), "a v1 command is read into today's union"
    assert "a photo of a cat" == command.request.prompt
    assert 0.5 == command.request.eta


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
    command = Txt2ImgTask(
        task_id="t1", user="u", model_name="m", model_key="m-000000", request=request
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


def test_golden_generate_image_v2_decodes_and_always_says_its_version() -> None:
    from proto.commands import SCHEMA_VERSION

    data = (GOLDEN / "generate_image_v2.json").read_bytes()
    command = decode_generate(data)
    assert isinstance(command, Txt2ImgTask)
    assert (TaskKind.TXT2IMG, "a photo of a cat") == (command.kind, command.request.prompt)
    assert 2 == SCHEMA_VERSION == command.schema_version
    # The version and the kind are on the wire even at their defaults: a later reader
    # must never mistake this command for one of its own version.
    assert b'"kind":"txt2img"' in encode(command)
    assert f'"schema_version":{SCHEMA_VERSION}'.encode() in encode(command)


def test_v1_commands_of_every_kind_are_read_into_the_union() -> None:
    from proto.commands import ExtrasTask, Img2ImgTask

    base = {"task_id": "t", "user": "u", "model_name": "m", "model_key": "m-1"}
    img2img = msgspec.json.encode(
        base
        | {
            "kind": "img2img",
            "img2img": {"stable_diffusion_model": "m", "init_images": ["k"]},
            "input_keys": ["k"],
        }
    )
    extras = msgspec.json.encode(
        base | {"kind": "extras", "extras": {"upscaling_resize": 3}, "upscalers": {"x": "/x"}}
    )
    txt2img = msgspec.json.encode(base | {"txt2img": {"stable_diffusion_model": "m"}})  # no kind
    first, second, third = (decode_generate(d) for d in (img2img, extras, txt2img))
    assert isinstance(first, Img2ImgTask)
    assert (["k"], ["k"]) == (first.request.init_images, first.input_keys)
    assert isinstance(second, ExtrasTask)
    assert (3.0, {"x": "/x"}) == (second.request.upscaling_resize, second.upscalers)
    assert isinstance(third, Txt2ImgTask)


def test_a_newer_schema_is_refused_by_name() -> None:
    from proto.codec import SchemaTooNewError
    from proto.commands import SCHEMA_VERSION

    command = decode_generate((GOLDEN / "generate_image_v2.json").read_bytes())
    newer = msgspec.structs.replace(command, schema_version=SCHEMA_VERSION + 1)
    with pytest.raises(SchemaTooNewError, match=f"schema version {SCHEMA_VERSION + 1}"):
        decode_generate(encode(newer))
    unknown = msgspec.json.encode({"kind": "video", "schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(SchemaTooNewError):
        decode_generate(unknown)
