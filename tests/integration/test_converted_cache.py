"""The converted-weights cache on the tiny checkpoint: converted once, then loaded from
the cache with bit-identical images; another file (another SHA-256) is a miss."""

from __future__ import annotations

import hashlib
import io
import shutil
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402

from services.inference import converted  # noqa: E402
from services.inference.coldstart import Phases  # noqa: E402
from services.inference.loader import load_pipeline  # noqa: E402
from services.inference.pipeline import DiffusersPipeline  # noqa: E402
from tests.fixtures.tiny_runner import run_tiny  # noqa: E402

pytestmark = pytest.mark.integration
BOUND = 1024**3


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load(checkpoint: Path, cache: Path, sha256: str, bound: int = BOUND) -> tuple[bytes, Phases]:
    """One worker start: load (timed in phases) and one image's pixels."""
    torch.set_flush_denormal(True)
    phases = Phases(time.time())
    pipe = load_pipeline(
        checkpoint, cache_dir=cache, sha256=sha256, converted_cache_bytes=bound, phases=phases
    )
    pipe.set_progress_bar_config(disable=True)
    runner = DiffusersPipeline(pipe, model_name="tiny", model_hash="abc", device="cpu")
    png = run_tiny(runner).images[0]
    return Image.open(io.BytesIO(png)).tobytes(), phases


def test_second_load_hits_the_cache_with_identical_images(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    sha256 = _sha256(tiny_checkpoint)
    first, cold = _load(tiny_checkpoint, tmp_path, sha256)
    assert False is cold.weights_cached
    copy = converted.entry(tmp_path, sha256, "float32")
    assert (copy / converted.SOURCE_FILE).is_file()
    assert list(copy.rglob("*.safetensors")), "weights saved as safetensors"
    assert [copy] == list(converted.root(tmp_path).iterdir()), "no staging folder left behind"

    second, warm = _load(tiny_checkpoint, tmp_path, sha256)
    assert True is warm.weights_cached
    assert first == second, "the cached copy gives bit-identical images"
    print(
        f"\nweights phase: converted {cold.seconds()['weights']:.2f} s,"
        f" cached {warm.seconds()['weights']:.2f} s"
    )


def test_another_file_is_a_miss_and_a_stale_copy_is_dropped(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "model.safetensors"
    shutil.copy(tiny_checkpoint, checkpoint)
    cache = tmp_path / "cache"
    sha256 = _sha256(checkpoint)
    _, phases = _load(checkpoint, cache, sha256)
    assert False is phases.weights_cached

    # The file is replaced by another one (a new SHA-256): a miss, converted again.
    from safetensors.torch import load_file, save_file

    tensors = load_file(checkpoint)
    name = next(n for n in tensors if n.endswith("out.2.bias"))
    tensors[name] = tensors[name] + 0.5
    save_file(tensors, checkpoint)
    changed = _sha256(checkpoint)
    assert changed != sha256
    _, phases = _load(checkpoint, cache, changed)
    assert False is phases.weights_cached

    # A registry that still names the old SHA-256 finds a copy whose source is not this
    # file any more: the file's content decides, and that copy is dropped.
    _, phases = _load(checkpoint, cache, sha256)
    assert False is phases.weights_cached
    assert not converted.entry(cache, sha256, "float32").exists()
    assert converted.entry(cache, changed, "float32").is_dir()


def test_a_copy_larger_than_the_bound_is_not_kept(tiny_checkpoint: Path, tmp_path: Path) -> None:
    sha256 = _sha256(tiny_checkpoint)
    _load(tiny_checkpoint, tmp_path, sha256, bound=1024)
    assert [] == list(converted.root(tmp_path).iterdir())
    _, phases = _load(tiny_checkpoint, tmp_path, sha256, bound=1024)
    assert False is phases.weights_cached


def test_a_damaged_copy_is_dropped_and_the_file_loads(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    sha256 = _sha256(tiny_checkpoint)
    first, _ = _load(tiny_checkpoint, tmp_path, sha256)
    copy = converted.entry(tmp_path, sha256, "float32")
    weights = next(copy.glob("unet/*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated (a full disk, bit rot)
    again, phases = _load(tiny_checkpoint, tmp_path, sha256)
    assert (False, first) == (phases.weights_cached, again)
    _, phases = _load(tiny_checkpoint, tmp_path, sha256)
    assert True is phases.weights_cached, "converted again, then used"
