"""Sampler and schedule-type names clients may send (AUTOMATIC1111 vocabulary).

Names only: the gateway validates against them without importing torch; the worker
maps each to a diffusers scheduler (``services/inference/samplers.py``), and a unit
test keeps the two in step.
"""

from __future__ import annotations

SAMPLERS: tuple[str, ...] = (
    "Euler",
    "Euler a",
    "LMS",
    "Heun",
    "DPM2",
    "DPM2 a",
    "DPM++ 2S a",
    "DPM++ 2M",
    "DPM++ SDE",
    "DPM++ 2M SDE",
    "DPM++ 3M SDE",
    "DDIM",
    "PLMS",
    "UniPC",
    "LCM",
)

# A1111 >= 1.9 "Schedule type" (the separate ``scheduler`` request field).
SCHEDULE_TYPES: tuple[str, ...] = ("Automatic", "Uniform", "Karras", "Exponential", "SGM Uniform")

# Legacy names folded the schedule into the sampler name: "DPM++ 2M Karras".
_LEGACY_SUFFIXES = {" Karras": "Karras", " Exponential": "Exponential"}


def split_sampler(name: str, scheduler: str | None = None) -> tuple[str, str]:
    """``("DPM++ 2M Karras", None)`` → ``("DPM++ 2M", "Karras")``; raises on unknown names."""
    base, schedule = name.strip(), (scheduler or "Automatic").strip()
    for suffix, legacy in _LEGACY_SUFFIXES.items():
        if base.endswith(suffix) and base[: -len(suffix)] in SAMPLERS:
            base, schedule = base[: -len(suffix)], legacy if scheduler is None else schedule
    lowered = {s.lower(): s for s in SAMPLERS}
    if base.lower() not in lowered:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")
    # A1111's /schedulers names are lower-case with underscores ("sgm_uniform").
    schedules = {s.lower().replace(" ", "_"): s for s in SCHEDULE_TYPES}
    if schedule.lower().replace(" ", "_") not in schedules:
        raise ValueError(
            f"unknown scheduler {schedule!r}; valid schedule types: {', '.join(SCHEDULE_TYPES)}"
        )
    return lowered[base.lower()], schedules[schedule.lower().replace(" ", "_")]
