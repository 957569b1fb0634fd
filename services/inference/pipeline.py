"""The GPU behind a narrow seam: a :class:`Pipeline` has one blocking call.

The diffusers implementation loads its checkpoint once and runs in a worker thread,
so the event loop keeps acking and publishing. ``callback_on_step_end`` feeds
progress and checks the cancel flag between steps.
"""

from __future__ import annotations

import collections
import contextlib
import io
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from proto import GenerateImage, ModelFamily
from proto.commands import AdapterRef, DiffusionTask, ExtrasTask
from proto.extra_networks import strip_tags
from proto.requests import LATENT_UPSCALE_MODES, Img2ImgRequest, Txt2ImgRequest
from proto.workers import CompileStatus
from services.inference import img2img
from services.inference.compiled import CompiledUnet, eager_unet
from services.inference.controlnet import (
    Control,
    ControlNetCache,
    ControlNetError,
    runs,
    with_control,
)
from services.inference.decoding import (
    VAE_BATCH_PX,
    interruptible_vae,
    rows_apart,
    tiled_decode,
)
from services.inference.family import Variant, detect_loaded, traits
from services.inference.lora import LoraError, LoraSet
from services.inference.noise import initial_noise
from services.inference.presentation import (
    Request,
    churn,
    clip_skip,
    info,
    infotext,
    noise_seed_delta,
    preview_every,
)
from services.inference.previews import PreviewRenderer
from services.inference.prompts import encode_weighted, encode_weighted_xl, needs_own_encoder
from services.inference.samplers import apply_churn, build_scheduler
from services.inference.upcast import guard_decode

if TYPE_CHECKING:
    from services.inference.batched import Member

PNG_COMPRESS_LEVEL = 6
"""zlib level of output PNGs (Pillow's default); lower is faster and larger."""
MAX_VAES = 2
"""Extra VAEs kept loaded per worker (each is ~160 MB for SD)."""
MAX_SEED = 2**32 - 1

StepCallback = Callable[[int, int, int, bytes | None], None]
"""``on_step(job_no, step, total_steps, preview_png)``, called from the pipeline thread."""


class TaskCancelledError(Exception):
    """Raised inside the step callback: diffusers stops without decoding."""


class JobSkippedError(Exception):
    """Raised inside the step callback: A1111's skip ends the current job only."""


class GenerationError(Exception):
    """The request cannot run on this model; retrying will not help."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Generation:
    """A task's output. Diffusion hands over images with their infotexts (``frames``) and
    PNG encoding happens on first use of :attr:`images`, so the worker can encode off the
    GPU's path (in a thread, while the next batch denoises)."""

    def __init__(
        self,
        *,
        seeds: list[int],
        info: dict[str, Any] | None = None,
        images: list[bytes] | None = None,
        frames: list[tuple[Image.Image, str]] | None = None,
        compress_level: int = PNG_COMPRESS_LEVEL,
    ) -> None:
        self.seeds = seeds
        self.info: dict[str, Any] = info or {}
        self.frames = frames or []
        self.compress_level = compress_level
        self._images = images

    @property
    def images(self) -> list[bytes]:
        """PNG bytes, in output order, with the A1111 infotext in the ``parameters`` chunk."""
        if self._images is None:
            self._images = [encode_png(im, text, self.compress_level) for im, text in self.frames]
            self.frames = []
        return self._images


Inputs = dict[str, bytes]
"""Input images by object key, fetched by the worker before the blocking call."""


class Pipeline(Protocol):
    def generate(
        self,
        command: GenerateImage,
        inputs: Inputs,
        on_step: StepCallback,
        should_stop: Callable[[], bool],
        should_skip: Callable[[], bool] = ...,
    ) -> Generation:
        """Run the task. ``should_stop`` cancels it; ``should_skip`` (A1111's skip) ends
        the current job of a batch (``n_iter``) and goes on with the next."""
        ...


def on_this_thread(device: str) -> None:
    """Per-thread settings for the thread about to run a task. On CPU, denormal floats
    flushed to zero: random or tiny weights hit denormals and run many times slower. The
    flag is per thread (threads inherit it only from the thread that starts them), and
    a task runs on whichever executor thread is free."""
    if device == "cpu":
        torch.set_flush_denormal(True)


def release_memory(device: str) -> None:
    """Between tasks: hand the CUDA allocator's cached blocks back (the loaded weights
    stay), so a task's activations do not hold GPU memory while the worker idles."""
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def resolve_seed(seed: int) -> int:
    # A1111: -1 means random; the seed actually used is reported back.
    return random.SystemRandom().randrange(MAX_SEED) if seed == -1 else seed


def encode_skipping(pipe: Any, prompts: list[str], skip: int) -> Any:
    """CLIP embeddings from ``skip`` layers before the last, final layer norm applied."""
    if hasattr(pipe, "maybe_convert_prompt"):  # multi-vector textual inversions
        prompts = pipe.maybe_convert_prompt(prompts, pipe.tokenizer)
    tokens = pipe.tokenizer(
        prompts,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    encoder = pipe.text_encoder
    output = encoder(tokens.input_ids.to(encoder.device), output_hidden_states=True)
    norm = getattr(encoder, "final_layer_norm", None) or encoder.text_model.final_layer_norm
    return norm(output.hidden_states[-(skip + 1)])


@contextlib.contextmanager
def seamless(pipe: Any, *, enabled: bool) -> Iterator[None]:
    """A1111 ``tiling``: circular padding in every convolution, for this call only (a
    compiled UNet runs eagerly meanwhile: its graphs have the padding built in)."""
    if not enabled:
        yield
        return
    convolutions = [
        module
        for component in (pipe.unet, pipe.vae)
        for module in component.modules()
        if isinstance(module, torch.nn.Conv2d)
    ]
    saved = [module.padding_mode for module in convolutions]
    with eager_unet(pipe.unet):
        for module in convolutions:
            module.padding_mode = "circular"
        try:
            yield
        finally:
            for module, mode in zip(convolutions, saved, strict=True):
                module.padding_mode = mode


def encode_png(image: Image.Image, text: str, compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    meta = PngInfo()
    meta.add_text("parameters", text)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=meta, compress_level=compress_level)
    return buffer.getvalue()


@dataclass
class TaskPlan:
    """What one task's jobs use, fixed before the first step."""

    request: Request
    seeds: list[int]
    subseeds: list[int]
    infotexts: list[str]
    info: dict[str, Any]

    def _job(self, values: list[Any], job_no: int) -> list[Any]:
        first = job_no * self.request.batch_size
        return values[first : first + self.request.batch_size]

    def job_seeds(self, job_no: int) -> list[int]:
        return self._job(self.seeds, job_no)

    def job_subseeds(self, job_no: int) -> list[int]:
        return self._job(self.subseeds, job_no)

    def job_infotexts(self, job_no: int) -> list[str]:
        return self._job(self.infotexts, job_no)

    def generation(self, frames: list[tuple[Image.Image, str]], compress_level: int) -> Generation:
        return Generation(
            seeds=self.seeds, info=self.info, frames=frames, compress_level=compress_level
        )


class DiffusersPipeline:
    """One loaded checkpoint; ``generate`` is blocking and not re-entrant."""

    def __init__(
        self,
        pipe: Any,
        *,
        model_name: str,
        model_hash: str,
        device: str,
        preview_interval_s: float = 0.0,
        preview_decoder: str = "",
        max_loras: int = 8,
        cache_dir: Path | None = None,
        png_compress_level: int = PNG_COMPRESS_LEVEL,
        upscale_tile_px: int = 192,
        upscale_tile_overlap_px: int = 16,
        face_detector_path: str = "",
        vae_tile_px: int = 0,
        vae_batch_px: int = VAE_BATCH_PX,
        family: ModelFamily | None = None,
    ) -> None:
        self.pipe = pipe
        self.traits = traits(family or detect_loaded(pipe))
        """What this checkpoint's family does differently (encoders, variants, previews)."""
        self.face_detector_path = face_detector_path
        self._faces: Any = None
        """``faces.FaceRestoration``, made when a task first restores faces."""
        self.upscale_tile_px = upscale_tile_px
        self.upscale_tile_overlap_px = upscale_tile_overlap_px
        self.vae_tile_px = vae_tile_px
        """Images larger than this a side decode in tiles of this size (0: never; see
        :mod:`decoding`)."""
        self.vae_batch_px = vae_batch_px
        """A batch with more pixels than this is coded by the VAE row by row (0: always;
        see :mod:`decoding`)."""
        self._upscalers: Any = None
        """Hires fix's model upscalers (``upscalers.ModelCache``), made on first use."""
        self.png_compress_level = png_compress_level
        self.cache_dir = cache_dir or Path("./data/cache")
        self._own_vae = pipe.vae
        self.vae_upcasts = 0
        """Decodes redone in float32 because the half-precision one was not finite."""
        guard_decode(pipe.vae, self._count_upcast)
        self._vaes: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._embeddings: dict[str, str] = {}
        """Loaded textual inversions: name → file identity."""
        self.preview_interval_s = preview_interval_s
        self.previews = PreviewRenderer(
            self.traits.preview_factors, preview_decoder, device, pipe.unet.dtype
        )
        """Draws live previews (TAESD when given ``preview_decoder``, see :mod:`previews`)."""
        self._next_preview = 0.0
        self.model_name = model_name
        self.model_hash = model_hash
        self.device = device
        self.base_scheduler_config = pipe.scheduler.config
        self._variants: dict[str, Any] = {}
        self.loras = LoraSet(pipe, max_loaded=max_loras)
        self.controlnets = ControlNetCache(pipe.unet, device, self.cache_dir)
        self.compiled: CompiledUnet | None = None
        """The UNet compiled in the background (``SDSWARM_COMPILE``); None: eager only."""

    def compile_status(self) -> CompileStatus | None:
        """Where the compiled UNet stands, for the worker's liveness record."""
        return self.compiled.status() if self.compiled is not None else None

    def generate(
        self,
        command: GenerateImage,
        inputs: Inputs,
        on_step: StepCallback,
        should_stop: Callable[[], bool],
        should_skip: Callable[[], bool] = lambda: False,
    ) -> Generation:
        if isinstance(command, ExtrasTask):
            raise GenerationError("wrong_worker", "a checkpoint's worker got an extras task")
        on_this_thread(self.device)
        request: Request = command.request
        images_in = _load_images(request, inputs) if isinstance(request, Img2ImgRequest) else None
        if should_stop():  # the inputs' preparation (masks, blurs) may have taken a while
            raise TaskCancelledError
        plan = self.plan(command, request)
        frames: list[tuple[Image.Image, str]] = []
        try:
            control = self._control(command, inputs)
            self._load_embeddings(command.embeddings)
            with (
                self.loras.applied(command.loras),
                self._vae(command.vae),
                # Between the rows and tiles of the VAE's encode and decode too.
                interruptible_vae(self.pipe.vae, should_stop, TaskCancelledError),
            ):
                for job_no in range(request.n_iter):
                    if command.hr_loras is not None:  # the last job's hires pass switched
                        self.loras.activate(command.loras)
                    try:
                        images = self._run_job(
                            request,
                            images_in,
                            plan.job_seeds(job_no),
                            job_no,
                            control,
                            on_step,
                            should_stop,
                            should_skip,
                            subseeds=plan.job_subseeds(job_no),
                            hr_loras=command.hr_loras,
                            hr_upscaler=command.hr_upscaler,
                        )
                    except JobSkippedError:
                        continue  # skipped: no images from this job, on with the next
                    if command.face_restorer is not None:  # A1111: after decoding
                        images = self._restore_faces(command.face_restorer, images, should_stop)
                    frames += zip(images, plan.job_infotexts(job_no), strict=True)
        except LoraError as exc:
            raise GenerationError("lora_failed", str(exc)) from exc
        except ControlNetError as exc:
            raise GenerationError("controlnet_failed", str(exc)) from exc
        finally:
            release_memory(self.device)
        return plan.generation(frames, self.png_compress_level)

    def generate_batch(self, members: list[Member]) -> None:
        """Compatible tasks (equal :func:`~services.inference.batching.batch_key`) in one
        call per job; fills each member's outcome (see :mod:`services.inference.batched`)."""
        from services.inference.batched import run_batch

        on_this_thread(self.device)
        run_batch(self, members)

    def plan(self, command: DiffusionTask, request: Request) -> TaskPlan:
        """The task's seeds, subseeds and infotexts (one per image of every job)."""
        first_seed = resolve_seed(request.seed)
        count = request.batch_size * request.n_iter
        seeds = [(first_seed + i) % (MAX_SEED + 1) for i in range(count)]
        first_subseed = resolve_seed(request.subseed)
        subseeds = [(first_subseed + i) % (MAX_SEED + 1) for i in range(count)]
        restorer = command.face_restorer.name if command.face_restorer else None
        infotexts = [
            infotext(
                request,
                seed,
                self.model_name,
                self.model_hash,
                command.loras,
                command.vae,
                command.embeddings,
                command.controlnets,
                subseed=subseed,
                face_restoration=restorer,
            )
            for seed, subseed in zip(seeds, subseeds, strict=True)
        ]
        summary = info(
            request,
            seeds,
            infotexts,
            subseeds,
            model_name=self.model_name,
            model_hash=self.model_hash,
            restored=restorer is not None,
        )
        return TaskPlan(request, seeds, subseeds, infotexts, summary)

    @contextlib.contextmanager
    def _vae(self, ref: AdapterRef | None) -> Iterator[None]:
        """``sd_vae``: decode with a registered VAE for this task; the checkpoint and its
        own VAE stay loaded, and the own VAE is back afterwards."""
        if ref is None:
            yield
            return
        key = ref.sha256 or ref.path
        vae = self._vaes.get(key)
        if vae is None:
            from services.inference.loader import CheckpointError, load_vae

            try:
                vae = load_vae(Path(ref.path), self._own_vae.dtype, self.cache_dir)
            except CheckpointError as exc:
                raise GenerationError("vae_failed", f"VAE {ref.name!r}: {exc}") from exc
            vae = vae.to(self.device)
            guard_decode(vae, self._count_upcast)
            self._vaes[key] = vae
            while len(self._vaes) > MAX_VAES:
                self._vaes.popitem(last=False)
        self._vaes.move_to_end(key)
        try:
            self._set_vae(vae)
            yield
        finally:
            self._set_vae(self._own_vae)

    def _load_embeddings(self, refs: list[AdapterRef]) -> None:
        """Textual inversions, loaded once per worker and kept (A1111 keeps them all): the
        name becomes a token whose vectors replace the word wherever a prompt uses it."""
        for ref in refs:
            known = self._embeddings.get(ref.name)
            if known == (ref.sha256 or ref.path):
                continue
            from safetensors.torch import load_file

            try:
                if known is not None:  # the file was replaced: its new vectors
                    for tokenizer, encoder in self._text_encoders():
                        self.pipe.unload_textual_inversion(ref.name, tokenizer, encoder)
                if not ref.path.endswith(".safetensors"):
                    raise ValueError("only .safetensors embeddings are loaded")
                state = load_file(ref.path)
                keys = self.traits.embedding_keys
                if bool(keys) != ("clip_g" in state):
                    raise ValueError(
                        "SDXL embeddings (clip_l + clip_g) work with SDXL checkpoints only,"
                        " and SD1/SD2 embeddings with SD1/SD2 checkpoints only"
                    )
                if keys:  # one set of vectors per text encoder
                    for key, (tokenizer, encoder) in zip(keys, self._text_encoders(), strict=True):
                        self.pipe.load_textual_inversion(
                            state[key], token=ref.name, tokenizer=tokenizer, text_encoder=encoder
                        )
                else:
                    self.pipe.load_textual_inversion(state, token=ref.name)
            except (ValueError, OSError, RuntimeError) as exc:
                raise GenerationError(
                    "embedding_failed", f"embedding {ref.name!r} cannot be used: {exc}"
                ) from exc
            self._embeddings[ref.name] = ref.sha256 or ref.path

    def _control(self, command: DiffusionTask, inputs: Inputs) -> Control | None:
        """The task's ControlNet units with their models loaded and images decoded."""
        units = [unit for unit in command.controlnets if runs(unit)]
        if not units:
            return None
        sources = []
        for unit in units:
            data = inputs.get(unit.image_key)
            if data is None:
                raise GenerationError("input_missing", f"input image {unit.image_key} is missing")
            with Image.open(io.BytesIO(data)) as image:
                sources.append(image.convert("RGB"))
        nets = [self.controlnets.get(unit) for unit in units]
        return Control(units=units, nets=nets, sources=sources)

    def _text_encoders(self) -> list[tuple[Any, Any]]:
        pipe = self.pipe
        pairs = [(pipe.tokenizer, pipe.text_encoder)]
        if self.traits.text_encoders == 2:
            pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
        return pairs

    def _count_upcast(self) -> None:
        self.vae_upcasts += 1

    def _set_vae(self, vae: Any) -> None:
        for pipe in (self.pipe, *self._variants.values()):
            pipe.vae = vae

    def _variant(self, variant: Variant) -> Any:
        """img2img / inpaint pipelines share the loaded components (no extra memory)."""
        import diffusers

        name = self.traits.class_name(variant)
        cached = self._variants.get(name)
        if cached is None:
            cls = getattr(diffusers, name)
            cached = cls(**self.pipe.components)
            cached.set_progress_bar_config(disable=True)
            self._variants[name] = cached
        return cached

    def _run_job(
        self,
        request: Request,
        images_in: img2img.ImageInputs | None,
        seeds: list[int],
        job_no: int,
        control: Control | None,
        on_step: StepCallback,
        should_stop: Callable[[], bool],
        should_skip: Callable[[], bool] = lambda: False,
        subseeds: list[int] | None = None,
        hr_loras: list[AdapterRef] | None = None,
        hr_upscaler: AdapterRef | None = None,
        *,
        prompt_options: dict[str, Any] | None = None,
        step_callback: Callable[..., Any] | None = None,
    ) -> list[Image.Image]:
        """One job: a diffusers call for ``seeds`` (one image each). A batch of tasks
        passes its rows' merged ``prompt_options`` and its own ``step_callback``."""
        scheduler = build_scheduler(
            self.base_scheduler_config,
            request.effective_sampler,
            request.scheduler,
            seed=seeds[0],
        )
        apply_churn(scheduler, churn(request))
        pipe = self.pipe
        options: dict[str, Any] = {"width": request.width, "height": request.height}
        if images_in is not None:
            assert isinstance(request, Img2ImgRequest)
            # Latents prepared here (resize mode 3, latent fills) unless ControlNet's
            # pipelines need the pixels.
            variant, options = img2img.call_options(
                self.pipe, images_in, seeds, latents=control is None
            )
            pipe = self._variant(variant)
            multiplier = request.initial_noise_multiplier
            if multiplier is not None and multiplier != 1:
                img2img.scale_initial_noise(pipe, scheduler, multiplier)
        pipe.scheduler = scheduler
        hires = isinstance(request, Txt2ImgRequest) and request.enable_hr
        first_control = control.for_pass(hires=hires) if control is not None else None
        if first_control is not None:
            pipe, image_key = with_control(pipe, first_control, guided=request.cfg_scale > 1)
            options |= first_control.options(request.width, request.height, image_key=image_key)
        # One CPU generator per image: the same seed gives the same image whatever the
        # batch size or device (A1111 draws its noise on the CPU too).
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        if images_in is None and _explicit_noise(request):
            # Variation seeds, seed resize, ENSD: the starting noise is drawn here and the
            # generators only feed the samplers' per-step noise (from seed + ENSD).
            options["latents"] = self._initial_noise(pipe, request, seeds, subseeds or seeds)
            delta = noise_seed_delta(request)
            generators = [torch.Generator("cpu").manual_seed(seed + delta) for seed in seeds]

        first_total = request.steps
        second_total = self._hires_steps(request) if hires else 0
        offset = 0

        every = preview_every(request)

        def callback(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> Any:
            if should_stop():
                raise TaskCancelledError
            if should_skip():
                raise JobSkippedError
            # img2img runs only the last `strength` part of the schedule: count what runs.
            total = getattr(pipe, "_num_timesteps", None) or len(pipe.scheduler.timesteps)
            if hires:  # both passes make one progress bar
                total = first_total + second_total
            preview = None
            done = offset + step + 1
            now = time.monotonic()
            latents = kwargs.get("latents")
            if latents is not None and self._preview_due(every, done, now):
                preview = self.previews.render(latents)
            on_step(job_no, done, total, preview)
            return kwargs

        if request.eta is not None and "eta" in _call_parameters(pipe):
            options["eta"] = request.eta
        with (
            torch.inference_mode(),
            seamless(pipe, enabled=bool(request.tiling)),
            tiled_decode(pipe.vae, self.vae_tile_px),
            rows_apart(pipe.vae, len(seeds) * _largest_px(request), self.vae_batch_px),
        ):
            if prompt_options is None:
                prompt_options = self._prompt_options(
                    pipe, request, request.prompt, request.negative_prompt, len(seeds)
                )
            options |= prompt_options
            latent_mode = (
                isinstance(request, Txt2ImgRequest)
                and hires
                and (request.hr_upscaler or "Latent") in LATENT_UPSCALE_MODES
            )
            result = pipe(
                num_inference_steps=request.steps,
                guidance_scale=request.cfg_scale,
                generator=generators,
                callback_on_step_end=step_callback or callback,
                output_type="latent" if latent_mode else "pil",
                **options,
            )
            if hires:
                assert isinstance(request, Txt2ImgRequest)
                offset = first_total
                if hr_loras is not None:  # hr_prompt's LoRAs, as A1111 activates them
                    self.loras.activate(hr_loras)
                result = self._hires_pass(
                    request,
                    result.images,
                    seeds,
                    generators,
                    callback,
                    control,
                    model=hr_upscaler,
                    should_stop=should_stop,
                )
        images: list[Image.Image] = result.images
        if images_in is not None:  # pasted back into the originals (A1111's overlay)
            images = images_in.finish(images)
        return images

    def _preview_due(self, every: int | None, step: int, now: float) -> bool:
        """Every ``every`` steps when the request says (A1111's
        ``show_progress_every_n_steps``; 0 or -1: none), else at most once per
        ``preview_interval_s``."""
        if every is not None:
            return every > 0 and step % every == 0
        if self.preview_interval_s and now >= self._next_preview:
            self._next_preview = now + self.preview_interval_s
            return True
        return False

    def _initial_noise(
        self, pipe: Any, request: Request, seeds: list[int], subseeds: list[int]
    ) -> torch.Tensor:
        factor = pipe.vae_scale_factor
        channels = pipe.vae.config.latent_channels
        shape = (channels, request.height // factor, request.width // factor)
        resize_from = None
        from_w, from_h = request.seed_resize_from_w, request.seed_resize_from_h
        if from_w > 0 and from_h > 0:
            resize_from = (from_h // factor, from_w // factor)
        noise = initial_noise(seeds, subseeds, request.subseed_strength, shape, resize_from)
        return noise.to(device=self.device, dtype=pipe.unet.dtype)

    def _prompt_options(
        self, pipe: Any, request: Request, prompt: str, negative: str, count: int
    ) -> dict[str, Any]:
        """What the pipeline takes for the prompts: text, or embeddings we encode."""
        skip = clip_skip(request)
        # The encoder sees the prompts without their <lora:…> tags (applied as adapters).
        prompts, negatives = [strip_tags(prompt)] * count, [strip_tags(negative)] * count
        own = any(needs_own_encoder(text, pipe.tokenizer) for text in (prompts[0], negatives[0]))
        if self.traits.xl:
            if own or skip:  # emphasis, BREAK, long prompts, clip skip: both encoders
                return encode_weighted_xl(pipe, prompts[0], negatives[0], skip, count)
            return {"prompt": prompts, "negative_prompt": negatives}
        if own:
            # A1111's emphasis, BREAK and prompts past 75 tokens (SD1/SD2).
            positive, negative_embeds = encode_weighted(pipe, prompts[0], negatives[0], skip, count)
            return {"prompt_embeds": positive, "negative_prompt_embeds": negative_embeds}
        if skip:
            # diffusers' own clip_skip reaches for `text_encoder.text_model`, which
            # transformers 5 no longer has: encode here, the same way.
            return {
                "prompt_embeds": encode_skipping(pipe, prompts, skip),
                "negative_prompt_embeds": encode_skipping(pipe, negatives, skip),
            }
        return {"prompt": prompts, "negative_prompt": negatives}

    @staticmethod
    def _hires_steps(request: Request) -> int:
        """Steps the second pass runs: its steps × denoising strength (diffusers, A1111)."""
        assert isinstance(request, Txt2ImgRequest)
        steps = request.hr_second_pass_steps or request.steps
        return min(int(steps * request.hires_strength), steps)

    def _hires_pass(
        self,
        request: Txt2ImgRequest,
        first: Any,
        seeds: list[int],
        generators: list[torch.Generator],
        callback: Callable[..., Any],
        control: Control | None = None,
        *,
        model: AdapterRef | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> Any:
        """A1111's hires fix: upscale the first pass (its latents, or the decoded image;
        with ``model``, the registered upscaler ``hr_upscaler`` names, tile by tile) to
        ``hr_size`` and denoise it again with img2img at ``denoising_strength``."""
        width, height = request.hr_size()
        upscaler = request.hr_upscaler or "Latent"
        image: Any
        if should_stop():  # between stages too, not only between steps (issue 15, item 11)
            raise TaskCancelledError
        if model is not None:
            image = [self._model_upscale(model, im, (width, height), should_stop) for im in first]
        elif upscaler in LATENT_UPSCALE_MODES:
            mode, antialias = LATENT_UPSCALE_MODES[upscaler]
            image = torch.nn.functional.interpolate(
                first,
                size=(height // 8, width // 8),
                mode=mode,
                **({"antialias": True} if antialias else {}),
            )
        else:
            resample = (
                Image.Resampling.NEAREST if upscaler == "Nearest" else Image.Resampling.LANCZOS
            )
            image = [im.resize((width, height), resample) for im in first]
        if should_stop():  # the upscale may have taken a while
            raise TaskCancelledError
        pipe = self._variant(Variant.IMG2IMG)
        sampler = request.hr_sampler_name
        if not sampler or sampler == "Use same sampler":
            sampler = request.effective_sampler
        pipe.scheduler = build_scheduler(
            self.base_scheduler_config,
            sampler,
            request.hr_scheduler or request.scheduler,
            seed=seeds[0],
        )
        apply_churn(pipe.scheduler, churn(request))
        prompt = request.hr_prompt or request.prompt
        negative = request.hr_negative_prompt or request.negative_prompt
        options: dict[str, Any] = {}
        second = control.for_pass(hires=True, hires_pass=True) if control is not None else None
        if second is not None:  # the units guide the second pass too, at its size
            pipe, image_key = with_control(pipe, second, guided=request.cfg_scale > 1)
            options = second.options(width, height, image_key=image_key)
        return pipe(
            image=image,
            strength=request.hires_strength,
            num_inference_steps=request.hr_second_pass_steps or request.steps,
            guidance_scale=request.cfg_scale,
            generator=generators,
            callback_on_step_end=callback,
            output_type="pil",
            **options,
            **self._prompt_options(pipe, request, prompt, negative, len(seeds)),
        )

    def _restore_faces(
        self, ref: AdapterRef, images: list[Image.Image], should_stop: Callable[[], bool]
    ) -> list[Image.Image]:
        """``restore_faces``: each image's faces restored by the task's restorer."""
        from services.inference.faces import FaceRestoration

        if self._faces is None:
            self._faces = FaceRestoration(self.device, self.face_detector_path)
        return [
            self._faces.restore(ref.name, ref.path, image, should_stop=should_stop)
            for image in images
        ]

    def _model_upscale(
        self,
        ref: AdapterRef,
        image: Image.Image,
        size: tuple[int, int],
        should_stop: Callable[[], bool],
    ) -> Image.Image:
        """``image`` to ``size`` through an upscaler model (spandrel), tiled as extras are;
        cancellation is checked between tiles."""
        from services.inference.upscalers import ModelCache, upscale_with_model

        if self._upscalers is None:
            self._upscalers = ModelCache(self.device, capacity=1)
        upscaler = self._upscalers.get(ref.name, ref.path)
        return upscale_with_model(
            upscaler,
            image,
            size,
            tile=self.upscale_tile_px,
            overlap=self.upscale_tile_overlap_px,
            should_stop=should_stop,
        )


def _largest_px(request: Request) -> int:
    """The pixels of the largest image the VAE codes for one row of ``request``."""
    pixels = request.width * request.height
    if isinstance(request, Txt2ImgRequest) and request.enable_hr:
        width, height = request.hr_size()
        pixels = max(pixels, width * height)
    return pixels


def _explicit_noise(request: Request) -> bool:
    """Whether the starting noise differs from diffusers' own draw from the seed."""
    resized = request.seed_resize_from_w > 0 and request.seed_resize_from_h > 0
    return request.subseed_strength > 0 or resized or noise_seed_delta(request) != 0


def _call_parameters(pipe: Any) -> set[str]:
    import inspect

    return set(inspect.signature(pipe.__call__).parameters)


def _load_images(request: Img2ImgRequest, inputs: Inputs) -> img2img.ImageInputs:
    try:
        return img2img.ImageInputs.load(request, inputs)
    except img2img.InputError as exc:
        raise GenerationError(exc.code, str(exc)) from exc
