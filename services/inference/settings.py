"""Worker settings (``SDSWARM_*``): one process serves one checkpoint."""

from __future__ import annotations

import os
import socket

import msgspec

from services.common.settings import StoreSettings
from services.inference.decoding import VAE_BATCH_PX


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerSettings(StoreSettings, kw_only=True, frozen=True):
    model_name: str
    """Registered name of the checkpoint this worker serves."""
    model_key: str
    checkpoint_path: str
    """A single-file checkpoint or a diffusers folder."""
    model_hash: str = ""
    """Short hash shown in infotexts (A1111's ``Model hash``)."""
    cache_dir: str = "./data/cache"
    """Materialised config folders and tokenizer files."""
    model_object: str = ""
    """Object-store key of the checkpoint, fetched into the cache when ``checkpoint_path``
    is not on this node (a model registered from the object store)."""
    model_sha256: str = ""
    """The registry's SHA-256 of the checkpoint; a fetched copy must match it."""
    model_size: int = 0
    model_mtime: float = 0.0
    """Size and mtime (``st_mtime``) of the file ``model_sha256`` was computed from, as
    the registry recorded them; a file at ``checkpoint_path`` with others (replaced since
    the record was read) is hashed before loading (identity.py). 0: not known."""
    model_cache_bytes: int = 200 * 1024**3
    """Fetched checkpoints kept in ``cache_dir`` (least recently used evicted first)."""
    converted_cache_bytes: int = 50 * 1024**3
    """Converted-weights cache (``cache_dir/converted``): a single file is converted to the
    diffusers layout once, keyed by ``model_sha256``, and loaded from there afterwards;
    least recently used copies are removed beyond this. 0: off."""
    warmup_px: int = -1
    """After loading, one one-step generation of this size (pixels a side) pays the first
    call's lazy initialisation before a task would. 0: off; -1: 64 on CUDA (kernels,
    allocator), off on CPU, where it only delays the worker's start. It runs eagerly: a
    compiled UNet compiles in the background afterwards (``compile``)."""
    compile: bool = False
    """Compile the UNet with ``torch.compile`` (inductor; channels_last on CUDA) for static
    batch buckets (powers of two up to ``max_batch`` rows, and ``max_batch``) and the
    sizes of ``compile_sizes``, in the background after loading; until a shape is ready
    its calls run eagerly. Caches persist under ``cache_dir/compile``. A compile that
    fails falls back to eager with a logged reason, never a failed task."""
    compile_sizes: str = ""
    """Image sizes to compile, ``WIDTHxHEIGHT`` in pixels, comma-separated
    (``512x512,768x512``); empty: the family's native size (SD1 512², SD2 768² for
    v-prediction else 512², SDXL 1024²)."""
    device: str = "auto"
    """``auto`` picks CUDA when present, else the CPU."""
    cpu_threads: int = 0
    """Threads torch computes with when the worker runs on the CPU. 0: one less than the
    cores this process may use (at least 1), unless ``OMP_NUM_THREADS`` is set: the
    worker's own event loop and output threads, and a control plane on the same machine,
    need a core, and torch's threads wait for each other at every operation, so one of
    them descheduled stalls them all (2 cores, tiny model, 30 steps, depth 32: the whole
    system went from 0.38× to 0.74× of plain diffusers; README, *What the system adds*)."""
    prediction_type: str = ""
    """``v_prediction`` for v-models (SD2.x 768-v); empty: the family's default (epsilon)."""
    preview_interval_s: float = 1.0
    """Upload a live preview (``images/{user}/{task}_progress.png``) at most this often; 0: off."""
    preview_decoder_path: str = ""
    """A TAESD decoder (``vaeApprox``) drawing the previews; empty: the latent → RGB
    approximation. The scheduler sets it from the registry."""
    worker_id: str = msgspec.field(default_factory=_default_worker_id)
    fetch_timeout_s: float = 1.0
    """How long one fetch waits for a task: an idle worker notices SIGTERM (and its idle
    time) after at most this (5 s cost every stop and every test system 4 s)."""
    restart_stagger_s: float = 20.0
    """On ``POST /restart`` the n-th worker of a pool steps down n × this after the first,
    so a pool never restarts all at once."""
    stop_grace_s: float = 10.0
    """On SIGTERM the current task may finish within this; then it is handed back (nak)."""
    parent_pid: int = 0
    """Exit (after the current task) once this process is no longer our parent: the
    local backend passes its pid, so a worker never outlives it. 0: no such check."""
    upscale_tile_px: int = 192
    """Model upscalers (extras, hires fix) run on tiles of this many pixels a side (0: whole
    image at once), which bounds memory on large images (A1111's ``ESRGAN_tile``)."""
    upscale_tile_overlap_px: int = 16
    """Context around each tile, dropped from its output (A1111's ``ESRGAN_tile_overlap``)."""
    vae_tile_px: int = 0
    """Images wider or taller than this many pixels are decoded by the VAE in tiles of
    this size, blended at the seams (diffusers' tiled VAE: bounded memory for large
    images; faint seams are possible). 0: never. A cancel is honoured between tiles."""
    vae_batch_px: int = VAE_BATCH_PX
    """A batch whose images together have at most this many pixels is encoded and
    decoded by the VAE in one forward (four 512² images, one 1024²); a larger one image
    by image (its activations are then one image's; a cancel is honoured between
    images). 0: always image by image."""
    face_detector_path: str = ""
    """Face restoration: the OpenCV Haar cascade that finds faces; empty: the frontal-face
    cascade that ships in ``opencv-python-headless`` 4.x (``cv2.data``)."""
    max_batch: int = 1
    """Tasks taken at once; compatible ones share one diffusers call (see README,
    "Batching"). The scheduler sets it per checkpoint (``SDSWARM_MAX_BATCH``)."""
    batch_wait_ms: float = 0.0
    """How long to wait for more tasks once one is in hand (0: take only what is queued)."""
    png_compress_level: int = 6
    """zlib level of output PNGs, 0–9 (Pillow's default 6; lower is faster, larger)."""
    idle_exit_s: float = 0.0
    """Exit after this long without work (0: never); the scheduler also stops idle workers."""
