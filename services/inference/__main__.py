"""``python -m services.inference``: one worker process for one checkpoint."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from proto import names
from services.common import bus, logs, metrics
from services.common.cores import compute_threads, usable_cores
from services.common.settings import from_environ
from services.common.supervise import stop_on_signals
from services.inference.coldstart import Phases
from services.inference.identity import FileIdentity, described
from services.inference.pipeline import DiffusersPipeline, GenerationError, Pipeline
from services.inference.settings import WorkerSettings
from services.inference.worker import Worker
from services.storage.modelcache import ModelCacheError, materialize
from services.storage.objects import ObjectNotFoundError, ObjectStore, open_object_store

log = logging.getLogger("services.inference")


def pick_device(setting: str) -> str:
    import torch

    if setting != "auto":
        return setting
    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_threads(setting: int, cores: int, environ: Mapping[str, str]) -> int | None:
    """How many threads torch computes with on the CPU (``cpu_threads``); None: leave
    torch's own choice (``OMP_NUM_THREADS`` set by the operator, and no setting)."""
    if setting > 0:
        return setting
    if environ.get("OMP_NUM_THREADS"):
        return None
    return compute_threads(cores)


def _use_cpu(settings: WorkerSettings) -> None:
    import torch

    # Random or tiny weights hit denormals and run 10-50x slower without this.
    torch.set_flush_denormal(True)
    threads = torch_threads(settings.cpu_threads, usable_cores(), os.environ)
    if threads is not None:
        torch.set_num_threads(threads)
    log.info("computing on the CPU with %d threads", torch.get_num_threads())


def make_pipeline_factory(  # type: ignore[no-untyped-def]
    settings: WorkerSettings, phases: Phases | None = None
):
    """The checkpoint's pipeline, loaded in timed phases (``phases``: see coldstart.py)."""
    phases = phases or Phases()

    def factory() -> Pipeline:
        import diffusers  # noqa: F401 - its import is the larger part of this phase
        import torch

        from services.inference.loader import CheckpointError, load_pipeline

        phases.lap("imports")
        device = pick_device(settings.device)
        if device == "cpu":
            _use_cpu(settings)
        elif device.startswith("cuda"):
            torch.zeros(1, device=device)  # the CUDA context, here rather than in a phase below
        phases.lap("device")
        try:
            pipe = load_pipeline(
                Path(settings.checkpoint_path),
                device=device,
                cache_dir=Path(settings.cache_dir),
                allow_pickle=settings.allow_pickle,
                prediction_type=settings.prediction_type or None,
                sha256=settings.model_sha256,
                converted_cache_bytes=settings.converted_cache_bytes,
                phases=phases,
            )
        except CheckpointError as exc:
            raise GenerationError("model_load_failed", str(exc)) from exc
        pipe.set_progress_bar_config(disable=True)
        loaded = DiffusersPipeline(
            pipe,
            model_name=settings.model_name,
            model_hash=settings.model_hash,
            device=device,
            preview_interval_s=settings.preview_interval_s,
            preview_decoder=settings.preview_decoder_path,
            cache_dir=Path(settings.cache_dir),
            png_compress_level=settings.png_compress_level,
            upscale_tile_px=settings.upscale_tile_px,
            upscale_tile_overlap_px=settings.upscale_tile_overlap_px,
            vae_tile_px=settings.vae_tile_px,
            vae_batch_px=settings.vae_batch_px,
            face_detector_path=settings.face_detector_path,
        )
        warmup_px = settings.warmup_px
        if warmup_px < 0:
            warmup_px = 64 if device.startswith("cuda") else 0
        if warmup_px > 0:
            warm_up(pipe, warmup_px)
        phases.lap("warmup")
        if settings.compile:  # in the background, once loaded: never on the cold start
            from services.inference.compiled import compile_unet

            loaded.compiled = compile_unet(
                pipe,
                device=device,
                base=loaded.traits.base,
                max_batch=settings.max_batch,
                sizes=settings.compile_sizes,
                cache_dir=Path(settings.cache_dir),
            )
            loaded.compiled.start()
        return loaded

    return factory


def warm_up(pipe: Any, size: int) -> None:
    """One one-step generation: the first call's lazy initialisation (kernels, allocator)
    is paid here, not by the first task; it runs eagerly (a compiled UNet compiles after
    it, in the background). Its failure is logged only: a task meets the same error with
    a proper reason."""
    import inspect

    import torch

    if "mask_image" in inspect.signature(pipe.__call__).parameters:
        return  # inpainting checkpoints need an image and a mask: nothing cheap to warm with
    side = max(8, size // 8 * 8)
    try:
        with torch.inference_mode():
            pipe(
                prompt="",
                num_inference_steps=1,
                height=side,
                width=side,
                generator=torch.Generator("cpu").manual_seed(0),
                output_type="pil",
            )
    except Exception as exc:
        log.warning("warm-up call failed (%s: %s)", type(exc).__name__, exc)


def make_extras_factory(settings: WorkerSettings):  # type: ignore[no-untyped-def]
    """The extras pool's worker: no checkpoint, upscaler models loaded on demand."""

    def factory() -> Pipeline:
        from services.inference.extras import ExtrasRunner
        from services.inference.faces import FaceRestoration
        from services.inference.upscalers import ModelCache

        device = pick_device(settings.device)
        if device == "cpu":
            _use_cpu(settings)
        return ExtrasRunner(
            device=device,
            tile=settings.upscale_tile_px,
            overlap=settings.upscale_tile_overlap_px,
            models=ModelCache(device),
            faces=FaceRestoration(device, settings.face_detector_path),
        )

    return factory


async def local_checkpoint(settings: WorkerSettings, objects: ObjectStore) -> WorkerSettings:
    """Settings pointing at a checkpoint on this node: the shared folder's file, else a
    verified copy of the registered object fetched into the cache."""
    path = Path(settings.checkpoint_path)
    if await asyncio.to_thread(path.exists) or not settings.model_object:
        return settings
    try:
        cached = await materialize(
            objects,
            settings.model_object,
            settings.model_sha256,
            Path(settings.cache_dir),
            suffix=path.suffix or ".safetensors",
            max_bytes=settings.model_cache_bytes,
        )
    except (ModelCacheError, ObjectNotFoundError, OSError) as exc:
        # The worker still starts: loading the missing path fails every task with why.
        log.error("cannot fetch the checkpoint %s: %s", settings.model_object, exc)
        return settings
    return msgspec.structs.replace(settings, checkpoint_path=str(cached))


async def amain(settings: WorkerSettings) -> None:
    phases = Phases()  # from this process's start, read from /proc
    stop = stop_on_signals()
    nc = await bus.connect(settings.nats_url, f"sdswarm-worker-{settings.model_key}", settings)
    objects = await open_object_store(settings)
    checkpoint: FileIdentity | None = None
    try:
        if settings.model_key == names.EXTRAS_MODEL_KEY:
            factory = make_extras_factory(settings)
        else:
            phases.lap("imports")
            fetched = await local_checkpoint(settings, objects)
            if fetched.checkpoint_path != settings.checkpoint_path:
                phases.lap("fetch")  # a copy from the object store, not an import
            else:  # the shared folder's file: the one the record's hash describes?
                fetched, checkpoint = await asyncio.to_thread(described, fetched)
                if fetched.model_sha256 != settings.model_sha256:
                    phases.lap("hash")  # replaced since the record was read
            settings = fetched
            factory = make_pipeline_factory(settings, phases)
        worker = Worker(settings, nc, objects, factory, phases, checkpoint=checkpoint)
        await worker.run(stop)
        if worker.fatal:
            raise SystemExit(70)  # EX_SOFTWARE: the backend replaces a crashed worker
    finally:
        await objects.aclose()
        await nc.drain()


def main() -> None:
    settings = from_environ(WorkerSettings)
    logs.setup(settings, model_key=settings.model_key, worker=settings.worker_id)
    asyncio.run(metrics.serving(settings, amain(settings), "worker metrics"))


if __name__ == "__main__":
    main()
