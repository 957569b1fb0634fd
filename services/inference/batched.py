"""Several compatible tasks in one diffusers call per job (see :mod:`batching`).

Each task (a :class:`Member`) keeps what makes its result its own: its prompts, its
seeds (one CPU generator per row, so a row's noise does not depend on its neighbours),
its ``batch_size`` rows and ``n_iter`` jobs; job ``j`` of every task that has one runs in
one call. Per step, each member gets its own progress and preview (of its own rows), and
is asked on its own whether it is cancelled or skipped: a cancelled member is dropped at
that step boundary (``on_cancelled`` tells the worker at once) and the others go on; the
call stops early only when no member is left in it.

Errors that belong to one member (an embedding that will not load) fail that member
only. Prompt encodings of different lengths (long or weighted prompts) cannot be
stacked: such a job runs member by member instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from proto import GenerateImage
from proto.commands import Txt2ImgTask
from services.inference.decoding import interruptible_vae
from services.inference.lora import LoraError
from services.inference.pipeline import (
    DiffusersPipeline,
    Generation,
    GenerationError,
    JobSkippedError,
    StepCallback,
    TaskCancelledError,
    TaskPlan,
    release_memory,
)
from services.inference.presentation import preview_every

log = logging.getLogger(__name__)
TEXT_KEYS = frozenset({"prompt", "negative_prompt"})


@dataclass
class Member:
    """One task of a batch, as the worker hands it over."""

    command: GenerateImage
    on_step: StepCallback
    should_stop: Callable[[], bool]
    should_skip: Callable[[], bool]
    on_cancelled: Callable[[], None]
    """Called once, from the pipeline thread, at the step where its cancel was seen."""
    outcome: Generation | GenerationError | None = None
    """Set for every member that was not cancelled."""
    cancelled: bool = False
    plan: TaskPlan | None = None
    frames: list[tuple[Image.Image, str]] = field(default_factory=list)


def _txt2img(member: Member) -> Txt2ImgTask:
    command = member.command
    assert isinstance(command, Txt2ImgTask)  # only txt2img members are live
    return command


class _Unstackable(Exception):
    """The members' prompt encodings differ in shape."""


def run_batch(pipeline: DiffusersPipeline, members: list[Member]) -> None:
    """Run compatible txt2img tasks together; fills each member's outcome."""
    live: list[Member] = []
    for member in members:
        command = member.command
        if not isinstance(command, Txt2ImgTask):
            member.outcome = GenerationError("unsupported_task", "only txt2img is batched")
            continue
        member.plan = pipeline.plan(command, command.request)
        try:  # kept loaded for every later task; a bad file fails its own task only
            pipeline._load_embeddings(command.embeddings)
        except GenerationError as exc:
            member.outcome = exc
            continue
        live.append(member)
    if not live:
        return
    leader = _txt2img(live[0])  # equal batch keys: the same LoRAs and VAE for all
    try:
        with pipeline.loras.applied(leader.loras), pipeline._vae(leader.vae):
            for job_no in range(max((_n_iter(m) for m in live), default=0)):
                active = [m for m in live if not m.cancelled and job_no < _n_iter(m)]
                if not active:
                    break
                _run_split(pipeline, active, job_no)
    except LoraError as exc:
        for member in live:
            member.outcome = GenerationError("lora_failed", str(exc))
        return
    finally:
        release_memory(pipeline.device)
    for member in live:
        if not member.cancelled and member.outcome is None:
            assert member.plan is not None
            member.outcome = member.plan.generation(member.frames, pipeline.png_compress_level)


def _run_split(pipeline: DiffusersPipeline, active: list[Member], job_no: int) -> None:
    """One call for ``active``; halves on out-of-memory (memory freed first) until a
    single task is left, whose error then stands; member by member when their prompt
    encodings cannot be stacked."""
    try:
        _run_job(pipeline, active, job_no)
    except _Unstackable:
        for member in active:
            if not member.cancelled:
                _run_job(pipeline, [member], job_no)
    except torch.OutOfMemoryError:
        if len(active) == 1:
            raise
        release_memory(pipeline.device)
        half = len(active) // 2
        log.warning(
            "out of memory at %d tasks: retrying as %d + %d", len(active), half, len(active) - half
        )
        for part in (active[:half], active[half:]):
            live = [m for m in part if not m.cancelled]
            if live:
                _run_split(pipeline, live, job_no)


def _n_iter(member: Member) -> int:
    assert member.plan is not None
    return member.plan.request.n_iter


def _run_job(pipeline: DiffusersPipeline, active: list[Member], job_no: int) -> None:
    """Job ``job_no`` of every active member, in one call."""
    plans = [m.plan for m in active]
    assert all(plans)
    request = _txt2img(active[0]).request
    seeds: list[int] = []
    subseeds: list[int] = []
    spans: list[tuple[Member, int, int]] = []
    for member in active:
        assert member.plan is not None
        start = len(seeds)
        seeds += member.plan.job_seeds(job_no)
        subseeds += member.plan.job_subseeds(job_no)
        spans.append((member, start, len(seeds)))
    prompts = _stacked_prompts(pipeline, active)
    skipped: set[int] = set()
    callback = _callback(pipeline, spans, job_no, skipped)

    def nobody_left() -> bool:
        """Asked between the rows of the decode: a cancel seen there ends its task at
        once (its row is decoded for nothing); the call stops when nobody is left."""
        return all(_stopped(m) or i in skipped for i, (m, _, _) in enumerate(spans))

    try:
        with interruptible_vae(pipeline.pipe.vae, nobody_left, TaskCancelledError):
            images = pipeline._run_job(
                request,
                None,
                seeds,
                job_no,
                None,
                _no_step,
                _never,
                subseeds=subseeds,
                prompt_options=prompts,
                step_callback=callback,
            )
    except (JobSkippedError, TaskCancelledError):
        return  # nobody was left in the call: every member was cancelled or skipped
    for index, (member, start, end) in enumerate(spans):
        if member.cancelled or index in skipped:
            continue
        assert member.plan is not None
        texts = member.plan.job_infotexts(job_no)
        member.frames += zip(images[start:end], texts, strict=True)


def _callback(
    pipeline: DiffusersPipeline,
    spans: list[tuple[Member, int, int]],
    job_no: int,
    skipped: set[int],
) -> Callable[..., Any]:
    everies = [preview_every(m.plan.request) if m.plan else None for m, _, _ in spans]

    def callback(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> Any:
        total = getattr(pipe, "_num_timesteps", None) or len(pipe.scheduler.timesteps)
        done = step + 1
        latents = kwargs.get("latents")
        timed = pipeline._preview_due(None, done, time.monotonic())
        left = 0
        for index, (member, start, end) in enumerate(spans):
            if member.cancelled or index in skipped or _stopped(member):
                continue
            if member.should_skip():
                skipped.add(index)  # A1111's skip: this job of this member ends
                continue
            left += 1
            every = everies[index]
            due = (every > 0 and done % every == 0) if every is not None else timed
            preview = None
            if due and latents is not None:
                preview = pipeline.previews.render(latents[start:end])
            member.on_step(job_no, done, total, preview)
        if not left:
            raise JobSkippedError
        return kwargs

    return callback


def _stacked_prompts(pipeline: DiffusersPipeline, active: list[Member]) -> dict[str, Any]:
    """Every member's prompt options, one row block each, as one call's options."""
    pipe = pipeline.pipe
    parts = []
    for member in active:
        assert member.plan is not None
        request = member.plan.request
        count = request.batch_size
        parts.append(
            pipeline._prompt_options(pipe, request, request.prompt, request.negative_prompt, count)
        )
    if all(set(part) <= TEXT_KEYS for part in parts):
        # Text all round: diffusers encodes the stacked lists as it would each alone.
        return {key: [text for part in parts for text in part[key]] for key in parts[0]}
    guided = active[0].plan is not None and active[0].plan.request.cfg_scale > 1
    embedded = [_as_embeddings(pipeline, part, guided) for part in parts]
    keys = set(embedded[0])
    if any(set(e) != keys for e in embedded):
        raise _Unstackable
    stacked: dict[str, Any] = {}
    for key in keys:
        tensors = [e[key] for e in embedded]
        if any(t.shape[1:] != tensors[0].shape[1:] for t in tensors):
            raise _Unstackable
        stacked[key] = torch.cat(tensors)
    return stacked


def _as_embeddings(
    pipeline: DiffusersPipeline, options: dict[str, Any], guided: bool
) -> dict[str, Any]:
    """Prompt options as embeddings (diffusers' own encoding for plain text); without
    guidance the negative prompt is not used, so its embeddings are left out."""
    if not set(options) <= TEXT_KEYS:
        embeds = dict(options)
    else:
        encoded = pipeline.pipe.encode_prompt(
            prompt=options["prompt"],
            device=pipeline.pipe.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=guided,
            negative_prompt=options["negative_prompt"],
        )
        names = ["prompt_embeds", "negative_prompt_embeds"]
        if pipeline.traits.xl:
            names += ["pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
        embeds = dict(zip(names, encoded, strict=True))
    if not guided:
        embeds = {k: v for k, v in embeds.items() if not k.startswith("negative")}
    return {k: v for k, v in embeds.items() if v is not None}


def _stopped(member: Member) -> bool:
    """Whether the member is cancelled; the first time it is seen, it is told at once."""
    if not member.cancelled and member.should_stop():
        member.cancelled = True
        member.on_cancelled()
    return member.cancelled


def _no_step(job_no: int, step: int, total: int, preview: bytes | None) -> None:
    """Progress goes to each member from the batch's own callback."""


def _never() -> bool:
    return False
