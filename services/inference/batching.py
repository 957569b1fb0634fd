"""Which queued tasks may share one diffusers call (torch-free, pure).

A worker takes up to ``max_batch`` tasks at once. Tasks whose :func:`batch_key` is equal
run as one call: their rows (each task's ``batch_size`` images of one ``n_iter`` job) are
stacked, and everything that is not per row must be equal. What stays per task: prompt,
negative prompt (their emphasis, embeddings), seeds and subseeds, ``batch_size``,
``n_iter``, styles and every field that does not reach the call (comments, webhooks …).

Equal keys must mean "one call gives each task what it would get alone". So the key holds
every request field that shapes the call, and tasks whose result would depend on their
batch neighbours are never batched (``None``: they run alone):

- anything but txt2img (img2img and inpaint carry per-task images and masks; extras);
- hires fix and ControlNet units (several calls per job, per-task control images);
- face restoration (``restore_faces``), which runs on each task's images after the call;
- the DPM++ SDE sampler, whose Brownian-tree noise is seeded once per call (its first
  seed), not per row as every other sampler's noise is.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

import msgspec

from proto import GenerateImage
from proto.commands import Txt2ImgTask
from proto.samplers import split_sampler

CLIP_SKIP_OPTION = "CLIP_stop_at_last_layers"
ENSD_OPTION = "eta_noise_seed_delta"
CALL_OPTIONS = (CLIP_SKIP_OPTION, ENSD_OPTION)
"""``override_settings`` entries that change the call; the others (a caller's stored
options, the checkpoint's title …) do not keep tasks apart."""

SOLO_SAMPLERS = frozenset({"DPM++ SDE"})


def batch_key(command: GenerateImage) -> str | None:
    """Equal for tasks that can share one diffusers call; None: the task runs alone."""
    if not isinstance(command, Txt2ImgTask):
        return None
    request = command.request
    if request.enable_hr or command.controlnets or command.hr_loras is not None:
        return None
    if command.face_restorer is not None:  # restored per task, after its own decoding
        return None
    try:
        sampler, schedule = split_sampler(request.effective_sampler, request.scheduler)
    except ValueError:
        return None  # the worker reports the unknown name, for this task alone
    if sampler in SOLO_SAMPLERS:
        return None
    settings = request.override_settings or {}
    shape = {
        "size": (request.width, request.height),
        "steps": request.steps,
        "sampler": (sampler, schedule),
        "cfg": request.cfg_scale,
        "tiling": bool(request.tiling),
        "eta": request.eta,
        "churn": (request.s_churn, request.s_tmin, request.s_tmax, request.s_noise),
        "variation": request.subseed_strength,
        "seed_resize": (request.seed_resize_from_w, request.seed_resize_from_h),
        "options": {k: settings.get(k) for k in CALL_OPTIONS},
        "vae": _adapter(command.vae),
        "loras": [_adapter(ref) for ref in command.loras],
    }
    return msgspec.json.encode(shape).decode()


def _adapter(ref: msgspec.Struct | None) -> object:
    if ref is None:
        return None
    return msgspec.to_builtins(ref)


T = TypeVar("T")


def group(items: list[T], key: Callable[[T], Hashable | None]) -> list[list[T]]:
    """Items with equal keys together, groups in the order of their first item (arrival
    order), items in order within a group; a None key is a group of its own."""
    groups: list[list[T]] = []
    by_key: dict[Hashable, list[T]] = {}
    for item in items:
        k = key(item)
        if k is None:
            groups.append([item])
        elif k in by_key:
            by_key[k].append(item)
        else:
            by_key[k] = [item]
            groups.append(by_key[k])
    return groups
