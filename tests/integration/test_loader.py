"""The real loading and diffusers code on the tiny checkpoint, offline, on the CPU."""

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from services.inference.loader import CheckpointError, load_pipeline  # noqa: E402
from services.inference.tiny import TinyModel, build_tiny_sd1  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    torch.set_flush_denormal(True)
    return build_tiny_sd1(tmp_path_factory.mktemp("tiny-loader"))


def _image(pipe: Any, seed: int) -> Any:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    result = pipe(
        "a photo of a cat", num_inference_steps=2, width=64, height=64, generator=generator
    )
    return np.array(result.images[0])


def test_single_file_round_trip_is_bit_identical(tiny: TinyModel, tmp_path: Path) -> None:
    single = load_pipeline(tiny.single_file, cache_dir=tmp_path)
    folder = load_pipeline(tiny.diffusers_dir, cache_dir=tmp_path)
    for component in ("unet", "vae", "text_encoder"):
        a, b = getattr(single, component).state_dict(), getattr(folder, component).state_dict()
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a), component
    folder.scheduler = type(single.scheduler).from_config(single.scheduler.config)
    first = _image(single, 7)
    assert (64, 64, 3) == first.shape
    assert np.array_equal(first, _image(folder, 7))
    assert np.array_equal(first, _image(single, 7))


def test_the_tokenizer_gives_the_standard_clip_ids(tiny: TinyModel, tmp_path: Path) -> None:
    pipe = load_pipeline(tiny.single_file, cache_dir=tmp_path)
    ids = pipe.tokenizer("a photo of a cat").input_ids
    assert [49406, 320, 1125, 539, 320, 2368, 49407] == ids


def test_pickles_are_refused_by_default(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"\x80\x04junk")
    with pytest.raises(CheckpointError, match="pickle"):
        load_pipeline(path, cache_dir=tmp_path)


def test_broken_and_foreign_files_fail_with_a_reason(tiny: TinyModel, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(tiny.single_file.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_pipeline(truncated, cache_dir=tmp_path)
    from safetensors.torch import save_file

    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 4)}, str(lora))
    with pytest.raises(CheckpointError, match="not a Stable Diffusion"):
        load_pipeline(lora, cache_dir=tmp_path)


def test_config_folders_are_built_safely_in_parallel(tiny: TinyModel, tmp_path: Path) -> None:
    """Workers of same-layout checkpoints share one cached config folder."""
    from concurrent.futures import ThreadPoolExecutor

    from services.inference.loader import materialise_config
    from services.storage.modelfiles import detect_family, read_safetensors_header

    tensors, _ = read_safetensors_header(tiny.single_file)
    family = detect_family(tensors)
    assert family is not None
    with ThreadPoolExecutor(6) as pool:
        folders = list(
            pool.map(
                lambda _: materialise_config(tiny.single_file, tensors, family, tmp_path), range(6)
            )
        )
    assert 1 == len(set(folders))
    assert (folders[0] / "model_index.json").is_file()
    assert (folders[0] / "tokenizer" / "tokenizer.json").is_file()
    assert [folders[0]] == [p for p in (tmp_path / "configs").iterdir()]
