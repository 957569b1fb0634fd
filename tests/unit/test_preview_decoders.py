"""TAESD preview decoders (type ``vaeApprox``): recognised from their tensors, chosen per
checkpoint family, and handed to the checkpoint's workers (no I/O)."""

from __future__ import annotations

from typing import Any

from proto import ModelFamily, ModelStatus, ModelType
from services.common.settings import from_environ
from services.inference.settings import WorkerSettings
from services.scheduler.app import preview_decoder
from services.scheduler.local import worker_environ
from services.scheduler.settings import SchedulerSettings
from services.storage.modelfiles import TensorInfo, detect_model_type
from tests.integration.scheduling import checkpoint

FIRST = TensorInfo("F32", (64, 4, 3, 3))
CONV = TensorInfo("F32", (64, 64, 3, 3))


def test_both_taesd_layouts_are_preview_decoders_and_upscalers_are_not() -> None:
    released = {"1.weight": FIRST, "1.bias": TensorInfo("F32", (64,)), "3.conv.0.weight": CONV}
    diffusers = {
        "decoder.layers.0.weight": FIRST,
        "decoder.layers.2.conv.0.weight": CONV,
        "encoder.layers.0.weight": TensorInfo("F32", (64, 3, 3, 3)),
    }
    assert ModelType.VAE_APPROX == detect_model_type(released)
    assert ModelType.VAE_APPROX == detect_model_type(diffusers)
    # A bare sequence whose first layer does not take 4 latent channels is not TAESD.
    rgb_first = {"1.weight": TensorInfo("F32", (64, 3, 3, 3)), "3.conv.0.weight": CONV}
    assert ModelType.VAE_APPROX != detect_model_type(rgb_first)
    esrgan = {"model.0.weight": TensorInfo("F32", (64, 3, 3, 3)), "model.0.bias": FIRST}
    assert ModelType.UPSCALER == detect_model_type(esrgan)


def _decoder(name: str, status: ModelStatus = ModelStatus.UNLOADED) -> dict[str, Any]:
    return {"name": name, "path": f"/m/VAE-approx/{name}", "status": status.value}


def test_each_family_gets_its_own_decoder() -> None:
    decoders = [
        _decoder("taesdxl_decoder.safetensors"),
        _decoder("taesd_decoder.safetensors"),
        _decoder("taesd3_decoder.safetensors"),
    ]
    assert preview_decoder(ModelFamily.SD1.value, decoders).endswith("/taesd_decoder.safetensors")
    assert preview_decoder(ModelFamily.SD2.value, decoders).endswith("/taesd_decoder.safetensors")
    assert preview_decoder(ModelFamily.SDXL.value, decoders).endswith(
        "/taesdxl_decoder.safetensors"
    )
    assert "" == preview_decoder(ModelFamily.SDXL.value, decoders[1:]), "SD3's does not fit SDXL"
    broken = [_decoder("taesd_decoder.safetensors", ModelStatus.FAILED)]
    assert "" == preview_decoder(ModelFamily.SD1.value, broken)


def test_the_worker_is_told_its_decoder() -> None:
    model = checkpoint("m.safetensors")
    model["preview_decoder"] = "/m/VAE-approx/taesd_decoder.safetensors"
    settings = from_environ(WorkerSettings, worker_environ(SchedulerSettings(), model))
    assert "/m/VAE-approx/taesd_decoder.safetensors" == settings.preview_decoder_path
    plain = from_environ(WorkerSettings, worker_environ(SchedulerSettings(), checkpoint("n")))
    assert "" == plain.preview_decoder_path
