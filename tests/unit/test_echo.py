"""The result's ``parameters`` come from the task's one copy of the request: its command."""

from __future__ import annotations

from proto.codec import encode
from proto.commands import ExtrasTask, Txt2ImgTask
from proto.requests import ExtrasOptions, Txt2ImgRequest, to_builtins
from services.gateway.submit import echoed_parameters
from tests.documents import task_document


def test_generation_echoes_its_request_with_defaults() -> None:
    request = Txt2ImgRequest(stable_diffusion_model="m", prompt="a fox", steps=7)
    command = Txt2ImgTask(task_id="t", user="u", model_name="m", model_key="k", request=request)
    shown = echoed_parameters(task_document("t", command=encode(command)))
    assert to_builtins(request) == shown
    assert ("a fox", 7, 512) == (shown["prompt"], shown["steps"], shown["width"])


def test_extras_echo_their_keys_in_the_field_the_client_used() -> None:
    keys = ["inputs/u/t_0.png", "inputs/u/t_1.png"]
    command = ExtrasTask(
        task_id="t", user="u", model_name="x", model_key="x", request=ExtrasOptions(),
        input_keys=keys,
    )  # fmt: skip
    single = task_document("t", command=encode(command)) | {"images_field": "image"}
    batch = task_document("t", command=encode(command)) | {"images_field": "imageList"}
    assert keys[0] == echoed_parameters(single)["image"]
    assert keys == echoed_parameters(batch)["imageList"]
    assert 2.0 == echoed_parameters(batch)["upscaling_resize"]


def test_older_documents_and_unreadable_commands() -> None:
    legacy = task_document("t") | {"parameters": {"steps": 4}}
    assert {"steps": 4} == echoed_parameters(legacy), "stored beside the command before"
    assert {} == echoed_parameters(task_document("t", command=b"not a command"))
    assert {} == echoed_parameters(task_document("t"))
