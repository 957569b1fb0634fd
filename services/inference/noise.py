"""A1111's initial noise: variation seeds, seed resize and the noise-seed delta.

* ``subseed`` / ``subseed_strength``: each image's noise is the spherical interpolation
  from its seed's noise to its subseed's noise (strength 0 is the seed, 1 the subseed).
* ``seed_resize_from_w`` / ``_h``: the noise is drawn at that size and pasted, centred,
  into noise of the real size, so a seed keeps its composition when the size changes.
* ``eta_noise_seed_delta`` (ENSD): the noise that ancestral samplers add at each step
  comes from ``seed + delta``; the initial noise stays the seed's.

Noise is drawn on the CPU from one generator per image, exactly as diffusers draws it for
a list of CPU generators, so a request without these options gives the same image either
way.
"""

from __future__ import annotations

import torch

DOT_THRESHOLD = 0.9995
"""Above this cosine the two noises are nearly parallel: interpolate linearly."""


def draw(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """One image's noise, ``shape`` = (channels, height, width), as diffusers draws it."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((1, *shape), generator=generator)[0]


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation, row-wise over dimension 1 as A1111 computes it."""
    if t <= 0:
        return low
    if t >= 1:
        return high
    low_unit = low / torch.norm(low, dim=1, keepdim=True)
    high_unit = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_unit * high_unit).sum(1)
    if dot.mean() > DOT_THRESHOLD:
        return low * (1 - t) + high * t
    omega = torch.acos(dot)
    sine = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / sine).unsqueeze(1) * low + (
        torch.sin(t * omega) / sine
    ).unsqueeze(1) * high


def _paste_centred(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``source`` over the centre of ``target`` (cropped where it is larger)."""
    out = target.clone()
    (_, th, tw), (_, sh, sw) = target.shape, source.shape
    dy, dx = (th - sh) // 2, (tw - sw) // 2
    h, w = min(th, sh), min(tw, sw)
    ty, tx = max(dy, 0), max(dx, 0)
    sy, sx = max(-dy, 0), max(-dx, 0)
    out[:, ty : ty + h, tx : tx + w] = source[:, sy : sy + h, sx : sx + w]
    return out


def initial_noise(
    seeds: list[int],
    subseeds: list[int],
    strength: float,
    shape: tuple[int, int, int],
    resize_from: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The batch's starting noise, (images, channels, height, width) in latent units;
    ``resize_from`` is (height, width) in latent units too."""
    images = []
    for seed, subseed in zip(seeds, subseeds, strict=True):
        drawn_shape = (shape[0], *resize_from) if resize_from else shape
        noise = draw(seed, drawn_shape)
        if strength > 0:
            noise = slerp(strength, noise, draw(subseed, drawn_shape))
        if drawn_shape != shape:
            noise = _paste_centred(draw(seed, shape), noise)
        images.append(noise)
    return torch.stack(images)
