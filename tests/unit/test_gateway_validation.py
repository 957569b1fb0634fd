import msgspec
import pytest

from proto.requests import Txt2ImgRequest
from services.gateway.auth import auth_enabled, is_loopback, parse_api_keys
from services.gateway.errors import ApiError
from services.gateway.settings import GatewaySettings
from services.gateway.validation import bounded_int, check_limits, decode


def _request(**fields: object) -> Txt2ImgRequest:
    return msgspec.convert({"stable_diffusion_model": "m", **fields}, Txt2ImgRequest)


def test_not_json_is_400() -> None:
    with pytest.raises(ApiError) as info:
        decode(b"{not json", Txt2ImgRequest)
    assert 400 == info.value.status


def test_rule_violation_is_422_naming_the_field() -> None:
    with pytest.raises(ApiError) as info:
        decode(b'{"stable_diffusion_model": "m", "width": 513}', Txt2ImgRequest)
    assert (422, "width") == (info.value.status, info.value.field)
    assert "multiple of 8" in info.value.message


def test_missing_required_field_is_named() -> None:
    with pytest.raises(ApiError) as info:
        decode(b'{"prompt": "x"}', Txt2ImgRequest)
    assert (422, "stable_diffusion_model") == (info.value.status, info.value.field)


@pytest.mark.parametrize(
    ("fields", "field", "text"),
    [
        ({"steps": 151}, "steps", "`steps` must be at most 150 but is 151"),
        ({"width": 4096}, "width", "at most 2048"),
        ({"batch_size": 9}, "batch_size", "at most 8"),
        ({"batch_size": 8, "n_iter": 5}, "n_iter", "images (batch_size × n_iter)"),
        ({"prompt": "x" * 20_001}, "prompt", "characters"),
        ({"sampler_name": "Nope"}, "sampler_name", "valid samplers"),
        ({"sampler_name": "Euler", "scheduler": "Bogus"}, "scheduler", "valid schedule types"),
        (
            {"enable_hr": True, "width": 1024, "height": 1024, "hr_scale": 4},
            "hr_scale",
            "pixels wide after hires fix",
        ),
        ({"enable_hr": True, "hr_sampler_name": "Nope"}, "hr_sampler_name", "valid samplers"),
    ],
)
def test_limits(fields: dict[str, object], field: str, text: str) -> None:
    with pytest.raises(ApiError) as info:
        check_limits(_request(**fields), GatewaySettings())
    assert (422, field) == (info.value.status, info.value.field)
    assert text in info.value.message


def test_limits_are_configurable() -> None:
    check_limits(_request(steps=500), GatewaySettings(max_steps=500))
    with pytest.raises(ApiError):
        check_limits(_request(width=1024, height=1024), GatewaySettings(max_pixels=512 * 512))


def test_auth_required_beyond_loopback() -> None:
    assert all(is_loopback(host) for host in ("127.0.0.1", "::1", "localhost"))
    assert not is_loopback("0.0.0.0")
    assert not auth_enabled(GatewaySettings(host="127.0.0.1"))
    assert auth_enabled(GatewaySettings(host="0.0.0.0"))
    assert auth_enabled(GatewaySettings(host="10.0.0.5"))
    assert auth_enabled(GatewaySettings(host="127.0.0.1", auth=True))
    assert auth_enabled(GatewaySettings(host="127.0.0.1", api_keys=["alice:" + "k" * 16]))


def test_api_keys_are_parsed_and_checked() -> None:
    assert {"k" * 16: "alice"} == parse_api_keys(["alice:" + "k" * 16])
    with pytest.raises(SystemExit):
        parse_api_keys(["alice:short"])
    with pytest.raises(SystemExit):
        parse_api_keys(["../evil:" + "k" * 16])


@pytest.mark.parametrize("value", [0, 13, "2", 1.5, True])
def test_clip_skip_option_is_checked(value: object) -> None:
    request = _request(override_settings={"CLIP_stop_at_last_layers": value})
    with pytest.raises(ApiError) as info:
        check_limits(request, GatewaySettings())
    assert "override_settings.CLIP_stop_at_last_layers" == info.value.field


def test_hires_size_follows_a1111() -> None:
    assert (1024, 1024) == _request(enable_hr=True, hr_scale=2).hr_size()
    assert (768, 1152) == _request(enable_hr=True, height=768, hr_resize_x=768).hr_size()
    assert (1000, 1000) == _request(enable_hr=True, hr_resize_x=1003, hr_resize_y=1001).hr_size()


@pytest.mark.parametrize(
    ("cls", "fields", "field"),
    [
        ("txt2img", {"seed_resize_from_w": 4096, "seed_resize_from_h": 64}, "seed_resize_from_w"),
        ("txt2img", {"override_settings": {"eta_noise_seed_delta": -1}}, None),
        ("txt2img", {"override_settings": {"eta_noise_seed_delta": "31337"}}, None),
        ("img2img", {"subseed_strength": 0.5, "subseed": 3}, "subseed_strength"),
        ("img2img", {"seed_resize_from_w": 64, "seed_resize_from_h": 64}, "seed_resize_from_w"),
    ],
)
def test_noise_options_are_checked(cls: str, fields: dict[str, object], field: str | None) -> None:
    from proto.requests import Img2ImgRequest

    body = {"stable_diffusion_model": "m", **fields}
    request: Txt2ImgRequest | Img2ImgRequest = (
        msgspec.convert(body, Txt2ImgRequest)
        if cls == "txt2img"
        else msgspec.convert(body, Img2ImgRequest)
    )
    with pytest.raises(ApiError) as info:
        check_limits(request, GatewaySettings())
    expected = field or "override_settings.eta_noise_seed_delta"
    assert (422, expected) == (info.value.status, info.value.field)


def _accepted(**fields: object) -> Txt2ImgRequest:
    """The request as the gateway queues it: decoded from the client's JSON and checked."""
    body = msgspec.json.encode({"stable_diffusion_model": "m", **fields})
    request = decode(body, Txt2ImgRequest)
    check_limits(request, GatewaySettings())
    return request


def test_noise_options_that_run_pass() -> None:
    request = _accepted(
        subseed=5,
        subseed_strength=0.3,
        seed_resize_from_w=256,
        seed_resize_from_h=320,
        override_settings={"eta_noise_seed_delta": 31337},
    )
    # Queued as sent: nothing dropped or coerced on the way.
    assert (5, 0.3, 256, 320, {"eta_noise_seed_delta": 31337}) == (
        request.subseed,
        request.subseed_strength,
        request.seed_resize_from_w,
        request.seed_resize_from_h,
        request.override_settings,
    )


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"refiner_checkpoint": "sdxl_refiner.safetensors"}, "refiner_checkpoint"),
        ({"enable_hr": True, "hr_checkpoint_name": "other.safetensors"}, "hr_checkpoint_name"),
    ],
)
def test_refiner_and_hires_checkpoint_are_refused(fields: dict[str, object], field: str) -> None:
    with pytest.raises(ApiError) as info:
        check_limits(_request(**fields), GatewaySettings())
    assert (422, "unsupported", field) == (info.value.status, info.value.code, info.value.field)


@pytest.mark.parametrize(
    ("refiner", "hires"), [("None", "Use same checkpoint"), ("", "m"), (None, None)]
)
def test_their_no_op_values_pass(refiner: str | None, hires: str | None) -> None:
    fields = {"refiner_checkpoint": refiner, "enable_hr": True, "hr_checkpoint_name": hires}
    request = _accepted(**fields)
    assert (refiner, True, hires) == (
        request.refiner_checkpoint,
        request.enable_hr,
        request.hr_checkpoint_name,
    )


def test_integers_mongodb_cannot_store_are_refused() -> None:
    body = b'{"stable_diffusion_model": "m", "override_settings": {"x": [1, %d]}}'
    fits = decode(body % (2**63 - 1), Txt2ImgRequest)  # fits in 64 bits
    assert {"x": [1, 2**63 - 1]} == fits.override_settings
    with pytest.raises(ApiError) as info:
        decode(body % 2**63, Txt2ImgRequest)
    assert (422, "override_settings.x[1]") == (info.value.status, info.value.field)


def test_image_denoising_must_run_a_step() -> None:
    from proto.requests import Img2ImgRequest

    one_step = msgspec.convert({"stable_diffusion_model": "m", "steps": 1}, Img2ImgRequest)
    with pytest.raises(ApiError) as info:
        check_limits(one_step, GatewaySettings())  # 1 × 0.75 → no step
    assert (422, "steps") == (info.value.status, info.value.field)
    check_limits(msgspec.structs.replace(one_step, denoising_strength=1.0), GatewaySettings())
    hires = _request(enable_hr=True, steps=1, denoising_strength=0.5)
    with pytest.raises(ApiError) as info:
        check_limits(hires, GatewaySettings())
    assert (422, "hr_second_pass_steps") == (info.value.status, info.value.field)


@pytest.mark.parametrize("text", ["", "²", "٣", "１", "1" * 5000, "-1", "+1", "1e3", "0x1", "101"])
def test_bounded_int_refuses_what_is_not_a_small_ascii_integer(text: str) -> None:
    with pytest.raises(ApiError) as raised:
        bounded_int(text, "limit", 1, 100)
    assert (422, "limit") == (raised.value.status, raised.value.field)


def test_bounded_int_reads_ascii_digits_within_bounds() -> None:
    assert (1, 100, 7) == tuple(bounded_int(t, "limit", 1, 100) for t in ("1", "100", "007"))
