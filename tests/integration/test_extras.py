"""Extras by effect: A1111 geometry, the upscaler_2 blend, tiling, model upscalers.

Model upscalers are loaded by spandrel. Where spandrel cannot be imported (it imports
torchvision, which does not load next to this project's CPU torch build), the tests
that need it are skipped and one test proves the task fails with the import error.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from PIL.PngImagePlugin import PngInfo  # noqa: E402
from torch import Tensor  # noqa: E402

from proto.commands import ExtrasTask  # noqa: E402
from proto.requests import ExtrasOptions  # noqa: E402
from services.inference.extras import ExtrasRunner  # noqa: E402
from services.inference.pipeline import GenerationError, TaskCancelledError  # noqa: E402
from services.inference.upscalers import (  # noqa: E402
    ModelCache,
    load_model_upscaler,
    tile_boxes,
    tiled,
    to_image,
    to_tensor,
)
from tests.fixtures.upscaler import save_compact  # noqa: E402

pytestmark = pytest.mark.integration


def _options(**fields: Any) -> ExtrasOptions:
    return msgspec.convert(fields, ExtrasOptions)


def _runner(tile: int = 32, overlap: int = 8) -> ExtrasRunner:
    torch.set_flush_denormal(True)
    return ExtrasRunner(device="cpu", tile=tile, overlap=overlap, models=ModelCache("cpu"))


def _stripes(width: int, height: int) -> Image.Image:
    """Each column a different colour: crops and offsets are visible pixel by pixel."""
    image = Image.new("RGB", (width, height))
    for x in range(width):
        for y in range(height):
            image.putpixel((x, y), (x * 5 % 256, 255 - x * 3 % 256, (x * 11 + y) % 256))
    return image


def _png(image: Image.Image, parameters: str | None = None) -> bytes:
    meta = PngInfo()
    if parameters:
        meta.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=meta)
    return buffer.getvalue()


# ---- geometry (A1111's postprocessing_upscale) -----------------------------------------


@pytest.mark.parametrize(
    ("fields", "size", "expected"),
    [
        ({"upscaler_1": "Lanczos", "upscaling_resize": 2}, (40, 24), (80, 48)),
        ({"upscaler_1": "Lanczos", "upscaling_resize": 1.5}, (100, 60), (144, 88)),  # ÷8 floor
        ({"upscaler_1": "Lanczos", "upscaling_resize": 0.5}, (40, 24), (40, 24)),  # min 1
        ({"upscaler_1": "None", "upscaling_resize": 4}, (40, 24), (40, 24)),
        (
            {"upscaler_1": "Nearest", "resize_mode": 1, "upscaling_resize_w": 100,
             "upscaling_resize_h": 70},
            (40, 20), (100, 70),
        ),
        (
            {"upscaler_1": "Nearest", "resize_mode": 1, "upscaling_resize_w": 80,
             "upscaling_resize_h": 80, "upscaling_crop": False},
            (40, 20), (160, 80),
        ),
    ],
)  # fmt: skip
def test_builtin_resampler_gives_the_requested_size(
    fields: dict[str, Any], size: tuple[int, int], expected: tuple[int, int]
) -> None:
    options = _options(**fields)
    result = _runner().process(_stripes(*size), options, {})
    assert expected == result.size
    assert expected == options.output_size(*size), "the gateway's size check agrees"


def test_crop_keeps_the_centre() -> None:
    """To 80×80 with crop: ×4 (the larger ratio) to 160×80, then the middle 80 columns."""
    source = _stripes(40, 20)
    options = _options(
        upscaler_1="Nearest",
        resize_mode=1,
        upscaling_resize_w=80,
        upscaling_resize_h=80,
        upscaling_crop=True,
    )
    result = _runner().process(source, options, {})
    assert (80, 80) == result.size
    for x in range(80):
        # Output column x is column 40 + x of the ×4 image, i.e. source column (40 + x) // 4.
        assert source.getpixel(((40 + x) // 4, 5)) == result.getpixel((x, 21))


def test_2x_then_2x_is_4x() -> None:
    runner = _runner()
    source = _stripes(40, 24)
    twice = runner.process(
        runner.process(source, _options(upscaler_1="Lanczos", upscaling_resize=2), {}),
        _options(upscaler_1="Lanczos", upscaling_resize=2),
        {},
    )
    once = runner.process(source, _options(upscaler_1="Lanczos", upscaling_resize=4), {})
    assert (160, 96) == twice.size == once.size
    nearest = runner.process(source, _options(upscaler_1="Nearest", upscaling_resize=4), {})
    nearest_twice = runner.process(
        runner.process(source, _options(upscaler_1="Nearest", upscaling_resize=2), {}),
        _options(upscaler_1="Nearest", upscaling_resize=2),
        {},
    )
    assert nearest.tobytes() == nearest_twice.tobytes(), "nearest ×2 ×2 is pixel-exact ×4"


def test_upscaler_2_visibility_blends() -> None:
    runner = _runner()
    source = _stripes(40, 24)
    lanczos = runner.process(source, _options(upscaler_1="Lanczos"), {})
    nearest = runner.process(source, _options(upscaler_1="Nearest"), {})
    assert lanczos.tobytes() != nearest.tobytes()
    half = runner.process(
        source,
        _options(upscaler_1="Lanczos", upscaler_2="Nearest", extras_upscaler_2_visibility=0.5),
        {},
    )
    assert Image.blend(lanczos, nearest, 0.5).tobytes() == half.tobytes()
    full = runner.process(
        source,
        _options(upscaler_1="Lanczos", upscaler_2="Nearest", extras_upscaler_2_visibility=1.0),
        {},
    )
    assert nearest.tobytes() == full.tobytes()
    hidden = runner.process(
        source,
        _options(upscaler_1="Lanczos", upscaler_2="Nearest", extras_upscaler_2_visibility=0.0),
        {},
    )
    assert lanczos.tobytes() == hidden.tobytes()


# ---- the task path: generate() ---------------------------------------------------------


def _command(options: ExtrasOptions, keys: list[str], upscalers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return ExtrasTask(
        task_id="t1",
        user="u",
        model_name="extras",
        model_key="extras",
        request=options,
        upscalers=upscalers or {},
        input_keys=keys,
    )


def test_generate_one_png_per_input_with_infotext() -> None:
    inputs = {
        "inputs/u/a.png": _png(_stripes(40, 24), "a cat\nSteps: 3"),
        "inputs/u/b.png": _png(_stripes(16, 16)),
    }
    steps: list[tuple[int, int, int]] = []
    result = _runner().generate(
        _command(_options(upscaler_1="Lanczos", upscaling_resize=2), list(inputs)),
        inputs,
        lambda job, step, total, preview: steps.append((job, step, total)),
        lambda: False,
    )
    first, second = (Image.open(io.BytesIO(png)) for png in result.images)
    assert [(80, 48), (32, 32)] == [first.size, second.size]
    text = "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"
    assert text == first.text["postprocessing"]  # type: ignore[attr-defined]
    assert "a cat\nSteps: 3" == first.text["parameters"], "the source's parameters are kept"  # type: ignore[attr-defined]
    assert f"<p>{text}</p>" == result.info["html_info"]
    assert [(0, 1, 1), (1, 1, 1)] == steps


def test_generate_refuses_codeformer_a_missing_restorer_and_unknown_upscalers() -> None:
    inputs = {"k.png": _png(_stripes(8, 8))}
    with pytest.raises(GenerationError, match="needs a face-restoration model") as missing:
        _runner().generate(
            _command(_options(gfpgan_visibility=0.5), list(inputs)), inputs, _ignore, _never
        )
    assert "face_restorer_missing" == missing.value.code
    with pytest.raises(GenerationError, match="CodeFormer is not supported"):
        _runner().generate(
            _command(_options(codeformer_visibility=0.5), list(inputs)), inputs, _ignore, _never
        )
    with pytest.raises(GenerationError, match="no upscaler 'Nope'") as caught:
        _runner().generate(
            _command(_options(upscaler_1="Nope"), list(inputs)), inputs, _ignore, _never
        )
    assert "upscaler_not_found" == caught.value.code


def test_generate_stops_when_cancelled() -> None:
    inputs = {"k.png": _png(_stripes(8, 8))}
    with pytest.raises(TaskCancelledError):
        _runner().generate(
            _command(_options(upscaler_1="Lanczos"), list(inputs)), inputs, _ignore, lambda: True
        )


def _ignore(*_: Any) -> None:
    return None


def _never() -> bool:
    return False


# ---- tiling ----------------------------------------------------------------------------


def _local_x2(weights: Tensor) -> Any:
    """A ×2 function with a 2-pixel receptive radius (two 3×3 convolutions), for tiling."""

    def fn(x: Tensor) -> Tensor:
        y = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), weights)
        y = F.conv2d(F.pad(torch.tanh(y), (1, 1, 1, 1), mode="replicate"), weights)
        return F.interpolate(y, scale_factor=2, mode="nearest")

    return fn


def test_tiled_equals_untiled_for_a_small_receptive_field() -> None:
    generator = torch.Generator().manual_seed(0)
    fn = _local_x2(torch.randn(3, 3, 3, 3, generator=generator) * 0.3)
    image = torch.rand(1, 3, 70, 45, generator=generator)
    whole = fn(image)
    calls: list[None] = []
    pieces = tiled(fn, image, 2, tile=16, overlap=4, on_tile=lambda: calls.append(None))
    assert whole.shape == pieces.shape == (1, 3, 140, 90)
    assert torch.allclose(whole, pieces, atol=1e-5)
    assert len(tile_boxes(70, 45, 16)) == len(calls) == 15
    # Too little context differs from the whole-image result: the overlap is what matters.
    starved = tiled(fn, image, 2, tile=16, overlap=0)
    assert not torch.allclose(whole, starved, atol=1e-3)


def test_tiling_stops_between_tiles() -> None:
    fn = _local_x2(torch.ones(3, 3, 3, 3) / 27)
    seen: list[None] = []
    with pytest.raises(TaskCancelledError):
        tiled(
            fn,
            torch.rand(1, 3, 64, 64),
            2,
            tile=16,
            overlap=4,
            on_tile=lambda: seen.append(None),
            should_stop=lambda: len(seen) >= 3,
        )
    assert 3 == len(seen)


def test_tensor_round_trip_is_lossless() -> None:
    image = _stripes(20, 10)
    assert image.tobytes() == to_image(to_tensor(image)).tobytes()


# ---- model upscalers (spandrel) --------------------------------------------------------


@pytest.fixture
def compact_files(tmp_path: Path) -> dict[str, Path]:
    return {kind: save_compact(tmp_path / f"tiny_x2.{kind}") for kind in ("safetensors", "pth")}


@pytest.mark.parametrize("kind", ["safetensors", "pth"])
def test_spandrel_detects_compact_and_honours_its_scale(
    compact_files: dict[str, Path], kind: str
) -> None:
    model = load_model_upscaler("tiny_x2", compact_files[kind], "cpu")
    assert 2 == model.scale
    runner = _runner(tile=16, overlap=8)
    upscalers = {"tiny_x2": str(compact_files[kind])}
    source = _stripes(40, 24)
    by_2 = runner.process(source, _options(upscaler_1="tiny_x2", upscaling_resize=2), upscalers)
    assert (80, 48) == by_2.size
    lanczos = runner.process(source, _options(upscaler_1="Lanczos", upscaling_resize=2), {})
    assert lanczos.tobytes() != by_2.tobytes(), "the network, not a resampler, made it"
    # ×4 from a ×2 model: two passes (A1111 runs a model up to three times).
    by_4 = runner.process(source, _options(upscaler_1="tiny_x2", upscaling_resize=4), upscalers)
    assert (160, 96) == by_4.size


def test_model_tiled_equals_untiled(compact_files: dict[str, Path]) -> None:
    """The compact net sees 4 px around each pixel (4 convolutions); overlap 8 covers it."""
    model = load_model_upscaler("tiny_x2", compact_files["safetensors"], "cpu")
    image = to_tensor(_stripes(96, 72))
    with torch.inference_mode():
        whole = model.fn(image)
    ticks: list[None] = []
    started = time.perf_counter()
    pieces = tiled(model.fn, image, 2, tile=32, overlap=8, on_tile=lambda: ticks.append(None))
    print(f"tiled ×2 of 96×72 in 9 tiles: {time.perf_counter() - started:.3f} s")
    assert 9 == len(ticks)
    assert torch.allclose(whole, pieces, atol=1e-4)


def test_progress_counts_tiles(compact_files: dict[str, Path]) -> None:
    inputs = {"k.png": _png(_stripes(40, 24))}
    upscalers = {"tiny_x2": str(compact_files["safetensors"])}
    steps: list[tuple[int, int, int]] = []
    _runner(tile=16, overlap=8).generate(
        _command(_options(upscaler_1="tiny_x2"), list(inputs), upscalers),
        inputs,
        lambda job, step, total, preview: steps.append((job, step, total)),
        _never,
    )
    assert [(0, n, 6) for n in range(1, 7)] == steps, "3×2 tiles of 16 px, one step each"
