"""A1111 sampler and schedule-type names → diffusers schedulers.

Names come from :mod:`proto.samplers` (the gateway validates against them without
torch); this is the only place they meet diffusers classes. Each scheduler is built
per request with ``from_config`` on the checkpoint's own scheduler config, so
``prediction_type`` (v-prediction SD2 models) survives.
"""

from __future__ import annotations

import functools
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from proto.samplers import split_sampler

_SAMPLERS: dict[str, tuple[type[Any], dict[str, Any]]] = {
    "Euler": (EulerDiscreteScheduler, {}),
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    "LMS": (LMSDiscreteScheduler, {}),
    "Heun": (HeunDiscreteScheduler, {}),
    "DPM2": (KDPM2DiscreteScheduler, {}),
    "DPM2 a": (KDPM2AncestralDiscreteScheduler, {}),
    # Singlestep order 2 is the closest diffusers has; it is not ancestral.
    "DPM++ 2S a": (DPMSolverSinglestepScheduler, {"solver_order": 2}),
    "DPM++ 2M": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ SDE": (DPMSolverSDEScheduler, {}),
    "DPM++ 2M SDE": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
    ),
    "DPM++ 3M SDE": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
    ),
    "DDIM": (DDIMScheduler, {}),
    "PLMS": (PNDMScheduler, {"skip_prk_steps": True}),
    "UniPC": (UniPCMultistepScheduler, {}),
    "LCM": (LCMScheduler, {}),
}

_SCHEDULES: dict[str, dict[str, Any]] = {
    "Automatic": {},
    "Uniform": {},
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
    "SGM Uniform": {"timestep_spacing": "trailing"},
}

# Schedulers that take sigma-schedule options; the others ignore the schedule type.
_SIGMA_SCHEDULERS = (
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    DPMSolverSDEScheduler,
)


def sampler_names() -> list[str]:
    return list(_SAMPLERS)


def build_scheduler(
    base_config: Any, sampler: str, schedule: str | None = None, *, seed: int | None = None
) -> Any:
    """A fresh scheduler for one request (schedulers hold per-run state)."""
    name, schedule_type = split_sampler(sampler, schedule)
    cls, kwargs = _SAMPLERS[name]
    options = dict(kwargs)
    extra = _SCHEDULES[schedule_type]
    if "timestep_spacing" in extra or issubclass(cls, _SIGMA_SCHEDULERS):
        options.update(extra)
    if cls is DPMSolverSDEScheduler and seed is not None:
        # Its Brownian-tree noise is only reproducible when seeded explicitly.
        options["noise_sampler_seed"] = seed
    return cls.from_config(base_config, **options)


def apply_churn(scheduler: Any, options: dict[str, float] | None) -> bool:
    """Give this (per-request) scheduler's steps the churn options; False if the sampler
    has no churn in diffusers (only Euler has)."""
    if options is None or type(scheduler) is not EulerDiscreteScheduler:
        return False
    target: Any = scheduler  # a per-request instance: its step gets the options bound
    target.step = functools.partial(target.step, **options)
    return True
