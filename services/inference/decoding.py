"""The VAE's decode and encode: the whole batch at once or row by row, in tiles for large
images, interruptible.

Between steps the step callback asks whether a task was cancelled; the VAE's work before
(img2img's init images encoded) and after (the decode) runs inside the diffusers call,
where no callback reaches. A forward pre-hook on the VAE's decoder and encoder asks
instead, before every forward: once for a batch coded at once, before every row of one
coded row by row (:func:`rows_apart`), and before every tile of a tiled decode (diffusers
calls the decoder per tile), so a cancel waits for one batch's, row's or tile's work at
most (issue 15, item 11).

A batch whose images together have at most ``SDSWARM_VAE_BATCH_PX`` pixels is coded in
one forward: on the CPU, with the tiny model at 64², decoding a batch of 4 one row at a
time made the whole call 12–14 % slower (its ops are many and small); a large batch goes
row by row, so its activations are one image's, not all of them.

Large images decode in tiles (diffusers' tiled VAE, ``SDSWARM_VAE_TILE_PX``): the
decoder's activations for a 2048² image need several GB at once, a tile's a fraction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

VAE_BATCH_PX = 1024 * 1024
"""A batch's pixels (all its images together) up to which the VAE codes it in one forward
(``SDSWARM_VAE_BATCH_PX``): four 512² images, one 1024²."""


@contextlib.contextmanager
def rows_apart(vae: Any, pixels: int, limit_px: int) -> Iterator[None]:
    """For this block, ``vae`` encodes and decodes a batch one image at a time
    (diffusers' slicing) when its images together have more than ``limit_px`` pixels
    (``pixels``; ``limit_px`` 0: always); else the whole batch in one forward."""
    if not hasattr(vae, "use_slicing"):
        yield
        return
    saved = vae.use_slicing
    vae.use_slicing = limit_px <= 0 or pixels > limit_px
    try:
        yield
    finally:
        vae.use_slicing = saved


@contextlib.contextmanager
def interruptible_vae(
    vae: Any, should_stop: Callable[[], bool], error: type[Exception]
) -> Iterator[None]:
    """For this block, every forward of ``vae``'s encoder and decoder first asks
    ``should_stop`` and raises ``error`` when it says so."""

    def check(module: Any, args: Any) -> None:
        if should_stop():
            raise error

    handles = [
        part.register_forward_pre_hook(check)
        for part in (getattr(vae, "decoder", None), getattr(vae, "encoder", None))
        if part is not None
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def tiled_decode(vae: Any, tile_px: int) -> Iterator[None]:
    """For this block, ``vae`` decodes images larger than ``tile_px`` a side
    in overlapping tiles of that size, blended at the seams (diffusers' tiled VAE);
    ``tile_px`` 0: whole images."""
    if tile_px <= 0 or not hasattr(vae, "use_tiling"):
        yield
        return
    factor = 2 ** (len(vae.config.block_out_channels) - 1)  # pixels per latent
    names = ("use_tiling", "tile_sample_min_size", "tile_latent_min_size")
    saved = [getattr(vae, name) for name in names]
    vae.use_tiling = True
    vae.tile_sample_min_size = tile_px
    vae.tile_latent_min_size = max(tile_px // factor, 1)
    try:
        yield
    finally:
        for name, value in zip(names, saved, strict=True):
            setattr(vae, name, value)
