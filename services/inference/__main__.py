"""``python -m services.inference``: one worker process for one checkpoint."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import msgspec

from proto import names
from services.common import bus
from services.common.settings import from_environ
from services.common.supervise import stop_on_signals
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


def make_pipeline_factory(settings: WorkerSettings):  # type: ignore[no-untyped-def]
    def factory() -> Pipeline:
        import torch

        from services.inference.loader import CheckpointError, load_pipeline

        device = pick_device(settings.device)
        if device == "cpu":
            # Random or tiny weights hit denormals and run 10-50x slower without this.
            torch.set_flush_denormal(True)
        try:
            pipe = load_pipeline(
                Path(settings.checkpoint_path),
                device=device,
                cache_dir=Path(settings.cache_dir),
                allow_pickle=settings.allow_pickle,
                prediction_type=settings.prediction_type or None,
            )
        except CheckpointError as exc:
            raise GenerationError("model_load_failed", str(exc)) from exc
        pipe.set_progress_bar_config(disable=True)
        return DiffusersPipeline(
            pipe,
            model_name=settings.model_name,
            model_hash=settings.model_hash,
            device=device,
            preview_interval_s=settings.preview_interval_s,
            cache_dir=Path(settings.cache_dir),
            png_compress_level=settings.png_compress_level,
            upscale_tile_px=settings.upscale_tile_px,
            upscale_tile_overlap_px=settings.upscale_tile_overlap_px,
            face_detector_path=settings.face_detector_path,
        )

    return factory


def make_extras_factory(settings: WorkerSettings):  # type: ignore[no-untyped-def]
    """The extras pool's worker: no checkpoint, upscaler models loaded on demand."""

    def factory() -> Pipeline:
        import torch

        from services.inference.extras import ExtrasRunner
        from services.inference.faces import FaceRestoration
        from services.inference.upscalers import ModelCache

        device = pick_device(settings.device)
        if device == "cpu":
            torch.set_flush_denormal(True)
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
    stop = stop_on_signals()
    nc = await bus.connect(settings.nats_url, f"sdswarm-worker-{settings.model_key}", settings)
    objects = await open_object_store(settings)
    try:
        if settings.model_key == names.EXTRAS_MODEL_KEY:
            factory = make_extras_factory(settings)
        else:
            settings = await local_checkpoint(settings, objects)
            factory = make_pipeline_factory(settings)
        worker = Worker(settings, nc, objects, factory)
        await worker.run(stop)
        if worker.fatal:
            raise SystemExit(70)  # EX_SOFTWARE: the backend replaces a crashed worker
    finally:
        await objects.aclose()
        await nc.drain()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(amain(from_environ(WorkerSettings)))


if __name__ == "__main__":
    main()
