"""fp16 safety on the decode path: A1111's automatic VAE upcast.

A VAE in half precision (fp16; bf16 likewise) can overflow on some latents and decode
NaN, which becomes an all-black image. Every decode of a half-precision VAE is checked:
a decode with a NaN or infinite value is done again in float32 (the VAE is cast up for
that call and back afterwards), and the worker logs it. When the float32 decode is not
finite either, the latents themselves were (the UNet overflowed): the task fails with
``non_finite_output`` instead of returning a black image.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)


def _sample(output: Any) -> torch.Tensor:
    sample: torch.Tensor = output[0] if isinstance(output, tuple) else output.sample
    return sample


def guard_decode(vae: Any, on_upcast: Callable[[], None]) -> None:
    """Check every ``vae.decode`` (diffusers pipelines call it on the instance)."""
    if getattr(vae, "sdswarm_guarded", False):
        return
    decode = vae.decode

    def guarded(z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        output = decode(z, *args, **kwargs)
        if vae.dtype == torch.float32 or bool(torch.isfinite(_sample(output)).all()):
            return output
        dtype = vae.dtype
        log.warning("VAE decode in %s was not finite; decoding again in float32", dtype)
        on_upcast()
        vae.to(torch.float32)
        try:
            output = decode(z.to(torch.float32), *args, **kwargs)
        finally:
            vae.to(dtype)
        if not bool(torch.isfinite(_sample(output)).all()):
            from services.inference.pipeline import GenerationError  # pipeline imports us

            raise GenerationError(
                "non_finite_output",
                "the model produced NaN latents (the UNet overflowed in "
                f"{str(dtype).removeprefix('torch.')}); a float32 VAE decode cannot repair them",
            )
        return output

    vae.decode = guarded
    vae.sdswarm_guarded = True
