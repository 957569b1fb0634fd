"""Which tasks may share a diffusers call: face restoration runs alone."""

import msgspec

from proto import GenerateImage
from proto.commands import AdapterRef, Txt2ImgTask
from proto.requests import Txt2ImgRequest
from services.inference.batching import batch_key


def _command(**fields: object) -> GenerateImage:
    body = {"stable_diffusion_model": "m.safetensors", "prompt": "a cat", "restore_faces": True}
    return Txt2ImgTask(
        task_id="t",
        user="u",
        model_name="m.safetensors",
        model_key="m-000000",
        request=msgspec.convert(body, Txt2ImgRequest),
        **fields,  # type: ignore[arg-type]
    )


def test_a_task_restoring_faces_is_never_batched() -> None:
    assert batch_key(_command()) is not None, "restore_faces alone (no restorer) batches"
    restorer = AdapterRef(name="gfpgan", path="/models/GFPGAN/gfpgan.safetensors")
    assert batch_key(_command(face_restorer=restorer)) is None
