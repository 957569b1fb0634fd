"""The A1111 presentation (infotext, ``info``, warnings) without torch.

``tests/golden/a1111_presentation_v1.json`` holds what the worker produced for these
requests before the presentation left the pipeline module: the texts must stay
byte-identical (clients parse infotexts back, and PNG metadata is compared by users).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from proto.commands import AdapterRef
from proto.requests import ExtrasOptions, Img2ImgRequest, Txt2ImgRequest
from services.inference import presentation

GOLDEN = json.loads(
    (Path(__file__).parent.parent / "golden" / "a1111_presentation_v1.json").read_text()
)
BASE = {"prompt": "a cat", "stable_diffusion_model": "tiny.safetensors", "steps": 20}
TXT2IMG: list[dict[str, Any]] = [
    {},
    {"negative_prompt": "blurry", "sampler_name": "DPM++ 2M Karras", "cfg_scale": 6.5},
    {"subseed_strength": 0.3, "seed_resize_from_w": 640, "seed_resize_from_h": 480},
    {"enable_hr": True, "hr_scale": 2, "hr_second_pass_steps": 5, "denoising_strength": 0.6},
    {"enable_hr": True, "hr_resize_x": 1024, "hr_resize_y": 768, "hr_upscaler": "Lanczos"},
    {"override_settings": {"CLIP_stop_at_last_layers": 2, "eta_noise_seed_delta": 31337}},
    {"tiling": True, "restore_faces": True, "s_churn": 0.5, "sampler_name": "Heun"},
    {"sampler_name": "Euler a", "eta": 0.5, "s_min_uncond": 0.2},
    {"alwayson_scripts": {"controlnet": {"args": []}, "ADetailer": {}}, "script_name": "x/y"},
    {"styles": ["s1"], "batch_size": 2, "n_iter": 2, "prompt": 'ünïcode, "quoted"'},
]
IMG2IMG: list[dict[str, Any]] = [
    {"init_images": ["k"]},
    {"init_images": ["k"], "resize_mode": 3, "denoising_strength": 0.4},
    {"init_images": ["k"], "initial_noise_multiplier": 0.9, "resize_mode": 1},
    {"init_images": ["k"], "mask": "m", "mask_blur": 6, "inpainting_fill": 2},
    {
        "init_images": ["k"],
        "mask": "m",
        "inpainting_fill": 3,
        "inpainting_mask_invert": 1,
        "inpaint_full_res": True,
        "inpaint_full_res_padding": 40,
        "mask_round": False,
        "alwayson_scripts": {"ControlNet": {"args": []}},
        "resize_mode": 3,
        "override_settings": {"eta_noise_seed_delta": 5},
    },
]
EXTRAS: list[dict[str, Any]] = [
    {},
    {"gfpgan_visibility": 0.5, "upscaler_1": "None"},
    {"upscaler_1": "Lanczos", "upscaling_resize": 2},
    {
        "upscaler_1": "Lanczos",
        "resize_mode": 1,
        "upscaling_crop": True,
        "upscaling_resize_w": 300,
        "upscaling_resize_h": 200,
        "upscaler_2": "Nearest",
        "extras_upscaler_2_visibility": 0.4,
    },
]
LORA = AdapterRef(name="ink", path="/x/ink.safetensors", sha256="0123456789abcdef0123")
VAE = AdapterRef(name="vae.safetensors", path="/x/vae", sha256="fedcba98765432100000")
MODEL = {"model_name": "dir/tiny.safetensors", "model_hash": "abc"}


def _requests() -> list[Txt2ImgRequest | Img2ImgRequest]:
    out: list[Txt2ImgRequest | Img2ImgRequest] = []
    out += [msgspec.convert(BASE | extra, Txt2ImgRequest) for extra in TXT2IMG]
    out += [msgspec.convert(BASE | extra, Img2ImgRequest) for extra in IMG2IMG]
    return out


def test_importing_it_loads_no_torch() -> None:
    code = (
        "import sys, services.inference.presentation\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'diffusers' not in sys.modules, 'diffusers imported'\n"
    )
    root = Path(__file__).parents[2]  # this checkout, not an installed copy
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert 0 == done.returncode, done.stderr


@pytest.mark.parametrize("index", range(len(TXT2IMG) + len(IMG2IMG)))
def test_generation_texts_are_byte_identical(index: int) -> None:
    request = _requests()[index]
    expected = GOLDEN["generation"][index]
    texts = [
        presentation.infotext(request, 42, MODEL["model_name"], MODEL["model_hash"]),
        presentation.infotext(
            request,
            7,
            "tiny.safetensors",
            "abc",
            [LORA],
            VAE,
            [LORA],
            None,
            subseed=99,
            face_restoration="GFPGAN",
        ),
    ]
    assert expected["infotexts"] == texts
    info = presentation.info(request, [42, 43], texts, [99, 100], restored=False, **MODEL)
    restored = presentation.info(request, [42], texts[:1], [99], restored=True, **MODEL)
    for summary in (info, restored):
        assert summary.pop("job_timestamp").isdigit()
    assert expected["info"] == presentation.info_json(info)
    assert expected["info_restored"] == presentation.info_json(restored)


def test_extras_text_is_byte_identical() -> None:
    texts = [presentation.extras_infotext(msgspec.convert(e, ExtrasOptions)) for e in EXTRAS]
    assert GOLDEN["extras"] == texts


def test_what_is_not_honoured_is_a_warning() -> None:
    plain = msgspec.convert({"stable_diffusion_model": "m", "mask": "m"}, Img2ImgRequest)
    assert [] == presentation.img2img_warnings(plain, controlnet=False)
    request = msgspec.convert(
        {
            "stable_diffusion_model": "m",
            "mask": "m",
            "mask_round": False,
            "resize_mode": 3,
            "inpainting_fill": 2,
            "initial_noise_multiplier": 0.5,
        },
        Img2ImgRequest,
    )
    assert 1 == len(presentation.img2img_warnings(request, controlnet=False))
    assert 4 == len(presentation.img2img_warnings(request, controlnet=True))


def test_request_options() -> None:
    request = msgspec.convert(
        BASE
        | {
            "override_settings": {
                "CLIP_stop_at_last_layers": 3,
                "eta_noise_seed_delta": 9,
                "show_progress_every_n_steps": 2,
            },
            "s_churn": 0.4,
            "s_tmax": 0,
        },
        Txt2ImgRequest,
    )
    assert (2, 9, 2) == (
        presentation.clip_skip(request),
        presentation.noise_seed_delta(request),
        presentation.preview_every(request),
    )
    churn = presentation.churn(request)
    assert churn is not None
    assert (0.4, 0.0, float("inf"), 1.0) == (
        churn["s_churn"],
        churn["s_tmin"],
        churn["s_tmax"],
        churn["s_noise"],
    )
    assert presentation.churn(msgspec.convert(BASE, Txt2ImgRequest)) is None
