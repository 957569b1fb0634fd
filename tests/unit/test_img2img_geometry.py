"""A1111's img2img geometry and mask preparation, on synthetic images with coloured regions."""

from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("torch")

import msgspec
from PIL import Image

from proto.requests import Img2ImgRequest
from services.inference.img2img import (
    ImageInputs,
    binary_mask,
    blur_mask,
    fill_masked,
    mask_box,
    resize_image,
    widen_to_aspect,
)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _bands(
    size: tuple[int, int], boxes: list[tuple[tuple[int, int, int, int], tuple[int, ...]]]
) -> Image.Image:
    image = Image.new("RGB", size, BLUE)
    for box, colour in boxes:
        image.paste(colour, box)
    return image


def _colour_at(image: Image.Image, x: int, y: int) -> tuple[int, ...]:
    """The nearest of red, green and blue to the pixel (resampling blurs edges a little)."""
    pixel = np.asarray(image.getpixel((x, y)), dtype=float)
    return min((RED, GREEN, BLUE), key=lambda c: float(np.abs(pixel - c).sum()))


def test_just_resize_stretches() -> None:
    source = _bands((200, 50), [((0, 0, 100, 50), RED)])  # left half red
    out = resize_image(source, 0, 64, 64)
    assert (64, 64) == out.size
    assert RED == _colour_at(out, 28, 0) == _colour_at(out, 28, 63)
    assert BLUE == _colour_at(out, 36, 0) == _colour_at(out, 36, 63)


@pytest.mark.parametrize("wide", [True, False])
def test_crop_and_resize_covers_and_keeps_the_centre(wide: bool) -> None:
    # Outer quarters red, the middle half green: covering a square keeps only the middle.
    if wide:
        source = _bands((256, 128), [((0, 0, 64, 128), RED), ((64, 0, 192, 128), GREEN)])
        source.paste(RED, (192, 0, 256, 128))
    else:
        source = _bands((128, 256), [((0, 0, 128, 64), RED), ((0, 64, 128, 192), GREEN)])
        source.paste(RED, (0, 192, 128, 256))
    out = resize_image(source, 1, 64, 64)
    assert (64, 64) == out.size
    colours = {_colour_at(out, x, y) for x in range(1, 63, 4) for y in range(0, 64, 4)}
    assert {GREEN} == colours
    assert RED == _colour_at(resize_image(source, 0, 64, 64), 0, 0), "just resize keeps it"


def test_resize_and_fill_fits_and_stretches_the_edge_rows() -> None:
    # 128×64 into 64×64: fitted to 64×32 at y = 16..48; the top quarter of the source
    # is red, so its red ends at y = 16 + 8 = 24 (just resize: at 16).
    source = _bands((128, 64), [((0, 0, 128, 16), RED)])
    source.paste(GREEN, (0, 60, 128, 64))  # the last rows green: they fill the bottom band
    out = resize_image(source, 2, 64, 64)
    assert (64, 64) == out.size
    assert RED == _colour_at(out, 32, 0), "top band: the first row stretched"
    assert RED == _colour_at(out, 32, 20)
    assert BLUE == _colour_at(out, 32, 30)
    assert {GREEN} == {_colour_at(out, x, y) for x in (0, 32, 63) for y in (50, 56, 63)}
    assert BLUE == _colour_at(resize_image(source, 0, 64, 64), 32, 20)


def test_resize_and_fill_stretches_the_edge_columns() -> None:
    # 64×128 into 64×64: fitted to 32×64 at x = 16..48, left and right bands filled.
    source = _bands((64, 128), [((0, 0, 16, 128), RED)])
    out = resize_image(source, 2, 64, 64)
    assert {RED} == {_colour_at(out, x, y) for x in (0, 8, 15, 20) for y in (0, 32, 63)}
    assert {BLUE} == {_colour_at(out, x, y) for x in (28, 47, 48, 63) for y in (0, 32, 63)}


def test_latent_mode_is_a_plain_resize_in_pixels() -> None:
    source = _bands((100, 60), [((0, 0, 30, 60), RED)])
    assert resize_image(source, 3, 64, 64).tobytes() == resize_image(source, 0, 64, 64).tobytes()


def test_mask_box_and_aspect() -> None:
    mask = Image.new("L", (100, 80), 0)
    mask.paste(255, (40, 30, 50, 40))
    assert (36, 26, 54, 44) == mask_box(mask, 4)
    assert mask_box(Image.new("L", (10, 10), 0), 4) is None
    # 18×18 widened to 2:1 → 36 wide, centred.
    assert (27, 26, 63, 44) == widen_to_aspect((36, 26, 54, 44), 64, 32, 100, 80)
    # Near the right edge: shifted back inside the image.
    assert (64, 26, 100, 44) == widen_to_aspect((80, 26, 98, 44), 64, 32, 100, 80)
    # Taller than the target: grown in height, clamped at the top.
    assert (10, 0, 20, 20) == widen_to_aspect((10, 2, 20, 12), 32, 64, 100, 80)


def _edge_mask() -> Image.Image:
    mask = Image.new("L", (40, 40), 0)
    mask.paste(255, (20, 0, 40, 20))  # top-right quadrant
    return mask


def test_mask_blur_is_separable_per_axis() -> None:
    mask = _edge_mask()
    horizontal = np.asarray(blur_mask(mask, 3, 0), dtype=int)
    vertical = np.asarray(blur_mask(mask, 0, 3), dtype=int)
    original = np.asarray(mask, dtype=int)
    # Horizontal blur: rows keep their own values across the horizontal edge at y = 20.
    assert (horizontal[25:] == 0).all()
    assert (horizontal[:20, 30:] == original[:20, 30:]).all()
    row = horizontal[5]
    assert 0 < row[17] < row[19] < row[21] < 255, "a soft ramp across x = 20"
    assert (np.diff(row) >= 0).all()
    # Vertical blur: columns keep their own values across the vertical edge at x = 20.
    assert (vertical[:, :20] == 0).all()
    column = vertical[:, 30]
    assert 0 < column[22] < column[20] < column[18] < 255
    # A Gaussian of σ 3 at the edge: about half.
    assert abs(int(row[20]) - 127) < 40
    assert blur_mask(mask, 0, 0) is mask


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _inputs(**fields: object) -> ImageInputs:
    body = {
        "stable_diffusion_model": "m",
        "width": 40,
        "height": 40,
        "init_images": ["i"],
        "mask": "m",
        "inpaint_full_res": False,
        "inpainting_fill": 1,
        **fields,
    }
    request = msgspec.convert(body, Img2ImgRequest)
    files = {"i": _png(Image.new("RGB", (40, 40), RED)), "m": _png(_edge_mask())}
    return ImageInputs.load(request, files)


def test_mask_blur_sets_both_axes_and_x_y_apply_separately() -> None:
    only_y = _inputs(mask_blur_x=0, mask_blur_y=3).mask
    assert only_y is not None
    assert np.array_equal(np.asarray(only_y), np.asarray(blur_mask(_edge_mask(), 0, 3)))
    both = _inputs(mask_blur=3, mask_blur_x=0, mask_blur_y=0).mask
    assert both is not None
    assert np.array_equal(np.asarray(both), np.asarray(blur_mask(_edge_mask(), 3, 3)))
    none = _inputs(mask_blur=0).mask
    assert none is not None
    assert np.array_equal(np.asarray(none), np.asarray(_edge_mask()))


def test_mask_invert_and_alpha_masks() -> None:
    inverted = _inputs(mask_blur=0, inpainting_mask_invert=1).mask
    assert inverted is not None
    assert np.array_equal(255 - np.asarray(inverted), np.asarray(_edge_mask()))
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (0, 0, 0, 200))
    rgba.putpixel((2, 2), (0, 0, 0, 100))
    alpha = np.asarray(binary_mask(rgba))
    assert (255, 0, 0) == (alpha[1, 1], alpha[2, 2], alpha[0, 0])
    assert 100 == np.asarray(binary_mask(rgba, round_alpha=False))[2, 2]


def test_fill_takes_the_surrounding_colours() -> None:
    image = _bands((64, 64), [((0, 0, 40, 64), RED)])  # red left, blue right
    image.paste(GREEN, (8, 8, 24, 56))  # what the mask hides: must not leak into the fill
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 24, 56))
    filled = np.asarray(fill_masked(image, mask), dtype=int)
    original = np.asarray(image, dtype=int)
    outside = np.asarray(mask) == 0
    assert (filled[outside] == original[outside]).all()
    inside = filled[10:54, 10:22]
    assert inside[..., 1].max() < 10, "no trace of the hidden green"
    assert (inside[..., 0] > inside[..., 2]).all(), "red surroundings dominate"
    # A masked patch next to the blue region takes blue there.
    mask2 = Image.new("L", (64, 64), 0)
    mask2.paste(255, (36, 20, 44, 44))
    filled2 = np.asarray(fill_masked(image, mask2), dtype=int)
    assert filled2[32, 43, 2] > filled2[32, 43, 0]
    assert filled2[32, 37, 0] > filled2[32, 37, 2]


def test_full_res_prepares_the_crop_at_the_target_size() -> None:
    inputs = _inputs(inpaint_full_res=True, inpaint_full_res_padding=2, mask_blur=0)
    prepared = inputs.images[0]
    assert (40, 40) == prepared.source.size
    # Box (20, 0, 40, 20) + 2 → (18, 0, 40, 22), widened to square 22×22 inside 40×40.
    assert (18, 0, 40, 22) == prepared.paste_box
    assert prepared.overlay is not None
    assert (40, 40) == prepared.overlay.size


def _reference_blur_rows(values: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian along each row, written out: OpenCV's kernel size, mirrored borders."""
    radius = int(2.5 * sigma + 0.5)
    taps = np.arange(-radius, radius + 1)
    kernel = np.exp(-(taps**2) / (2 * sigma * sigma))
    padded = np.pad(values, [(0, 0), (radius, radius)], mode="reflect")
    width = values.shape[1]
    out = np.zeros_like(values)
    for i, weight in enumerate(kernel / kernel.sum()):
        out += weight * padded[:, i : i + width]
    return out


def test_mask_blur_is_a_gaussian_per_axis_at_any_sigma() -> None:
    values = (np.random.default_rng(0).random((30, 50)) > 0.5).astype(np.uint8) * 255
    mask = Image.fromarray(values, "L")
    for sigma in (1.5, 8):  # a short kernel and one longer than OpenCV filters directly
        rows = np.asarray(blur_mask(mask, sigma, 0), dtype=float)
        columns = np.asarray(blur_mask(mask.transpose(Image.Transpose.TRANSPOSE), 0, sigma))
        expected = _reference_blur_rows(values.astype(float), sigma)
        assert np.abs(rows - expected).max() <= 1
        assert np.abs(columns.T - expected).max() <= 1
    # A blur far wider than the mask: about its mean (a quarter is white), computed with a
    # kernel cut at twice the image's size.
    flat = np.asarray(blur_mask(_edge_mask(), 10**6, 10**6), dtype=float)
    assert abs(flat.mean() - 255 / 4) < 2
    assert flat.max() - flat.min() <= 16


def test_transparent_init_images_are_flattened_on_white() -> None:
    from services.inference.img2img import flatten

    image = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    image.putpixel((1, 1), (200, 0, 0, 255))
    image.putpixel((2, 2), (0, 0, 0, 128))
    flat = flatten(image)
    assert "RGB" == flat.mode
    assert (255, 255, 255) == flat.getpixel((0, 0)), "not the hidden colour"
    assert (200, 0, 0) == flat.getpixel((1, 1))
    assert 126 <= flat.getpixel((2, 2))[0] <= 128  # type: ignore[index]
