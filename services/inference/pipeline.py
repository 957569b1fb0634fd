"""The GPU behind a narrow seam: a :class:`Pipeline` has one blocking call.

The diffusers implementation loads its checkpoint once and runs in a worker thread,
so the event loop keeps acking and publishing. ``callback_on_step_end`` feeds
progress and checks the cancel flag between steps.
"""

from __future__ import annotations

import io
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from proto import GenerateImage
from proto.requests import Txt2ImgRequest
from proto.samplers import split_sampler
from services.inference.samplers import build_scheduler

VERSION = "sdswarm"
MAX_SEED = 2**32 - 1

StepCallback = Callable[[int, int, int], None]
"""``on_step(job_no, step, total_steps)``, called from the pipeline thread."""


class TaskCancelledError(Exception):
    """Raised inside the step callback: diffusers stops without decoding."""


class GenerationError(Exception):
    """The request cannot run on this model; retrying will not help."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Generation:
    images: list[bytes]
    """PNG bytes, in output order, with the A1111 infotext in the ``parameters`` chunk."""
    seeds: list[int]
    info: dict[str, Any] = field(default_factory=dict)


class Pipeline(Protocol):
    def generate(
        self, command: GenerateImage, on_step: StepCallback, should_stop: Callable[[], bool]
    ) -> Generation: ...


def resolve_seed(seed: int) -> int:
    # A1111: -1 means random; the seed actually used is reported back.
    return random.SystemRandom().randrange(MAX_SEED) if seed == -1 else seed


def infotext(request: Txt2ImgRequest, seed: int, model_name: str, model_hash: str) -> str:
    """A1111's human-readable generation parameters (also stored in each PNG)."""
    sampler, schedule = split_sampler(request.effective_sampler, request.scheduler)
    parts = [
        f"Steps: {request.steps}",
        f"Sampler: {sampler}",
        f"Schedule type: {schedule}",
        f"CFG scale: {request.cfg_scale:g}",
        f"Seed: {seed}",
        f"Size: {request.width}x{request.height}",
        f"Model hash: {model_hash}",
        f"Model: {Path(model_name).stem}",
        f"Version: {VERSION}",
    ]
    text = request.prompt
    if request.negative_prompt:
        text += f"\nNegative prompt: {request.negative_prompt}"
    return f"{text}\n{', '.join(parts)}"


def encode_png(image: Image.Image, text: str) -> bytes:
    meta = PngInfo()
    meta.add_text("parameters", text)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=meta)
    return buffer.getvalue()


class DiffusersPipeline:
    """One loaded checkpoint; ``generate`` is blocking and not re-entrant."""

    def __init__(self, pipe: Any, *, model_name: str, model_hash: str, device: str) -> None:
        self.pipe = pipe
        self.model_name = model_name
        self.model_hash = model_hash
        self.device = device
        self.base_scheduler_config = pipe.scheduler.config

    def generate(
        self, command: GenerateImage, on_step: StepCallback, should_stop: Callable[[], bool]
    ) -> Generation:
        request = command.txt2img
        if request is None:
            raise GenerationError("unsupported_task", f"{command.kind} is not supported yet")
        first_seed = resolve_seed(request.seed)
        count = request.batch_size * request.n_iter
        seeds = [(first_seed + i) % (MAX_SEED + 1) for i in range(count)]
        infotexts = [infotext(request, seed, self.model_name, self.model_hash) for seed in seeds]
        pngs: list[bytes] = []
        for job_no in range(request.n_iter):
            batch_seeds = seeds[job_no * request.batch_size : (job_no + 1) * request.batch_size]
            images = self._run_job(request, batch_seeds, job_no, on_step, should_stop)
            offset = job_no * request.batch_size
            pngs += [encode_png(im, infotexts[offset + i]) for i, im in enumerate(images)]
        return Generation(images=pngs, seeds=seeds, info=self._info(request, seeds, infotexts))

    def _run_job(
        self,
        request: Txt2ImgRequest,
        seeds: list[int],
        job_no: int,
        on_step: StepCallback,
        should_stop: Callable[[], bool],
    ) -> list[Image.Image]:
        scheduler = build_scheduler(
            self.base_scheduler_config,
            request.effective_sampler,
            request.scheduler,
            seed=seeds[0],
        )
        self.pipe.scheduler = scheduler
        # One CPU generator per image: the same seed gives the same image whatever the
        # batch size or device (A1111 draws its noise on the CPU too).
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]

        def callback(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> Any:
            if should_stop():
                raise TaskCancelledError
            on_step(job_no, step + 1, len(pipe.scheduler.timesteps))
            return kwargs

        options: dict[str, Any] = {}
        if request.eta is not None and "eta" in _call_parameters(self.pipe):
            options["eta"] = request.eta
        with torch.inference_mode():
            result = self.pipe(
                prompt=[request.prompt] * len(seeds),
                negative_prompt=[request.negative_prompt] * len(seeds),
                num_inference_steps=request.steps,
                guidance_scale=request.cfg_scale,
                width=request.width,
                height=request.height,
                generator=generators,
                callback_on_step_end=callback,
                output_type="pil",
                **options,
            )
        images: list[Image.Image] = result.images
        return images

    def _info(self, request: Txt2ImgRequest, seeds: list[int], texts: list[str]) -> dict[str, Any]:
        sampler, schedule = split_sampler(request.effective_sampler, request.scheduler)
        return {
            "prompt": request.prompt,
            "all_prompts": [request.prompt] * len(seeds),
            "negative_prompt": request.negative_prompt,
            "all_negative_prompts": [request.negative_prompt] * len(seeds),
            "seed": seeds[0],
            "all_seeds": seeds,
            "subseed": -1,
            "all_subseeds": [-1] * len(seeds),
            "subseed_strength": request.subseed_strength,
            "width": request.width,
            "height": request.height,
            "sampler_name": sampler,
            "scheduler": schedule,
            "cfg_scale": request.cfg_scale,
            "steps": request.steps,
            "batch_size": request.batch_size,
            "n_iter": request.n_iter,
            "restore_faces": False,
            "sd_model_name": Path(self.model_name).stem,
            "sd_model_hash": self.model_hash,
            "seed_resize_from_w": request.seed_resize_from_w,
            "seed_resize_from_h": request.seed_resize_from_h,
            "denoising_strength": request.denoising_strength,
            "extra_generation_params": {},
            "index_of_first_image": 0,
            "infotexts": texts,
            "styles": request.styles,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
            "version": VERSION,
        }


def _call_parameters(pipe: Any) -> set[str]:
    import inspect

    return set(inspect.signature(pipe.__call__).parameters)


def info_json(info: dict[str, Any]) -> str:
    return json.dumps(info, ensure_ascii=False)
