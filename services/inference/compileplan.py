"""What a compiled UNet compiles, and where its caches live (``SDSWARM_COMPILE``).

Static batch buckets: the UNet sees rows × 2 with classifier-free guidance, and a batch is
padded up to the smallest bucket that holds it, so a few graphs serve every batch size up
to ``max_batch``. Sizes: ``SDSWARM_COMPILE_SIZES`` or the family's native one. No torch
here except where the caches are named, so the plan is tested without it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TEXT_TOKENS = 77
"""CLIP's context: prompts past 75 tokens (A1111 chunks) run eagerly."""
NATIVE_PX = {"sd1": 512, "sd2": 512, "sdxl": 1024}
"""Each family's training size a side; SD2's v-prediction models (768-v) are 768."""
SD2_V_PX = 768


@dataclass(frozen=True, order=True)
class Shape:
    """One static shape: the UNet's batch and the image size in pixels."""

    batch: int
    width: int
    height: int

    @property
    def label(self) -> str:
        """``4@512x512``: UNet batch 4 (two rows with guidance) at 512×512 pixels."""
        return f"{self.batch}@{self.width}x{self.height}"


def unet_batches(max_rows: int) -> list[int]:
    """UNet batches 2·r for r in the powers of two below ``max_rows``, and ``max_rows``."""
    rows = {max(max_rows, 1)}
    row = 1
    while row < max_rows:
        rows.add(row)
        row *= 2
    return sorted(2 * row for row in rows)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``512x512,768x512`` → ``[(512, 512), (768, 512)]`` (width, height in pixels)."""
    sizes: list[tuple[int, int]] = []
    for part in text.split(","):
        if not part.strip():
            continue
        width, _, height = part.strip().lower().partition("x")
        if not (width.isdigit() and height.isdigit()):
            raise ValueError(
                f"SDSWARM_COMPILE_SIZES: {part.strip()!r} is not WIDTHxHEIGHT (like 512x768)"
            )
        size = (int(width), int(height))
        if min(size) < 8 or size[0] % 8 or size[1] % 8:
            raise ValueError(
                f"SDSWARM_COMPILE_SIZES: width and height have to be divisible by 8 and at"
                f" least 8 but are {size[0]} and {size[1]}"
            )
        if size not in sizes:
            sizes.append(size)
    return sizes


def native_size(base: str, prediction_type: str) -> tuple[int, int]:
    """The family's native size (``base``: ``sd1``, ``sd2``, ``sdxl``)."""
    side = SD2_V_PX if base == "sd2" and prediction_type == "v_prediction" else NATIVE_PX[base]
    return side, side


def plan(max_batch: int, sizes: str, base: str, prediction_type: str = "epsilon") -> list[Shape]:
    """The shapes to compile, most useful first: a single task at the first size first."""
    chosen = parse_sizes(sizes) or [native_size(base, prediction_type)]
    batches = unet_batches(max_batch)
    return [Shape(batch, width, height) for width, height in chosen for batch in batches]


def persist_caches(cache_dir: Path, torch_version: str) -> Path:
    """Point inductor's (FX graph, AOT) and Triton's caches under ``cache_dir``, per torch
    version, so only a node's first start of a checkpoint compiles cold. The folder may
    be a volume shared by nodes with the same GPU and software. Before any compile."""
    root = (cache_dir / "compile" / f"torch-{torch_version}").resolve()
    # These libraries are configured through the environment, read at each compile.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(root / "triton")
    return root
