import msgspec
import pytest

from proto.requests import Img2ImgRequest, Txt2ImgRequest, to_builtins
from proto.samplers import SAMPLERS, split_sampler


def test_float_fields_accept_fractions_the_seed_rejected() -> None:
    body = {
        "stable_diffusion_model": "m.safetensors",
        "eta": 0.5,
        "s_churn": 0.1,
        "s_tmax": 1.5,
        "s_tmin": 0.05,
        "s_noise": 1.003,
        "s_min_uncond": 0.2,
        "hr_scale": 1.5,
        "subseed_strength": 0.3,
        "cfg_scale": 6.5,
        "denoising_strength": 0.45,
    }
    request = msgspec.convert(body, Txt2ImgRequest)
    assert 1.5 == request.hr_scale
    assert 0.5 == request.eta
    img = msgspec.convert({**body, "initial_noise_multiplier": 0.98}, Img2ImgRequest)
    assert 0.98 == img.initial_noise_multiplier


def test_unknown_fields_are_ignored() -> None:
    request = msgspec.json.decode(
        b'{"stable_diffusion_model": "m", "brand_new_a1111_field": {"x": 1}}',
        type=Txt2ImgRequest,
    )
    assert "m" == request.stable_diffusion_model


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"stable_diffusion_model": "m", "width": 513}', "$.width"),
        (b'{"stable_diffusion_model": "m", "steps": 0}', "$.steps"),
        (b'{"stable_diffusion_model": "m", "cfg_scale": "high"}', "$.cfg_scale"),
        (b'{"stable_diffusion_model": ""}', "$.stable_diffusion_model"),
        (b"{}", "stable_diffusion_model"),
    ],
)
def test_structural_rules_name_the_field(body: bytes, field: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=field.replace("$", r"\$")):
        msgspec.json.decode(body, type=Txt2ImgRequest)


def test_parameters_include_defaults() -> None:
    request = msgspec.convert({"stable_diffusion_model": "m"}, Txt2ImgRequest)
    parameters = to_builtins(request)
    assert 20 == parameters["steps"]
    assert 512 == parameters["width"]
    assert "Euler" == parameters["sampler_index"]


@pytest.mark.parametrize(
    ("name", "scheduler", "expected"),
    [
        ("Euler a", None, ("Euler a", "Automatic")),
        ("DPM++ 2M Karras", None, ("DPM++ 2M", "Karras")),
        ("DPM++ 2M", "karras", ("DPM++ 2M", "Karras")),
        ("ddim", None, ("DDIM", "Automatic")),
        # The names /sdapi/v1/schedulers lists (and webuiapi's default, "automatic").
        ("Euler", "sgm_uniform", ("Euler", "SGM Uniform")),
        ("Euler", "automatic", ("Euler", "Automatic")),
        ("Euler", "SGM Uniform", ("Euler", "SGM Uniform")),
    ],
)
def test_split_sampler(name: str, scheduler: str | None, expected: tuple[str, str]) -> None:
    assert expected == split_sampler(name, scheduler)


def test_unknown_sampler_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="valid samplers: Euler, Euler a") as info:
        split_sampler("Turbo 9000")
    for name in SAMPLERS:
        assert name in str(info.value)


def test_firstphase_fields_map_to_todays_hires_fields() -> None:
    legacy = msgspec.convert(
        {
            "stable_diffusion_model": "m",
            "enable_hr": True,
            "width": 1024,
            "height": 768,
            "firstphase_width": 512,
            "firstphase_height": 384,
        },
        Txt2ImgRequest,
    ).with_firstphase()
    assert (512, 384, 1024, 768) == (
        legacy.width,
        legacy.height,
        legacy.hr_resize_x,
        legacy.hr_resize_y,
    )
    assert (1024, 768) == legacy.hr_size()
    plain = msgspec.convert(
        {"stable_diffusion_model": "m", "firstphase_width": 512}, Txt2ImgRequest
    )
    assert plain is plain.with_firstphase(), "without hires fix the fields mean nothing"
    with pytest.raises(msgspec.ValidationError, match="firstphase_width"):
        msgspec.convert({"stable_diffusion_model": "m", "firstphase_width": 500}, Txt2ImgRequest)
